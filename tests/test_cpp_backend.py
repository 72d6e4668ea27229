"""The compiled C++ CPU backend (csrc/): gradcheck in float64 through the C++ forward and
backward of every cell x norm, equality with the reference in float32, and dispatch."""
import pytest
import torch

import normrnn
from conftest import (CELLS, NORMS, assert_float32_backend_equals_the_reference, draw_running_statistics,
                      outputs_and_grads, relative_error)
from test_reference_gradcheck import _gradcheck_module, gradcheck_two_layers_bidirectional_and_eval

reason = normrnn.dispatch.unavailable_reason("cpp", "lstm", None, torch.zeros(1))
if reason is not None:
    pytest.skip(f"the C++ backend is not usable here: {reason}", allow_module_level=True)


def _layer(cell, norm, **config):
    module = CELLS[cell](norm=norm, backend="cpp", **config).double()
    for parameter in module.parameters():  # gains away from their init, so their gradients are generic
        parameter.data.uniform_(-1, 1)
    return module


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("padded", [False, True])
def test_gradcheck_through_cpp(cell, norm, padded):
    module = _layer(cell, norm, input_size=3, hidden_size=2)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    _gradcheck_module(module, x, torch.tensor([4, 2, 3]) if padded else None, with_state=True)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_gradcheck_two_layers_bidirectional_and_eval(cell, norm):
    gradcheck_two_layers_bidirectional_and_eval(
        _layer(cell, norm, input_size=2, hidden_size=2, num_layers=2, bidirectional=True, max_steps=2))


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("norm", NORMS)
def test_float32_equals_the_reference(cell, norm):
    assert_float32_backend_equals_the_reference(CELLS[cell], norm, "cpp", hidden_size=7)


@pytest.mark.parametrize("nonlinearity", ["relu", None])
@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_gradcheck_rnn_relu_and_identity(nonlinearity, norm):
    """BN or LN in place of tanh: relu' is read from h (h > 0), identity' is 1."""
    module = _layer("rnn", norm, input_size=3, hidden_size=3, nonlinearity=nonlinearity)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    _gradcheck_module(module, x, torch.tensor([4, 2, 3]), with_state=True)


def _reference_and_cpp(cell, norm, random_statistics=False, **config):
    """A float64 reference layer and a C++ one holding its weights and buffers; with
    ``random_statistics`` the running statistics drawn away from their init first
    (``draw_running_statistics``)."""
    reference = CELLS[cell](norm=norm, backend="reference", **config).double()
    if random_statistics:
        draw_running_statistics(reference)
    fused = CELLS[cell](norm=norm, backend="cpp", **config).double()
    fused.load_state_dict(reference.state_dict())
    return reference, fused


@pytest.mark.parametrize("cell", list(CELLS))
def test_steps_with_one_active_row_use_running_statistics(cell):
    """Batch norm of a step with a single active row normalizes with the running statistics of
    its slot (no batch statistics, no update): the C++ loops agree with the reference there."""
    reference, fused = _reference_and_cpp(cell, "batch", random_statistics=True, input_size=4, hidden_size=5,
                                          max_steps=8)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    lengths = torch.tensor([5, 1, 2])  # steps 2-4: one row
    expected = outputs_and_grads(reference, x, None, lengths)
    got = outputs_and_grads(fused, x, None, lengths)
    for key, value in expected.items():
        assert relative_error(got[key], value) < 1e-10, key


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_shapes_split_over_threads_equal_the_reference(cell, norm):
    """Rows and columns large enough that the fused loops run in chunks on several threads."""
    reference, fused = _reference_and_cpp(cell, norm, input_size=8, hidden_size=160, max_steps=3)
    x = torch.randn(3, 900, 8, dtype=torch.float64)
    lengths = torch.randint(1, 4, (900,))
    lengths[0] = 3
    expected = outputs_and_grads(reference, x, None, lengths)
    got = outputs_and_grads(fused, x, None, lengths)
    for key, value in expected.items():
        assert relative_error(got[key], value) < 1e-10, key


