"""Drawn layer configurations (``tests/fuzz_layers.py``) on every backend usable here against the
float64 reference: in CI the first drawn case of each cell and norm, so that every pair is run
with options no hand-written test combines; the command runs as many as a time budget allows."""
import pytest

import fuzz_layers
from fused_helpers import INTERPRETER_OFF


def _first_case_of_each_cell_and_norm():
    seeds = {}
    for seed in range(1000):
        case = fuzz_layers.draw_case(seed)
        seeds.setdefault((case.cell, case.norm), seed)
    return sorted(seeds.items(), key=lambda item: item[1])


CASES = _first_case_of_each_cell_and_norm()


def test_every_cell_and_norm_is_drawn():
    assert {pair for pair, _ in CASES} == {(cell, norm) for cell in ("lstm", "gru", "rnn")
                                           for norm in (None, "layer", "batch", "seqbatch")}


@pytest.mark.skipif(INTERPRETER_OFF, reason="no CUDA device and the Triton interpreter is off")
@pytest.mark.parametrize("seed", [seed for _, seed in CASES],
                         ids=[f"{cell}-{norm}-seed{seed}" for (cell, norm), seed in CASES])
def test_drawn_case_matches_the_reference(seed):
    case = fuzz_layers.draw_case(seed)
    assert fuzz_layers.check_case(case) == [], case


def test_a_wrong_kernel_is_found(monkeypatch):
    """The check can fail: a Triton layer whose norm epsilon differs from the reference's."""
    if INTERPRETER_OFF:
        pytest.skip("no CUDA device and the Triton interpreter is off")
    make = fuzz_layers._layer

    def with_wrong_epsilon(case, backend, dtype, template=None):
        layer = make(case, backend, dtype, template)
        if backend == "triton":
            layer.eps = 0.1
        return layer

    monkeypatch.setattr(fuzz_layers, "_layer", with_wrong_epsilon)
    seed = next(seed for (cell, norm), seed in CASES if norm == "layer")
    failures = fuzz_layers.check_case(fuzz_layers.draw_case(seed), stop_at_first_phase_failing=True)
    assert any("triton" in failure and "output" in failure for failure in failures), failures


def test_the_seed_fixes_the_case():
    assert fuzz_layers.draw_case(7) == fuzz_layers.draw_case(7)
    assert fuzz_layers.draw_case(7) != fuzz_layers.draw_case(8)


def test_drawn_cases_are_as_well_conditioned_as_the_bounds_assume():
    """No drawn case asks for what no tolerance bounds: per-timestep batch statistics over fewer
    than five active rows, a layer norm over one or two hidden units where it is ill-conditioned, or
    16-bit gradients of one number each (a layer of one unit)."""
    for persistent in (False, True):
        for seed in range(2000):
            case = fuzz_layers.draw_case(seed, persistent)
            if case.norm == "batch":
                for step in range(case.steps):
                    active = sum(length > step for length in case.lengths)
                    assert active >= fuzz_layers.FEWEST_ROWS_UNDER_BATCH_NORM, case
            if case.hidden_size == 1:
                assert case.triton_dtype == "float32", case
            if case.norm == "layer":
                assert case.hidden_size not in fuzz_layers.ILL_CONDITIONED_LAYER_NORM_WIDTHS.get(case.cell, ()), case


def test_a_tensor_kind_spans_layers_and_directions():
    keys = ("grad_bias_ih_l0", "grad_bias_ih_l1_reverse", "grad_bias_ih_l0_reverse")
    kinds = {fuzz_layers.tensor_kind(key) for key in keys}
    assert kinds == {"grad_bias_ih"}
    assert fuzz_layers.tensor_kind("hh_running_var_l1") == "hh_running_var"
    assert fuzz_layers.tensor_kind("grad_hx0") == "grad_hx0" and fuzz_layers.tensor_kind("output") == "output"


def _first_persistent_case_over_three_programs(cell, norm):
    # of one layer: the interpreter's threads make a case several times slower than per-step launches
    for seed in range(1000):
        case = fuzz_layers.draw_case(seed, persistent=True)
        if (case.cell, case.norm, case.num_layers) == (cell, norm, 1) and case.hidden_size > 32 and case.steps <= 5:
            return case


@pytest.mark.skipif(INTERPRETER_OFF, reason="no CUDA device and the Triton interpreter is off")
@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_drawn_case_with_the_persistent_kernels(norm):
    """The persistent kernels of three programs, at once in threads of the interpreter, on a drawn
    LSTM whose H needs all three: the exchange of h (and of the layer norm's partial sums) at each
    grid barrier under options no hand-written test combines."""
    case = _first_persistent_case_over_three_programs("lstm", norm)
    assert fuzz_layers.check_case(case) == [], case


def test_the_final_hidden_state_is_measured_on_the_outputs_scale():
    """h_n that cancels to far below the outputs (persistent seed 33515) is held to the rounding
    of the outputs' order; an h_n off by the outputs' order (a wrong step) still fails."""
    import torch
    from conftest import tensor_error

    expected = {"output": torch.tensor([[0.19, -0.05], [0.00156, 0.02]], dtype=torch.float64),
                "final0": torch.tensor([[0.00156]], dtype=torch.float64)}
    scale = fuzz_layers.smallest_scale("final0", expected)
    assert scale == 0.19
    one_ulp_of_the_terms = tensor_error("final0", expected["final0"] + 1.1e-4, expected, scale)
    assert one_ulp_of_the_terms < fuzz_layers.TOLERANCE[torch.float16]
    wrong_step = tensor_error("final0", torch.tensor([[0.02]], dtype=torch.float64), expected, scale)
    assert wrong_step > 0.05
    assert fuzz_layers.smallest_scale("final1", expected) == fuzz_layers.SMALLEST_SCALE
    assert fuzz_layers.smallest_scale("output", expected) == fuzz_layers.SMALLEST_SCALE
