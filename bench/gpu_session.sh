#!/usr/bin/env bash
# What a session with a GPU machine runs, through the device tool, from the repository root, in one
# call: a session has 15 minutes of device time, a machine's start included, so everything is one
# command with a budget (default 540 s; the tool's timeout_s a little above it):
#
#   bash bench/gpu_session.sh [SECONDS]
#
#   1. the kernel tests compiled for the GPU, with per-step launches and with the persistent
#      kernels (NORMRNN_PERSISTENT=1), both at once in 8 pytest processes each (at most 150 s),
#      and beside them the bound per-step launches checked bit for bit against Triton's;
#   2. python -m normrnn bench --quick with a deadline for the rest of the budget: kernels compiled
#      first in parallel, the correctness checks at scale (both launch modes), then the cases in
#      the order the speed targets need them; results rewritten after every case, and no case
#      begun past the deadline, so that the run ends with its plots and summary.
#
# Kernels compiled beforehand on a machine without a GPU (`python bench/triton_cache.py build`, for
# this machine's Triton and Python) come in .whl/triton-cache.tar.xz where the run carries ".whl":
# Triton then loads them instead of compiling them at their first launch.
#
# Everything lands under $OUT, within the 8 files the tool takes back: session.log (device,
# versions, each part's exit status), tests-per-step.log, tests-persistent.log, and bench/ (the
# bench's JSON, markdown and two plots). The end of stdout is the summary to read first.
set -u
: "${OUT:?set OUT to the folder for the logs}"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
budget=${1:-540}
tests_limit=150
log="$OUT/session.log"
kernel_tests=$(grep -v '^#' bench/kernel_tests.txt)

part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a timeout, its output and status into the log
    local name=$1 seconds=$2
    shift 2
    echo "=== $name (limit ${seconds}s): $*" >>"$log"
    local start=$SECONDS
    timeout "$seconds" "$@" >>"$log" 2>&1
    local status=$?
    # a line of its own: a progress bar cut off by the timeout leaves its last line unended
    printf '\n=== %s: exit %s after %ss\n' "$name" "$status" "$((SECONDS - start))" >>"$log"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee -a "$log"
# the peers the machine lacks, where the session carried their wheels in .whl (a folder
# .gitignore leaves out; the run carries ".whl"): Haste's, built on the session's own machine by
# bench/build_haste.sh, compiled already (carry it from the first run); FlashRNN's (`pip download
# --no-deps -d .whl flashrnn==1.0.8`) compiles its CUDA kernel in the first case, minutes that the
# rest of the bench then lacks, so carry it once normrnn's own numbers are in
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
    echo "=== carried wheels: $(ls .whl)" >>"$log"
fi

# the kernels compiled beforehand on a machine without a GPU (bench/triton_cache.py build, into
# .whl/triton-cache.tar.xz), where they were built for this machine's Triton and Python; the counts
# of cached kernels after each part say how many this session still compiled
if [ -f .whl/triton-cache.tar.xz ] && python3 bench/triton_cache.py install .whl/triton-cache.tar.xz >>"$log" 2>&1; then
    TRITON_CACHE_DIR=$(python3 bench/triton_cache.py dir)
    export TRITON_CACHE_DIR
fi
cached() {
    if [ -n "${TRITON_CACHE_DIR:-}" ]; then
        echo "=== Triton cache: $(python3 bench/triton_cache.py count) kernels $1" >>"$log"
    fi
}
cached "before the tests"

# Triton compiling a few hundred small specializations bounds the tests: 16 pytest processes on 16
# cores. A grid barrier that never opens would spin until pytest-timeout names the test; its thread
# method ends the process, since a signal cannot interrupt a wait for the GPU
tests() {
    local timeout_options="--timeout 100 --timeout-method=thread"
    if ! python3 -c "import pytest_timeout" 2>/dev/null; then
        # the part's own limit still ends the tests, but without naming the test that hung
        echo "=== pytest-timeout is not installed: the kernel tests run without a per-test timeout"
        timeout_options=""
    fi
    python3 bench/parallel_tests.py --processes 8 $kernel_tests -- $timeout_options >"$OUT/tests-per-step.log" 2>&1 &
    local per_step=$!
    NORMRNN_PERSISTENT=1 python3 bench/parallel_tests.py --processes 8 $kernel_tests -- $timeout_options \
        >"$OUT/tests-persistent.log" 2>&1 &
    local persistent=$!
    wait $per_step
    local per_step_status=$?
    wait $persistent
    local persistent_status=$?
    return $((per_step_status > persistent_status ? per_step_status : persistent_status))
}
export -f tests
export OUT kernel_tests
# beside the tests: the per-step launches bound once against launches through Triton, bit for bit
# (bench/launch_check.py); where they differ or fail, the bench launches every step through Triton
check_log=$(mktemp)
timeout "$tests_limit" python3 bench/launch_check.py >"$check_log" 2>&1 &
check=$!
part "kernel tests, per-step and persistent" "$tests_limit" bash -c tests
wait $check
check_status=$?
{ cat "$check_log"; echo "=== bound launches against Triton's (bench/launch_check.py): exit $check_status"; } >>"$log"
cached "after the tests"
if [ "$check_status" -ne 0 ]; then
    export NORMRNN_STEP_LAUNCH=triton
    echo "=== the bound launches failed their check: the bench launches every step through Triton" >>"$log"
fi

# the bench begins no case or check past its deadline (a long check only 30 s before it); the hard
# limit above it leaves time for the last one and the plots
left=$((budget - SECONDS))
deadline=$((left - 65))
if [ "$deadline" -lt 60 ]; then deadline=60; fi
part "bench --quick" $((deadline + 60)) python3 -m normrnn bench --quick --out "$OUT/bench" --max-seconds 0.5 \
    --deadline "$deadline"
cached "after the bench"

echo "=== summary (session took ${SECONDS}s)"
grep -h "^=== .*: exit" "$log"
for tests_log in "$OUT"/tests-per-step.log "$OUT"/tests-persistent.log; do
    echo "--- $(basename "$tests_log")"
    if grep -q -E "^process [0-9]+:" "$tests_log"; then
        grep -E "^(FAILED|ERROR) |^process [0-9]+:" "$tests_log" | head -40
    else  # stopped, or failed before the tests ran
        tail -n 15 "$tests_log"
    fi
done
# the bench's end: ratios to cuDNN and every correctness check (or, if it was cut off, the checks)
if grep -q "^ratio to cudnn" "$log"; then
    awk '/^ratio to cudnn/{found=1} found' "$log"
else
    awk '/^correctness checks:/{found=1} found' "$log" | head -60
fi