@pytest.mark.parametrize("cell", list(CELLS))
def test_running_statistics_split_over_threads_equal_the_reference(cell):
    """The C++ loops update a slot's running statistics with the batch statistics of each block of
    columns, written through pointers: over blocks on several threads they equal the reference's,
    and autograd's version counter of every buffer it wrote moves (an in-place ATen op moves it)."""
    reference, fused = _reference_and_cpp(cell, "batch", random_statistics=True, input_size=8, hidden_size=160,
                                          max_steps=2)
    versions = {name: buffer._version for name, buffer in fused.named_buffers()}
    x = torch.randn(3, 900, 8, dtype=torch.float64)
    lengths = torch.randint(1, 4, (900,))
    lengths[:2] = 3
    with torch.no_grad():
        reference(x, lengths=lengths)
        fused(x, lengths=lengths)
    expected = dict(reference.named_buffers())
    for name, buffer in fused.named_buffers():
        assert relative_error(buffer, expected[name]) < 1e-12, name
        assert buffer._version > versions[name], name


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("trained", ["bias_ih_l0", "bias_hh_l0"])
def test_a_bias_alone_requiring_a_gradient_gets_the_references(cell, norm, trained):
    """Without a per-step norm of x W_ih^T the input's bias is folded into the projection before the
    loop, and the loop gets none: a layer whose only parameter that trains is one bias (the input
    frozen too) must still keep what its backward needs, and that bias's gradient is the reference's."""
    reference, fused = _reference_and_cpp(cell, norm, input_size=3, hidden_size=5, max_steps=6)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 5, 4])
    weight = torch.randn(6, 4, 5, dtype=torch.float64)
    grads = []
    for module in (reference, fused):
        for name, parameter in module.named_parameters():
            parameter.requires_grad_(name == trained)
        out, _ = module(x, lengths=lengths)
        (out * weight).sum().backward()
        grads.append(dict(module.named_parameters())[trained].grad)
    assert relative_error(grads[1], grads[0]) < 1e-10


def test_auto_picks_cpp_on_cpu_without_a_warning(recwarn):
    x = torch.zeros(1)
    assert normrnn.dispatch.resolve("auto", "gru", "batch", x) in ("cpp", "triton")
    assert normrnn.dispatch.unavailable_reason("cpp", "gru", "batch", x) is None
    assert "float16" in normrnn.dispatch.unavailable_reason("cpp", "lstm", None, torch.zeros(1, dtype=torch.half))


def test_repeated_forwards_release_their_saved_activations():
    """The saved sequence lives in the autograd node; a returned tensor that it also held made a
    cycle the garbage collector cannot see through C++, and every call leaked ~10 MB here."""
    import gc
    import resource
    layer = normrnn.LSTM(1, 48, backend="cpp")
    x = torch.randn(64, 64, 1)
    for _ in range(3):
        layer(x)
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(40):
        layer(x)[0].sum()  # a graph is built and dropped without backward
    gc.collect()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 150, f"resident memory grew by {grown_mib:.0f} MiB over 40 calls"


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("norm", [None, "batch"])
def test_pooled_buffers_never_overwrite_what_a_call_returned(cell, norm):
    """The C++ loops reuse their internal buffers from call to call (workspace pool): outputs,
    states and gradients of one call must survive the next call of the same shape."""
    layer = CELLS[cell](4, 6, norm=norm, backend="cpp")
    x = torch.randn(5, 3, 4, requires_grad=True)
    output, state = layer(x)
    finals = state if isinstance(state, tuple) else (state,)
    (output.square().sum() + sum(f.sum() for f in finals)).backward()
    kept = [output.detach().clone(), x.grad.clone()] + [f.detach().clone() for f in finals]
    first_grads = [p.grad for p in layer.parameters()]  # tensors the first backward returned
    kept += [g.clone() for g in first_grads]
    for _ in range(2):  # same shapes: the pool hands the freed buffers out again
        layer.zero_grad(set_to_none=True)
        other = torch.randn(5, 3, 4, requires_grad=True) * 3
        again, _ = layer(other)
        again.sum().backward()
    now = [output.detach(), x.grad] + [f.detach() for f in finals] + first_grads
    for before, after in zip(kept, now):
        assert torch.equal(before, after)


