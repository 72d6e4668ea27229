"""Diagnostics against hand-computed gradients and Jacobians; the tasks' structure."""
import pytest
import torch

import normrnn
from normrnn import diagnostics, tasks


def _linear_rnn(hidden=5, inputs=3):
    """h_t = W_ih x_t + W_hh h_{t-1}: dL/dh_t and the step Jacobian have closed forms."""
    layer = normrnn.RNN(inputs, hidden, nonlinearity=None, bias=False, backend="reference").double()
    with torch.no_grad():
        layer.weight_hh_l0.copy_(torch.randn(hidden, hidden, dtype=torch.float64) * 0.6)
    return layer


def test_gradient_flow_of_a_linear_rnn_is_powers_of_the_recurrent_matrix():
    layer = _linear_rnn()
    steps, batch = 7, 4
    x = torch.randn(steps, batch, 3, dtype=torch.float64)
    weights = torch.randn(batch, 5, dtype=torch.float64)
    flow = diagnostics.gradient_flow(layer, x, lambda result: (result[0][-1] * weights).sum())
    assert flow.shape == (1, steps)
    w_hh = layer.weight_hh_l0.detach()
    # L = sum_b c_b . h_T  =>  dL/dh_t = c (W_hh)^(T-1-t), row by row
    expected = [float((weights @ torch.linalg.matrix_power(w_hh, steps - 1 - t)).norm()) for t in range(steps)]
    assert torch.allclose(flow[0], torch.tensor(expected, dtype=torch.float64), rtol=1e-10)


def test_gradient_flow_counts_the_output_at_every_step():
    layer = _linear_rnn()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    w_hh = layer.weight_hh_l0.detach()
    flow = diagnostics.gradient_flow(layer, x, lambda result: result[0].sum())
    ones = torch.ones(2, 5, dtype=torch.float64)
    expected, carried = [], torch.zeros(2, 5, dtype=torch.float64)
    for _ in range(4):  # from the last step back: dL/dh_t = 1 + dL/dh_{t+1} W_hh
        carried = ones + carried @ w_hh if expected else ones
        expected.append(float(carried.norm()))
    assert torch.allclose(flow[0], torch.tensor(expected[::-1], dtype=torch.float64), rtol=1e-10)


def test_jacobian_of_a_linear_rnn_is_the_recurrent_matrix():
    layer = _linear_rnn()
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    spectra = diagnostics.jacobian_spectrum(layer, x, steps=[1, 4], sample=2)
    expected = torch.linalg.svdvals(layer.weight_hh_l0.detach())
    for step in (1, 4):
        assert torch.allclose(spectra[step], expected, rtol=1e-10)


def test_torch_module_and_normrnn_layer_with_the_same_weights_flow_alike():
    torch_lstm = torch.nn.LSTM(3, 6, num_layers=2).double()
    ours = normrnn.LSTM.from_torch(torch_lstm, backend="reference")
    x = torch.randn(9, 4, 3, dtype=torch.float64)
    loss = lambda result: result[0][-1].pow(2).sum()  # noqa: E731
    theirs_flow = diagnostics.gradient_flow(torch_lstm, x, loss)
    ours_flow = diagnostics.gradient_flow(ours, x, loss)
    assert theirs_flow.shape == (2, 9)
    assert torch.allclose(theirs_flow, ours_flow, rtol=1e-10)
    assert (theirs_flow[:, 0] < theirs_flow[:, -1]).all()  # an LSTM at init loses gradient going back


def test_fused_backend_is_restored_and_hidden_norms_are_measured():
    layer = normrnn.BNRNN(3, 8, nonlinearity=None, bias=False).double()
    layer.backend = "cpp"
    growth = diagnostics.hidden_norm_growth(layer, torch.randn(5, 6, 3, dtype=torch.float64))
    assert layer.backend == "cpp"
    assert growth.shape == (1, 5) and (growth > 0).all()


def test_diagnostics_reject_a_model_without_recurrent_layers():
    with pytest.raises(TypeError, match="found no recurrent layer"):
        diagnostics.hidden_norm_growth(torch.nn.Linear(3, 3), torch.randn(2, 3))


def test_adding_problem_targets_are_the_sum_of_the_marked_numbers():
    inputs, targets = tasks.adding_problem(16, 50, seed=3)
    assert inputs.shape == (50, 16, 2) and targets.shape == (16,)
    assert torch.equal(inputs[:, :, 1].sum(0), torch.full((16,), 2.0))
    assert (inputs[:25, :, 1].sum(0) == 1).all()  # one marker in each half
    assert torch.allclose((inputs[:, :, 0] * inputs[:, :, 1]).sum(0), targets)
    again, _ = tasks.adding_problem(16, 50, seed=3)
    assert torch.equal(inputs, again)


def test_copy_task_structure():
    inputs, targets = tasks.copy_task(5, 20, symbols=4, copy_length=3, seed=1)
    assert inputs.shape == (26, 5, 6) and targets.shape == (26, 5)
    symbols_in = inputs[:3].argmax(-1)
    assert torch.equal(targets[-3:], symbols_in)
    assert (targets[:-3] == 4).all()
    assert (inputs[3 + 20 - 1].argmax(-1) == 5).all()  # the delimiter


