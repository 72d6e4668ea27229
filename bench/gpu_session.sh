#!/usr/bin/env bash
# What a session with a GPU machine runs, through the device tool, from the repository root, in two
# calls that each end well inside the tool's 10-minute limit (each compiles its own kernels: the
# machine may be handed back between calls, and its Triton cache with it):
#
#   bash bench/gpu_session.sh tests   # kernel tests compiled: per-step launches, then persistent kernels
#   bash bench/gpu_session.sh bench   # python -m normrnn bench --quick (kernels compiled first, in
#                                     # parallel; results rewritten after every case, so a run cut
#                                     # short by its limit still brings back what it timed)
#
# Everything lands under $OUT: session.log (device, versions, each part's exit status and output)
# and bench/ (the bench's JSON, markdown and two plots), within the 8 files the tool takes back.
set -u
: "${OUT:?set OUT to the folder for the logs}"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log="$OUT/session.log"
kernel_tests="tests/test_triton_lstm.py tests/test_triton_gru.py tests/test_triton_rnn.py"

part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a timeout, its output and status into the log
    local name=$1 seconds=$2
    shift 2
    echo "=== $name (limit ${seconds}s): $*" >>"$log"
    local start=$SECONDS
    timeout "$seconds" "$@" >>"$log" 2>&1
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - start))s" | tee -a "$log"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >>"$log" 2>&1

# the kernel tests compile a few hundred small specializations, one after another in one pytest:
# bench/parallel_tests.py runs them in 8 pytest processes at once
case "${1:-}" in
tests)
    # a grid barrier that never opens would spin until the timeout: pytest-timeout names the test
    part "kernel tests, per-step launches" 300 python3 bench/parallel_tests.py --processes 8 $kernel_tests
    part "kernel tests, persistent kernels" 240 \
        env NORMRNN_PERSISTENT=1 python3 bench/parallel_tests.py --processes 8 $kernel_tests -- --timeout 120
    ;;
bench)
    part "bench --quick" 540 python3 -m normrnn bench --quick --out "$OUT/bench"
    ;;
*)
    echo "usage: bash bench/gpu_session.sh tests|bench" >&2
    exit 2
    ;;
esac