def _finals(state):
    return list(state) if isinstance(state, tuple) else [state]


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("chunk_steps", [None, 2])
def test_a_forward_no_backward_follows_computes_what_one_kept_for_it_does(cell, norm, training, chunk_steps,
                                                                          monkeypatch):
    """Under no_grad the loops keep one step's values instead of every step's (nothing is kept for a
    backward), and project the input a chunk of steps at a time (here the whole sequence, or 2
    steps, so that a chunk begins inside the per-step statistics, past max_steps and past a
    sequence's end): outputs, final states and the running statistics' update are bit for bit
    those of the forward that keeps everything, padded rows, two layers, both directions."""
    import copy
    from normrnn.params import CELL_GATES
    projections = []
    project = normrnn.cpp_backend._project
    monkeypatch.setattr(normrnn.cpp_backend, "_project", lambda x, *rest: projections.append(x.shape[0]) or
                        project(x, *rest))
    if chunk_steps is not None:  # float32, 4 sequences, 5 hidden units
        monkeypatch.setattr(normrnn.cpp_backend, "INFERENCE_CHUNK_BYTES", chunk_steps * 4 * CELL_GATES[cell] * 5 * 4)
    layer = CELLS[cell](4, 5, num_layers=2, bidirectional=True, norm=norm, max_steps=3, backend="cpp")
    for name, buffer in layer.named_buffers():
        buffer.copy_(torch.rand_like(buffer) + 0.5 if "var" in name else torch.randn_like(buffer))
    twin = copy.deepcopy(layer)
    layer.train(training)
    twin.train(training)
    x, lengths = torch.randn(6, 4, 4), torch.tensor([6, 2, 5, 6])
    with torch.no_grad():
        output, state = layer(x, lengths=lengths)
    chunked = chunk_steps is not None and not (norm == "seqbatch" and training)  # which needs every step at once
    assert projections == ([2, 2, 2] if chunked else [6]) * 4  # 2 layers, 2 directions
    kept_output, kept_state = twin(x, lengths=lengths)  # the parameters require gradients
    assert kept_output.requires_grad and not output.requires_grad
    for without, kept in zip([output] + _finals(state), [kept_output] + _finals(kept_state)):
        assert torch.equal(without, kept.detach())
    for (name, buffer), (_, kept_buffer) in zip(layer.named_buffers(), twin.named_buffers()):
        assert torch.equal(buffer, kept_buffer), name


@pytest.mark.parametrize("cell", list(CELLS))
def test_a_forward_no_backward_follows_holds_one_step_of_buffers(cell):
    """What the loops' buffers come to (the pool takes them back when the call ends): about one
    step's worth under no_grad, against every step's when a backward may follow; the returned
    output alone is T steps (it too comes back to the pool once dropped, so it is held here)."""
    steps, batch, hidden = 200, 8, 32
    layer = CELLS[cell](hidden, hidden, norm="batch", max_steps=steps, backend="cpp")
    x = torch.randn(steps, batch, hidden)
    step_bytes = batch * hidden * x.element_size()
    normrnn.cpp_backend.release_workspace()
    with torch.no_grad():
        output = layer(x)[0]
    without_backward = normrnn.cpp_backend.release_workspace()
    del output
    layer(x)[0].sum().backward()
    with_backward = normrnn.cpp_backend.release_workspace()
    assert with_backward > 5 * steps * step_bytes
    assert 0 < without_backward < 30 * step_bytes, (without_backward, with_backward)


def _extension_lstm_forward(steps, batch, hidden, keep, bias=None):
    """The extension's LSTM forward called directly (no norm, evaluation mode, no output projection;
    the projection carries the bias, so the loop takes an empty one unless ``bias`` is given):
    output, h_n, c_n, saved, and the zero initial state it ran from."""
    ones = torch.ones(4 * hidden)
    running = [torch.zeros(1, 4 * hidden), torch.ones(1, 4 * hidden)] * 2 + [torch.zeros(1, hidden),
                                                                             torch.ones(1, hidden)]
    h0 = torch.zeros(batch, hidden)
    loop_bias = torch.empty(0) if bias is None else bias
    results = normrnn.cpp_backend.extension().lstm_forward(
        torch.randn(steps, batch, 4 * hidden), h0, h0, torch.randn(4 * hidden, hidden), loop_bias, ones, ones,
        torch.ones(hidden), torch.zeros(hidden), running, torch.empty(0, dtype=torch.int64), 0, 0, 0, False, 0.1,
        1e-5, keep, torch.empty(0))
    return (*results, h0)


def test_a_bias_given_to_a_loop_whose_input_carries_it_raises():
    """Without a per-step norm of x W_ih^T the projection carries the bias and the loop adds none: a
    bias handed to the loop anyway would be left out silently, so the extension refuses it."""
    with pytest.raises(RuntimeError, match="bias: expected an empty tensor"):
        _extension_lstm_forward(3, 2, 4, keep=False, bias=torch.zeros(16))


def test_a_backward_after_a_forward_that_kept_nothing_raises():
    steps, batch, hidden = 3, 2, 4
    *_, saved, h0 = _extension_lstm_forward(steps, batch, hidden, keep=False)
    with pytest.raises(RuntimeError, match="kept nothing"):
        normrnn.cpp_backend.extension().lstm_backward(saved, torch.ones(steps, batch, hidden), h0, h0)


