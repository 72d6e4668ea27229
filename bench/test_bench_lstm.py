"""pytest-benchmark entry points: ``pytest bench/ --benchmark-only`` (CUDA cases skip without a
GPU; the CPU case runs anywhere). The command-line suite (``python -m normrnn bench``) is the one
that writes the committed results."""
import pytest
import torch

from normrnn.bench.cases import Case
from normrnn.bench.implementations import IMPLEMENTATIONS, Skip, cpu_runner

GPU_CASES = [Case("lstm", norm, "bfloat16", 64, 512, 100) for norm in (None, "layer", "batch")]


@pytest.mark.parametrize("implementation", ["normrnn-triton", "cudnn"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda case: case.label())
def test_gpu_training_step(benchmark, case, implementation):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        runner = IMPLEMENTATIONS[implementation](case, torch.device("cuda"))
    except Skip as skip:
        pytest.skip(str(skip))

    def step():
        runner.train_step()
        torch.cuda.synchronize()
    benchmark(step)


@pytest.mark.parametrize("implementation", ["normrnn-reference", "torch-cpu", "normrnn-cpp"])
def test_cpu_training_step(benchmark, implementation):
    try:
        runner = cpu_runner(implementation, Case("lstm", None, "float32", 32, 256, 100))
    except Skip as skip:
        pytest.skip(str(skip))
    benchmark(runner.train_step)
