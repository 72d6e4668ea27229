"""Step offsets past 2^31 elements.

A layer's per-step tensors ((T, B, 4H) projections, the states, the backward's partial sums) pass
2^31 elements at sizes the issues ask for: the LSTM's wx at B=256, H=2048 from T=1025 on, at
B=512 from T=513. The kernels' integers are 32-bit, so ``t * B * 4 * H`` would wrap to a negative
offset there (a wrong read, or a fault). Every kernel moves its pointers to step t with
``step_offset`` (``kernels/tiles.py``), in 64 bits. These tests hold that helper to exact products
past 2^31 and check, in the kernels' source, that no step index is multiplied any other way; the
kernels themselves run past 2^31 elements in the bench's check against cuDNN on a GPU
(``bench/correctness.py``, ``WIDE_OFFSET_STEPS``), where such tensors fit."""
import ast
from pathlib import Path

import pytest
import torch

from fused_helpers import DEVICE, INTERPRETER_OFF

if INTERPRETER_OFF:
    pytest.skip("no CUDA device and the Triton interpreter is off", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from normrnn.kernels.tiles import step_offset  # noqa: E402

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
# the names the kernels give a step index or a slot of the per-timestep statistics
STEP_INDICES = {"t", "step", "slot"}


@triton.jit
def _offsets_kernel(out_ptr, t, B, H: tl.constexpr):
    # the 32-bit product beside the helper's: the first wraps, which is what makes the second a test
    tl.store(out_ptr, t * B * 4 * H)
    tl.store(out_ptr + 1, step_offset(t, B * 4 * H))
    tl.store(out_ptr + 2, step_offset(t + 1, B * 4 * H))
    for step in range(t, t + 1):  # a loop's step index, as in the persistent kernels
        tl.store(out_ptr + 3, step_offset(step, B * 4 * H))
    tl.store(out_ptr + 4, step_offset(0, B * 4 * H))


@pytest.mark.parametrize("t,batch,hidden", [(1024, 256, 2048), (1099, 256, 2048), (9999, 512, 2048)])
def test_step_offset_is_exact_past_two_to_the_31(t, batch, hidden):
    out = torch.full((5,), -1, dtype=torch.int64, device=DEVICE)
    _offsets_kernel[(1,)](out, t, batch, hidden)
    wrapped, offset, next_offset, loop_offset, zero = out.tolist()
    step_size = batch * 4 * hidden
    assert t * step_size >= 2**31
    assert wrapped != t * step_size  # 32-bit arithmetic: the bug the helper prevents
    assert (offset, next_offset, loop_offset, zero) == (t * step_size, (t + 1) * step_size, t * step_size, 0)


def _jit_functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(
                "jit" in ast.unparse(decorator) for decorator in node.decorator_list):
            yield node


def _step_index_products(function: ast.FunctionDef):
    """Products with a step index (``t``, ``t + 1``, ``slot``) as a factor, outside the grid
    barrier's arrival counts (a counter, not an address: (t + 1) x programs fits in 32 bits for
    any sequence whose tensors fit on a GPU)."""
    exempt = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "grid_barrier":
            exempt.update(id(inner) for argument in node.args for inner in ast.walk(argument))
    for node in ast.walk(function):
        if not isinstance(node, ast.BinOp) or not isinstance(node.op, ast.Mult) or id(node) in exempt:
            continue
        for factor in (node.left, node.right):
            if _sum_terms(factor) & STEP_INDICES:
                yield node.lineno, ast.unparse(node)


def _sum_terms(node: ast.expr) -> set:
    """The names that ``node`` is a sum of (``t`` of ``t``, ``t + 1`` and ``(t - 1)``; nothing
    inside a call, a product or a subscript, which are separate factors or no step index)."""
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        return _sum_terms(node.left) | _sum_terms(node.right)
    return set()


def test_no_kernel_multiplies_a_step_index_in_32_bits():
    found = []
    for path in sorted(KERNELS.glob("*.py")):
        for function in _jit_functions(ast.parse(path.read_text())):
            found += [f"{path.name}:{line} in {function.name}: {text}" for line, text in _step_index_products(function)]
    assert not found, "step offsets computed in 32 bits (use step_offset):\n" + "\n".join(found)


def test_the_source_check_finds_a_32_bit_step_offset():
    source = '''
@triton.jit
def kernel(wx_ptr, barrier_ptr, t, B, H: tl.constexpr):
    wx = tl.load(wx_ptr + t * B * 4 * H)
    tl.store(wx_ptr + (t + 1) * B * H, wx)
    grid_barrier(barrier_ptr, (t + 1) * 8)
'''
    function = next(_jit_functions(ast.parse(source)))
    assert sorted(line for line, _ in _step_index_products(function)) == [4, 5]