@pytest.mark.parametrize("cell", list(CELLS))
def test_a_backward_frees_what_the_forward_kept_unless_the_graph_is_retained(cell):
    """As autograd frees the tensors of save_for_backward, a backward that does not retain the graph
    hands the forward's buffers back to the pool while the output is still referenced; a retained
    graph keeps them and differentiates again to the same gradients, and a second backward through
    a freed one raises torch's error."""
    steps, batch, hidden = 20, 4, 16
    layer = CELLS[cell](8, hidden, norm="batch", max_steps=steps, backend="cpp")
    x = torch.randn(steps, batch, 8, requires_grad=True)
    output, _ = layer(x)
    normrnn.cpp_backend.release_workspace()
    output.sum().backward(retain_graph=True)
    first = x.grad.clone()
    retained = normrnn.cpp_backend.release_workspace()  # the backward's own buffers
    output.sum().backward()
    assert torch.equal(x.grad, 2 * first)
    freed = normrnn.cpp_backend.release_workspace()  # and the forward's
    step_bytes = batch * hidden * x.element_size()
    assert freed >= retained + 3 * steps * step_bytes, (freed, retained)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        output.sum().backward()


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("norm", NORMS)
def test_the_pool_takes_back_the_buffers_it_handed_out(cell, norm):
    """Training steps of one shape run on the same buffers: what the pool holds after each step is
    the same. (A buffer handed out as a view tracked by autograd kept its base as a second owner,
    and the pool refused it on return: every other step got fresh memory. A buffer it did not
    hand out, taken back, made it grow by one every step.)"""
    layer = CELLS[cell](8, 16, norm=norm, backend="cpp")
    x = torch.randn(20, 4, 8, requires_grad=True)
    normrnn.cpp_backend.release_workspace()
    held = []
    for _ in range(4):
        layer(x)[0].sum().backward()
        held.append(normrnn.cpp_backend.extension().workspace_bytes())
    assert held[0] > 0 and held == [held[0]] * 4, held


def test_an_output_and_a_gradient_come_back_to_the_pool_when_dropped():
    """The output and the gradient of x W_ih^T are handed out on pooled memory: the pool takes each
    back when its holder drops it, and not before."""
    extension = normrnn.cpp_backend.extension()
    steps, batch, hidden = 3, 2, 4
    output, _, _, saved, h0 = _extension_lstm_forward(steps, batch, hidden, keep=True)
    grad_wx, *_ = extension.lstm_backward(saved, torch.ones(steps, batch, hidden), h0, h0)
    del saved
    held, size = extension.workspace_bytes(), output.nbytes
    del output
    assert extension.workspace_bytes() == held + size
    held, size = extension.workspace_bytes(), grad_wx.nbytes
    del grad_wx
    assert extension.workspace_bytes() == held + size


def test_release_workspace_frees_the_pool():
    layer = normrnn.LSTM(4, 6, backend="cpp")
    layer(torch.randn(5, 3, 4))[0].sum().backward()
    assert normrnn.cpp_backend.release_workspace() > 0
    assert normrnn.cpp_backend.release_workspace() == 0


@pytest.mark.parametrize("norm", ["batch", "seqbatch"])
def test_torch_compile_runs_the_cpp_loops_between_graphs_and_fullgraph_says_why_it_cannot(norm):
    """The C++ loops cannot be traced (their saved state is an object of their own): a compiled
    model runs them eagerly between its graphs, with the eager values, gradients and running
    statistics, padding included (the counts of a padding built while tracing are taken when the
    loops run); with ``fullgraph=True`` the error names the backend and what to use instead."""
    torch._dynamo.reset()
    layer = normrnn.LSTM(3, 5, norm=norm, backend="cpp")
    x, lengths = torch.randn(4, 3, 3), torch.tensor([4, 2, 3])
    expected = outputs_and_grads(layer, x, None, lengths)
    layer.reset_running_stats()
    got = outputs_and_grads(torch.compile(layer, backend="aot_eager"), x, None, lengths)
    got = {key.replace("_orig_mod.", ""): value for key, value in got.items()}
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    with pytest.raises(Exception, match="C\\+\\+ CPU backend cannot be traced"):
        torch.compile(normrnn.GRU(3, 5, backend="cpp"), fullgraph=True, backend="aot_eager")(x)
