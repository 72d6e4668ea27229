"""A pytest plugin that runs the fused-kernel tests on a machine without a GPU with every Triton
launch compiled for an H100 (sm_90) and launched nowhere, so that Triton's on-disk cache ends up
holding every kernel specialization those tests launch on the GPU (``bench/triton_cache.py``).

    TRITON_CACHE_DIR=... python -m pytest -p compile_only_plugin tests/test_triton_lstm.py

(with ``tests/`` on ``sys.path``). Nothing is computed: the kernels write nothing, so the values the
tests would compare are the poison their outputs start as. The comparisons with the reference are
therefore replaced by running the fused layer alone, and a test that asserts on values in its own
body fails; its launches up to that point are compiled all the same. The launch decisions follow
those on the GPU: tensors stay on the CPU in place of CUDA ones (``gpu_compile.compile_target``),
and with ``NORMRNN_PERSISTENT=1`` a grid of at most ``gpu_compile.MULTIPROCESSOR_COUNT`` programs (an
H100's multiprocessors) runs the persistent kernels, with the launch options they take on CUDA.
"""
import os
import sys
from pathlib import Path

# fused_helpers turns the interpreter on where there is no GPU; here the kernels are compiled
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parent))

CAPABILITY = 90

_compiling = None


def _run_fused_only(reference, fused, x, hx, lengths, dtype):
    """``fused_helpers.compare`` without the reference and the comparison: the fused layer's
    forward and backward in ``dtype``, as compare runs it."""
    import fused_helpers
    fused_helpers.outputs_and_grads(fused, x.to(fused_helpers.DEVICE, dtype),
                                    fused_helpers.to_dtype(hx, dtype, fused_helpers.DEVICE), lengths)


def compile_as_on_the_gpu():
    """From here on in this process, every Triton launch compiles for ``CAPABILITY`` and launches
    nothing, and the launchers decide as on the GPU: with ``NORMRNN_PERSISTENT=1`` a grid of at most
    ``gpu_compile.MULTIPROCESSOR_COUNT`` programs runs the persistent kernels, with the launch options
    they take on CUDA. Returns the context it entered (``gpu_compile.compile_only``)."""
    global _compiling
    if _compiling is not None:
        return _compiling
    import gpu_compile

    from normrnn.kernels import buffers, sequence_launch

    buffers.INTERPRETER_RESIDENT_PROGRAMS = gpu_compile.MULTIPROCESSOR_COUNT
    cuda_options = buffers.persistent_launch_options("cuda")
    sequence_launch.persistent_launch_options = lambda device_type: cuda_options
    _compiling = gpu_compile.compile_only(CAPABILITY)
    _compiling.__enter__()
    return _compiling


def pytest_configure(config):
    import conftest
    import fused_helpers

    fused_helpers.INTERPRETER_OFF = False
    fused_helpers.compare = _run_fused_only
    conftest.relative_error = fused_helpers.relative_error = lambda actual, expected: 0.0
    compile_as_on_the_gpu()


def pytest_unconfigure(config):
    if _compiling is not None:
        _compiling.__exit__(None, None, None)