def test_digits_are_sequences_of_pixels_with_a_fixed_permutation():
    pytest.importorskip("sklearn")
    train, test, permutation = tasks.digits(permuted=True, seed=0)
    assert train.inputs.shape[0] == 64 and train.inputs.shape[2] == 1
    assert train.inputs.shape[1] + test.inputs.shape[1] == 1797
    assert torch.equal(torch.sort(permutation).values, torch.arange(64))
    plain, _, none = tasks.digits(permuted=False, seed=0)
    assert none is None
    assert torch.equal(train.inputs, plain.inputs[permutation])
    assert 0.0 <= float(train.inputs.min()) and float(train.inputs.max()) <= 1.0


def test_text_corpus_ships_with_python_and_makes_next_character_targets():
    text = tasks.text_corpus()
    assert len(text) > 50_000
    inputs, targets, vocabulary = tasks.character_batches(text, 20, 3, seed=0)
    assert inputs.shape == targets.shape == (20, 3)
    assert torch.equal(inputs[1:], targets[:-1])
    assert int(inputs.max()) < len(vocabulary)


def test_character_streams_are_consecutive_parts_of_the_text():
    text = "abcdefghij" * 3 + "xy"  # 32 characters: 3 streams of 10, the last 2 left off
    vocabulary = "".join(sorted(set(text)))
    streams = tasks.character_streams(text, 3, vocabulary)
    assert streams.shape == (10, 3)
    for stream in range(3):
        assert "".join(vocabulary[i] for i in streams[:, stream]) == text[10 * stream:10 * stream + 10]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tasks.character_streams(text, 3, "abc")
    with pytest.raises(ValueError, match="at least 8 characters for 4 streams"):
        tasks.character_streams("abcd", 4, "abcd")


def test_demo_runs_end_to_end_and_saves_its_plots(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from normrnn import demo
    assert demo.main(["--quick", "--minutes", "0.05", "--hidden-size", "8", "--quiet", "--out", str(tmp_path)]) == 0
    for name in ("gradient_flow_initial.png", "gradient_flow_final.png", "loss.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    import json
    results = json.loads((tmp_path / "results.json").read_text())["models"]
    assert set(results) == {"LSTM", "BN-LSTM", "LN-LSTM", "RNN tanh", "RNN BN, no tanh"}
    for result in results.values():
        assert len(result["flow_final"]) == 64 and 0.0 <= result["test_accuracy"] <= 1.0


@pytest.mark.parametrize("study", ["rnn-gradient-flow", "gated-gradient-flow", "digits", "longer-sequences", "bn-eps",
                                   "truncated-bptt"])
def test_each_study_runs_quick_and_writes_its_report(tmp_path, study):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from normrnn import experiments
    assert experiments.main([study, "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert report.startswith(f"# {study}") and "|---|" in report and ".png" in report
    import json
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["study"] == study and results["runs"]
    assert list(tmp_path.glob("*.png"))
    if study == "bn-eps":
        # one row per model and eps, and every run measured the variance its eps is compared with
        assert report.count("| BN-LSTM gamma 0.1 |") == len(results["eps_values"]) == 3
        for run in results["runs"]:
            assert 0.0 < run["recurrent_variance_initial"] < float("inf")
    if study == "truncated-bptt":
        for run in results["runs"]:
            # read one character at a time with first_step, a layer computes what it does in pieces;
            # layers without per-step statistics compute the same whichever way their steps are numbered
            assert run["test_one_at_a_time"]["continue"]["bpc"] == pytest.approx(run["test"]["continue"]["bpc"],
                                                                                  rel=1e-5)
            if not run["model"].startswith("BN"):
                assert run["test"]["restart"]["bpc"] == pytest.approx(run["test"]["continue"]["bpc"], rel=1e-5)


def test_recurrent_variance_is_the_batch_variance_of_the_recurrent_projection():
    from normrnn import experiments
    torch.manual_seed(0)
    layer = normrnn.LSTM(3, 5, norm="batch", max_steps=8)
    same = torch.randn(8, 1, 3).expand(8, 6, 3).contiguous()
    # identical sequences have identical states: nothing for the horizontal batch norm to normalize
    assert experiments.recurrent_variance(layer, same) == pytest.approx(0.0, abs=1e-12)
    inputs = torch.randn(8, 6, 3)
    output, _ = layer(inputs)
    with torch.no_grad():
        by_hand = torch.stack([torch.stack([
            ((output[t - 1] @ layer.weight_hh_l0[j]) - (output[t - 1] @ layer.weight_hh_l0[j]).mean()).pow(2).mean()
            for j in range(20)]) for t in range(2, 8)])
    assert experiments.recurrent_variance(layer, inputs) == pytest.approx(float(by_hand.median()), rel=1e-5)


def test_the_forget_bias_variant_has_forget_gates_biased_at_one_and_nothing_else_changed():
    from normrnn import experiments
    torch.manual_seed(0)
    plain = experiments.GATED_VARIANTS["LSTM"](6, 10)
    torch.manual_seed(0)
    biased = experiments.GATED_VARIANTS["LSTM forget bias 1"](6, 10)
    forget = slice(6, 12)  # gate order i, f, g, o
    total = biased.bias_ih_l0 + biased.bias_hh_l0
    assert torch.equal(total[forget], torch.ones(6))
    for gate in (slice(0, 6), slice(12, 24)):
        assert torch.equal(biased.bias_ih_l0[gate], plain.bias_ih_l0[gate])
        assert torch.equal(biased.bias_hh_l0[gate], plain.bias_hh_l0[gate])
    assert torch.equal(biased.weight_hh_l0, plain.weight_hh_l0)
