"""What the tests of the fused Triton layers share: the interpreter switch, the pair of a float64
reference layer and a fused layer with the same (rounded) weights, and the comparison of every
output, gradient and running statistic.

Imported before triton: on a CPU it turns the Triton interpreter on (programs of a launch run one
after another there), on a GPU the kernels run compiled; outputs are poisoned with NaN before the
kernels write them."""
import copy
import os
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["NORMRNN_POISON"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from normrnn.kernels import buffers  # noqa: E402
# relative_error: the kernel tests take it from here
from conftest import outputs_and_grads, relative_error, tensor_error, to_dtype  # noqa: E402, F401

buffers.POISON = True
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETER_OFF = DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"


def _interpreter_cannot_loop() -> Optional[str]:
    """Why this Triton's interpreter cannot run a loop over a runtime bound, as every kernel of
    the sequence does, or None. Triton 3.6's turns the bound into an int with int() of a one-element
    array, which numpy 2.4 refuses: every kernel test would fail with a TypeError that says
    nothing of the cause."""
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def count_steps(out_ptr, steps):
        total = 0
        for _ in range(steps):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count_steps[(1,)](out, 3)
    except Exception as error:  # noqa: BLE001 - reported with its text
        return (f"the Triton interpreter (triton {triton.__version__}, numpy {numpy.__version__}) cannot run the "
                f"kernels' step loops: {error!r}. With triton 3.6, install numpy<2.4, or a newer triton")
    return None if int(out[0]) == 3 else f"the Triton interpreter counted {int(out[0])} of 3 loop steps"


if DEVICE == "cpu" and not INTERPRETER_OFF:
    _reason = _interpreter_cannot_loop()
    if _reason:
        pytest.exit(_reason, returncode=2)

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def every_backend(float64_tolerance: float):
    """(backend, dtype, device, tolerance) of every backend usable here: the reference and the C++
    backend in float64 (to ``float64_tolerance``), the Triton kernels in float32 (interpreted on a
    CPU), for tests that run one check on each."""
    import normrnn
    found = [("reference", torch.float64, "cpu", float64_tolerance)]
    if normrnn.dispatch.unavailable_reason("cpp", "lstm", None, torch.zeros(1)) is None:
        found.append(("cpp", torch.float64, "cpu", float64_tolerance))
    if not INTERPRETER_OFF:
        found.append(("triton", torch.float32, DEVICE, TOLERANCE[torch.float32]))
    return found


def make_pair(layer_class, norm, dtype, **config):
    """A float64 reference layer and a fused layer in ``dtype`` with the same weights, the
    reference holding them as rounded to ``dtype``; norm gains away from their initial value."""
    reference = layer_class(norm=norm, backend="reference", **config).double()
    for name, parameter in reference.named_parameters():
        if "norm" in name:
            parameter.data.uniform_(0.5, 1.5)
    fused = layer_class(norm=norm, backend="triton", **config).to(DEVICE, dtype)
    fused.load_state_dict(reference.state_dict())
    reference.load_state_dict({k: v.to(dtype).double() if v.is_floating_point() else v
                               for k, v in fused.state_dict().items()})
    return reference, fused


def compare(reference, fused, x, hx, lengths, dtype):
    """Outputs, final states, the gradients of the input and every parameter, and the running
    statistics of ``fused`` against ``reference``: each relative error under TOLERANCE[dtype], or
    under four times the error of the reference layer itself run in ``dtype`` on the same problem,
    whichever is larger."""
    # the reference sees the inputs as rounded to the fused layer's dtype: a bfloat16 layer's data
    # is bfloat16, and batch norm would amplify the rounding of inputs that it never receives
    x = x.to(dtype).double()
    hx = to_dtype(to_dtype(hx, dtype), torch.float64)
    # the floor of the rounding: some problems (batch statistics over few rows, two projecting
    # layers that feed each other) amplify it past the tolerance in any order of operations, and
    # which tensor it hits hardest depends on the machine's BLAS; a wrong kernel is off by far more
    same_dtype = copy.deepcopy(reference).to(dtype)
    floor = outputs_and_grads(same_dtype, x.to(dtype), to_dtype(hx, dtype), lengths)
    expected = outputs_and_grads(reference, x, hx, lengths)
    got = outputs_and_grads(fused, x.to(DEVICE, dtype), to_dtype(hx, dtype, DEVICE), lengths)
    for key in expected:
        error = tensor_error(key, got[key], expected)
        bound = max(TOLERANCE[dtype], 4 * tensor_error(key, floor[key], expected))
        assert error < bound, f"{key}: relative error {error:.2e}, bound {bound:.2e}"


def saved_shapes_and_backward(layer, x):
    """The shapes of the tensors that autograd keeps from ``layer``'s forward on ``x`` for the
    backward; then runs that backward and checks that every parameter got a nonzero gradient."""
    shapes = []

    def keep_shape(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep_shape, lambda tensor: tensor):
        output, _ = layer(x)
    output.sum().backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in layer.parameters())
    return shapes


def assert_deterministic(fused, x, lengths=None):
    """Two runs of ``fused`` from the same inputs and running statistics give bit-identical outputs,
    gradients and statistics: no float atomics, fixed reduction orders."""
    results = []
    for _ in range(2):
        fused.reset_running_stats()
        results.append(outputs_and_grads(fused, x.to(DEVICE), None, lengths))
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
