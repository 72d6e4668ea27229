"""``nn.LSTM``-style layers with normalization: ``LSTM``, ``GRU``, ``RNN`` and their aliases.

Constructor and forward follow ``torch.nn.LSTM`` / ``GRU`` / ``RNN``; the extra arguments are

* ``norm``: None, "layer" (Ba et al. 2016), "batch" (per-timestep batch norm, Cooijmans et al.
  2016) or "seqbatch" (batch norm of the input projection over batch and time, Laurent et al. 2016);
* ``momentum``, ``eps``: as ``nn.BatchNorm1d`` (running statistics take the unbiased variance);
* ``max_steps``: the number of timesteps with their own population statistics (T_max); in
  evaluation, steps at or beyond it use the statistics of the last one;
* ``gamma_init``: initial gain of the normalizations (0.1 for "batch" as the paper recommends,
  1.0 for "layer" and "seqbatch"); shifts start at 0;
* ``backend``: "auto", "reference", "triton" or "cpp" (see ``normrnn.dispatch``).

Parameters keep torch's names and gate order (``weight_ih_l0``, ``bias_hh_l1_reverse``, ...), so a
torch module's ``state_dict`` loads with ``strict=False`` (an LSTM's output projection, ``proj_size``,
is ``weight_hr_l0`` as in torch). Normalization parameters are
``ih_norm_weight_l0`` (gain of N(W_ih x)), ``hh_norm_weight_l0`` (gain of N(W_hh h)),
``cell_norm_weight_l0`` / ``cell_norm_bias_l0`` (LSTM, N(c)); running statistics are buffers
``ih_running_mean_l0``, ``ih_running_var_l0``, ``hh_running_*``, ``cell_running_*`` of shape
(max_steps, features) for "batch" and (features,) for "seqbatch". Running statistics stay float32
when the layer is cast to float16 or bfloat16.

Under ``torch.autocast`` on the parameters' device a float32 (or 16-bit) layer runs as ``nn.LSTM``
does there: in the autocast dtype, as if the layer had been cast to it (``layer.to(dtype)``, whose
results it reproduces bit for bit): input, ``hx`` and parameters are cast on the way in, the
gradients flow back to the parameters in their own dtype, the running statistics stay float32, and
the output comes out in the autocast dtype. Autocast is off inside the layer, so that it does not
move the layer's own float32 pieces (statistics, the float32 projection under batch norm) to other
dtypes. A float64 layer ignores autocast, as autocast ignores float64 tensors.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from . import dispatch
from .cumulative import with_scratch_statistics
from .params import CELL_GATES, DirectionParams, Padding
from .validation import check_constructor, check_first_step, check_input, check_lengths, check_state

_DEFAULT_GAMMA = {"batch": 0.1, "layer": 1.0, "seqbatch": 1.0}


def reverse_within_lengths(x: Tensor, padding: Padding) -> Tensor:
    """Reverses each sequence within its own length along dim 0; padded positions stay in place.
    The map is its own inverse, so it also brings a reverse direction's outputs back."""
    if not padding.padded:
        return x.flip(0)
    steps = x.shape[0]
    time = torch.arange(steps, device=x.device).unsqueeze(1)
    lengths = padding.lengths.to(x.device).unsqueeze(0)
    index = torch.where(time < lengths, lengths - 1 - time, time)
    return x.gather(0, index.unsqueeze(-1).expand_as(x))


def _autocast_lowered(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """What autocast makes of an operand: floating point other than float64 cast to ``dtype``,
    anything else as it is (and then rejected by the checks with the dtype expected)."""
    if isinstance(tensor, Tensor) and tensor.is_floating_point() and tensor.dtype != torch.float64:
        return tensor.to(dtype)
    return tensor


def _packed_from_padded(output: Tensor, template: PackedSequence) -> PackedSequence:
    """Packs ``output`` (T, B, F, original batch order) with exactly ``template``'s layout."""
    batch_sizes = template.batch_sizes
    order = template.sorted_indices
    if order is None:
        order = torch.arange(output.shape[1], device=output.device)
    order = order.to(output.device)
    steps = torch.repeat_interleave(torch.arange(len(batch_sizes)), batch_sizes).to(output.device)
    offsets = torch.cat([torch.arange(int(n)) for n in batch_sizes]).to(output.device)
    data = output[steps, order[offsets]]
    return PackedSequence(data, batch_sizes, template.sorted_indices, template.unsorted_indices)


# What layer norm over H features (an RNN's projections, an LSTM's cell) leaves of the layer at H = 1;
# the GRU's norms span 3H and the LSTM's projections' 4H, which one unit leaves meaningful.
_ONE_UNIT_LAYER_NORM = {
    "rnn": "the pre-activation is b_ih + b_hh whatever x and h, and no gradient reaches them",
    "lstm": "the cell's norm is its shift, h_t = o_t tanh(cell_norm_bias), and c_t no longer reaches h_t",
}


class _NormRNNBase(nn.Module):
    cell: str = ""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 norm: Optional[str] = None, momentum: Optional[float] = 0.1, eps: float = 1e-5, max_steps: int = 100,
                 backend: str = "auto", gamma_init: Optional[float] = None, nonlinearity: Optional[str] = None,
                 device=None, dtype=None, proj_size: int = 0):
        super().__init__()
        check_constructor(input_size, hidden_size, num_layers, dropout, norm, momentum, eps, max_steps,
                          backend, nonlinearity, proj_size)
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout acts between layers, so with num_layers=1 it does nothing "
                          f"(dropout={dropout})", UserWarning, stacklevel=3)
        if norm == "layer" and hidden_size == 1 and self.cell in _ONE_UNIT_LAYER_NORM:
            warnings.warn("norm='layer' with hidden_size=1 normalizes a single value, which is always 0: "
                          f"{_ONE_UNIT_LAYER_NORM[self.cell]}", UserWarning, stacklevel=3)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.proj_size = proj_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.norm = norm
        self.momentum = None if momentum is None else float(momentum)
        self.eps = float(eps)
        self.max_steps = max_steps
        self.backend = backend
        self.nonlinearity = nonlinearity
        self.gamma_init = _DEFAULT_GAMMA.get(norm, 1.0) if gamma_init is None else float(gamma_init)
        dispatch.preload(backend)
        factory = {"device": device, "dtype": dtype}
        gates = CELL_GATES[self.cell] * hidden_size
        directions = 2 if bidirectional else 1
        state_size = self.state_size
        self._suffixes: List[str] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else state_size * directions
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                self._suffixes.append(suffix)
                self.register_parameter("weight_ih" + suffix, nn.Parameter(torch.empty(gates, layer_input, **factory)))
                self.register_parameter("weight_hh" + suffix, nn.Parameter(torch.empty(gates, state_size, **factory)))
                if bias:
                    self.register_parameter("bias_ih" + suffix, nn.Parameter(torch.empty(gates, **factory)))
                    self.register_parameter("bias_hh" + suffix, nn.Parameter(torch.empty(gates, **factory)))
                if proj_size:  # after the biases, where torch's all_weights lists it
                    self.register_parameter("weight_hr" + suffix,
                                            nn.Parameter(torch.empty(proj_size, hidden_size, **factory)))
                self._register_norm(suffix, gates, factory)
        self.reset_parameters()

    @property
    def state_size(self) -> int:
        """The width of h (and of each direction's output): ``proj_size`` where the LSTM projects
        its output, else ``hidden_size``."""
        return self.proj_size or self.hidden_size

    def _register_norm(self, suffix: str, gates: int, factory) -> None:
        if self.norm is None:
            return
        stats = {"device": factory["device"], "dtype": torch.float32}
        self.register_parameter("ih_norm_weight" + suffix, nn.Parameter(torch.empty(gates, **factory)))
        if self.momentum is None and self.norm in ("batch", "seqbatch"):
            self._register_update_counts(suffix, factory["device"])
        if self.norm == "seqbatch":
            self.register_buffer("ih_running_mean" + suffix, torch.zeros(gates, **stats))
            self.register_buffer("ih_running_var" + suffix, torch.ones(gates, **stats))
            return
        self.register_parameter("hh_norm_weight" + suffix, nn.Parameter(torch.empty(gates, **factory)))
        if self.cell == "lstm":
            self.register_parameter("cell_norm_weight" + suffix, nn.Parameter(torch.empty(self.hidden_size, **factory)))
            self.register_parameter("cell_norm_bias" + suffix, nn.Parameter(torch.empty(self.hidden_size, **factory)))
        if self.norm == "batch":
            names = [("ih", gates), ("hh", gates)] + ([("cell", self.hidden_size)] if self.cell == "lstm" else [])
            for which, features in names:
                self.register_buffer(f"{which}_running_mean{suffix}", torch.zeros(self.max_steps, features, **stats))
                self.register_buffer(f"{which}_running_var{suffix}", torch.ones(self.max_steps, features, **stats))

    def _register_update_counts(self, suffix: str, device) -> None:
        """The updates each slot has had, which its cumulative average weighs (``momentum=None``,
        normrnn.cumulative): (max_steps,) for per-timestep batch norm, one for sequence-wise."""
        shape = (self.max_steps,) if self.norm == "batch" else ()
        self.register_buffer("num_batches_tracked" + suffix, torch.zeros(shape, dtype=torch.long, device=device))

    def reset_parameters(self) -> None:
        """Weights and biases uniform in +-1/sqrt(hidden_size) as in torch; gains ``gamma_init``,
        shifts 0; running means 0 and variances 1."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, parameter in self.named_parameters():
            if "norm_weight" in name:
                nn.init.constant_(parameter, self.gamma_init)
            elif "norm_bias" in name:
                nn.init.zeros_(parameter)
            else:
                nn.init.uniform_(parameter, -bound, bound)
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        """Sets every running statistic to its init, as ``nn.BatchNorm1d.reset_running_stats``
        does: running means to 0, running variances to 1 (every timestep slot), and the update
        counts of ``momentum=None`` to 0."""
        for name, buffer in self.named_buffers():
            if "running_mean" in name:
                buffer.zero_()
            elif "running_var" in name:
                buffer.fill_(1.0)
            elif "num_batches_tracked" in name:
                buffer.zero_()

    def flatten_parameters(self) -> None:
        """Does nothing: ``nn.LSTM`` packs its weights into one buffer for cuDNN, while normrnn's
        backends read the parameters as they are. Here so that code written for torch's modules,
        which calls it (after ``DataParallel`` replicates them, or in ``forward``), runs unchanged."""

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        """The parameters of each layer and direction in order, as ``nn.LSTM.all_weights`` lists
        them (weight_ih, weight_hh, bias_ih, bias_hh, and weight_hr with proj_size), followed by
        that direction's norm gains and shifts."""
        return [[parameter for name, parameter in self.named_parameters() if name.endswith(suffix)]
                for suffix in self._suffixes]

    def _apply(self, fn, *args, **kwargs):
        # Population statistics are sums of many small updates; in 16-bit they would stall.
        result = super()._apply(fn, *args, **kwargs)
        for name, buffer in list(self._buffers.items()):
            if buffer is not None and "running_" in name and buffer.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = buffer.float()
        return result

    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The dtype ``torch.autocast`` makes this layer compute in, or None where it leaves the
        layer in its parameters' dtype (autocast off on their device, float64 parameters, or
        parameters already in the autocast dtype)."""
        weight = self.weight_hh_l0
        device_type = weight.device.type
        if weight.dtype == torch.float64 or not torch.is_autocast_enabled(device_type):
            return None
        dtype = torch.get_autocast_dtype(device_type)
        return None if dtype == weight.dtype else dtype

    def direction_params(self, suffix: str, dtype: Optional[torch.dtype] = None,
                         first_step: int = 0) -> DirectionParams:
        """The parameters and running statistics of one layer and direction; with ``dtype`` the
        parameters cast to it (differentiably: their gradients come back in their own dtype) and
        the running statistics as they are (float32, updated in place). With ``first_step`` the
        per-timestep running statistics (norm="batch") are the view that starts at slot
        ``min(first_step, max_steps - 1)``: every backend takes step t's slot as
        ``min(t, rows - 1)`` of the rows it is given, which on the view is slot
        ``min(first_step + t, max_steps - 1)`` of the buffer."""
        first_slot = min(first_step, self.max_steps - 1)

        def get(name):
            value = getattr(self, name + suffix, None)
            if dtype is not None and isinstance(value, nn.Parameter):
                return value.to(dtype)
            if first_slot and value is not None and "running_" in name and self.norm == "batch":
                return value[first_slot:]
            return value
        return DirectionParams(
            get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"),
            get("ih_norm_weight"), get("hh_norm_weight"), get("cell_norm_weight"), get("cell_norm_bias"),
            get("ih_running_mean"), get("ih_running_var"), get("hh_running_mean"), get("hh_running_var"),
            get("cell_running_mean"), get("cell_running_var"), get("weight_hr"))

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            text += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        if not self.bias:
            text += ", bias=False"
        if self.batch_first:
            text += ", batch_first=True"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.bidirectional:
            text += ", bidirectional=True"
        text += f", norm={self.norm!r}"
        if self.norm in ("batch", "seqbatch"):
            text += f", momentum={self.momentum}, max_steps={self.max_steps}"
        if self.cell == "rnn":
            text += f", nonlinearity={self.nonlinearity!r}"
        return text + f", backend={self.backend!r}"

    # ----------------------------------------------------------------------------------- forward
    def _initial_state(self, hx, batch: int, unbatched: bool, dtype, device) -> Tuple[Tensor, ...]:
        directions = 2 if self.bidirectional else 1
        names = ("hx[0] (h_0)", "hx[1] (c_0)") if self.cell == "lstm" else ("hx",)
        # h has proj_size features where the LSTM projects its output, c always hidden_size
        widths = (self.state_size, self.hidden_size)
        width_names = ("proj_size" if self.proj_size else "hidden_size", "hidden_size")
        shapes = [(self.num_layers * directions, batch, width) for width in widths[:len(names)]]
        if hx is None:
            return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape in shapes)
        if self.cell == "lstm":
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError("hx must be a tuple (h_0, c_0) for LSTM, got "
                                f"{type(hx).__name__}")
            states = tuple(hx)
        else:
            states = (hx,)
        checked = []
        for name, state, shape, width_name in zip(names, states, shapes, width_names):
            expected = shape[:1] + shape[2:] if unbatched else shape
            check_state(name, state, expected, dtype, device, width_name)
            checked.append(state.unsqueeze(1) if unbatched else state)
        return tuple(checked)

    def forward(self, input: Union[Tensor, PackedSequence], hx=None,
                lengths: Union[Tensor, Sequence[int], None] = None, first_step: int = 0):
        """Runs the layers over ``input`` and returns what the torch module returns:
        ``output, h_n`` (GRU, RNN) or ``output, (h_n, c_n)`` (LSTM).

        ``input`` is (T, B, input_size), (B, T, input_size) with ``batch_first``, (T, input_size)
        for one unbatched sequence, or a PackedSequence (the output is then packed too). The output
        has ``state_size`` features per direction (``proj_size`` for a projecting LSTM, else
        ``hidden_size``), as have h_0 and h_n; c_0 and c_n have ``hidden_size``.
        ``lengths`` (B,) marks padding: positions past a sequence's length take no part in any
        statistic, do not change the state, and produce zero output; ``h_n``/``c_n`` are taken at
        each sequence's own last step.

        ``first_step`` is the time index, within its sequences, of ``input``'s first step (default
        0). Where sequences are fed in pieces with the state carried in ``hx`` (truncated
        backpropagation through time, or one step at a time when generating), per-timestep batch
        norm then normalizes piece step t as step ``first_step + t``: the running statistics of
        slot ``min(first_step + t, max_steps - 1)`` in evaluation, and that slot's update in
        training, so that the pieces compute what the whole sequence computes. The other norms
        have no per-step statistics and compute the same for any ``first_step``. A bidirectional
        layer takes only 0: its reverse direction starts at each sequence's end. Under
        ``torch.compile`` the value is a constant of the graph (one compile per value; all values
        from ``max_steps - 1`` on compute the same, so passing ``min(first_step, max_steps - 1)``
        bounds the compiles).
        """
        first_step = check_first_step(first_step, self.bidirectional)
        reference = self.weight_hh_l0
        compute_dtype = self.autocast_dtype()
        if compute_dtype is None:
            dtype, dtype_source = reference.dtype, "the dtype of the layer's parameters"
        else:
            dtype, dtype_source = compute_dtype, f"torch.autocast's dtype; the layer's parameters are {reference.dtype}"
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("lengths must be None when input is a PackedSequence (it carries its own)")
            template = input
            data = input.data if compute_dtype is None else _autocast_lowered(input.data, compute_dtype)
            check_input(data.unsqueeze(0), self.input_size, dtype, reference.device, dtype_source)
            input, lengths = pad_packed_sequence(
                PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), batch_first=False)
            unbatched = False
        else:
            if compute_dtype is not None:
                input = _autocast_lowered(input, compute_dtype)
            check_input(input, self.input_size, dtype, reference.device, dtype_source)
            unbatched = input.dim() == 2
            if unbatched:
                input = input.unsqueeze(1)
            elif self.batch_first:
                input = input.transpose(0, 1)
        steps, batch = input.shape[0], input.shape[1]
        lengths = check_lengths(lengths, batch, steps)
        if self.training and self.norm == "batch" and batch < 2:
            raise ValueError("input: norm='batch' in training needs a batch of at least 2 sequences "
                             "(batch statistics of one sample do not exist); got a batch of one. "
                             "Use eval(), a larger batch, or norm='layer'")
        padding = Padding.from_lengths(lengths, steps, batch, input.device)
        if self.training and self.norm == "seqbatch":
            message = ("input: norm='seqbatch' in training needs at least 2 real positions (timesteps x sequences) "
                       "for its statistics; got 1")
            total = padding.total
            if isinstance(total, Tensor):  # traced: checked when the graph runs
                torch._assert_async(total >= 2, message)
            elif total < 2:
                raise ValueError(message)
        if compute_dtype is not None and hx is not None:
            hx = tuple(_autocast_lowered(state, compute_dtype) for state in hx) \
                if isinstance(hx, (tuple, list)) else _autocast_lowered(hx, compute_dtype)
        initial = self._initial_state(hx, batch, unbatched, input.dtype, input.device)
        if compute_dtype is None:
            output, final = self._run_layers(input, initial, padding, first_step=first_step)
        else:
            with torch.autocast(reference.device.type, enabled=False):
                output, final = self._run_layers(input, initial, padding, compute_dtype, first_step)
        if packed:
            return _packed_from_padded(output, template), self._format_state(final)
        if unbatched:
            output = output.squeeze(1)
            final = tuple(state.squeeze(1) for state in final)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, self._format_state(final)

    def _format_state(self, final: Tuple[Tensor, ...]):
        return (final[0], final[1]) if self.cell == "lstm" else final[0]

    def _run_layers(self, x: Tensor, initial: Tuple[Tensor, ...], padding: Padding,
                    dtype: Optional[torch.dtype] = None, first_step: int = 0):
        directions = 2 if self.bidirectional else 1
        finals: List[List[Tensor]] = [[] for _ in initial]
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                suffix = self._suffixes[index]
                state = tuple(s[index] for s in initial)
                source = reverse_within_lengths(x, padding) if direction else x
                params = self.direction_params(suffix, dtype, first_step)
                momentum, fold = self.momentum, None
                if momentum is None:
                    if self.training and self.norm in ("batch", "seqbatch"):
                        params, fold = with_scratch_statistics(params, self.norm,
                                                               self._update_counts(suffix, first_step), padding)
                        momentum = 1.0
                    else:  # nothing is updated (evaluation, or no running statistics)
                        momentum = 0.0
                out, final = dispatch.run_direction(
                    self.backend, self.cell, self.norm, source, state, params, padding,
                    self.training, momentum, self.eps, self.nonlinearity)
                if fold is not None:
                    fold()
                outputs.append(reverse_within_lengths(out, padding) if direction else out)
                for collected, value in zip(finals, final):
                    collected.append(value)
            x = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, tuple(torch.stack(collected) for collected in finals)

    def _update_counts(self, suffix: str, first_step: int) -> Tensor:
        """The count of updates per slot (``momentum=None``), from ``first_step``'s slot on. Where
        ``momentum`` was set to None after the layer was built, the counts begin now, at zero: the
        next update of each slot replaces what it held (re-estimating a trained layer's statistics)."""
        counts = getattr(self, "num_batches_tracked" + suffix, None)
        if counts is None:
            if torch.compiler.is_compiling():
                raise ValueError("momentum=None was set after the layer was built, and a compiled graph cannot add "
                                 "the counts of updates it needs: build the layer with momentum=None, or run it "
                                 "once eagerly first")
            for each in self._suffixes:
                self._register_update_counts(each, self.weight_hh_l0.device)
            counts = getattr(self, "num_batches_tracked" + suffix)
        return counts[min(first_step, self.max_steps - 1):] if self.norm == "batch" else counts

    # ------------------------------------------------------------------------------ conversion
    @classmethod
    def from_torch(cls, module: nn.RNNBase, **kwargs):
        """A layer with the configuration and weights of ``module`` (a ``torch.nn`` LSTM, GRU or
        RNN of the same kind), plus ``norm`` and any other constructor argument in ``kwargs``
        (``LSTM.from_torch(m, norm="batch")``). Normalization parameters start at their initial
        values."""
        expected = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cls.cell]
        if not isinstance(module, expected):
            raise TypeError(f"module must be a torch.nn.{expected.__name__}, got {type(module).__name__}")
        config = dict(input_size=module.input_size, hidden_size=module.hidden_size,
                      num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                      dropout=module.dropout, bidirectional=module.bidirectional)
        if cls.cell == "rnn":
            config["nonlinearity"] = module.nonlinearity
        if cls.cell == "lstm":
            config["proj_size"] = module.proj_size
        config.update(kwargs)
        weight = module.weight_hh_l0
        layer = cls(**config, device=weight.device, dtype=weight.dtype)
        missing, unexpected = layer.load_state_dict(module.state_dict(), strict=False)
        assert not unexpected, unexpected
        return layer

    def to_torch(self) -> nn.RNNBase:
        """The ``torch.nn`` LSTM, GRU or RNN (cuDNN on a GPU) with this layer's configuration and
        weights, which computes what the layer computes: the inverse of ``from_torch``, for a layer
        with ``norm=None`` (torch's modules have no normalization) and, for the RNN, tanh or relu."""
        if self.norm is not None:
            raise ValueError(f"norm={self.norm!r}: torch's modules have no normalization (to_torch needs norm=None)")
        config = dict(input_size=self.input_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                      bias=self.bias, batch_first=self.batch_first, dropout=self.dropout,
                      bidirectional=self.bidirectional)
        if self.cell == "rnn":
            if self.nonlinearity is None:
                raise ValueError("nonlinearity=None: torch's RNN takes 'tanh' or 'relu'")
            config["nonlinearity"] = self.nonlinearity
        if self.proj_size:
            config["proj_size"] = self.proj_size
        weight = self.weight_hh_l0
        with warnings.catch_warnings():  # this layer warned already of dropout with one layer
            warnings.simplefilter("ignore")
            module = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[self.cell](**config, device=weight.device,
                                                                               dtype=weight.dtype)
        module.load_state_dict(self.state_dict())
        module.train(self.training)
        return module


class LSTM(_NormRNNBase):
    r"""LSTM with optional normalization (see ``normrnn.reference.lstm`` for the equations).

    .. math::
        z_t = N_{hh}(W_{hh} h_{t-1}) + N_{ih}(W_{ih} x_t) + b_{ih} + b_{hh},\quad
        c_t = \sigma(z_f) c_{t-1} + \sigma(z_i)\tanh(z_g),\quad
        h_t = \sigma(z_o)\tanh(N_{cell}(c_t))

    ``proj_size`` P > 0 projects the output as ``torch.nn.LSTM`` does (Sak et al. 2014, LSTMP):
    :math:`h_t = W_{hr}(\sigma(z_o)\tanh(N_{cell}(c_t)))` with ``weight_hr_l{k}`` (P, hidden_size),
    so h_t, the output and h_n have P features (``weight_hh`` is (4H, P)) and the cell keeps H;
    the normalizations are those of the LSTM without it (N_hh normalizes W_hh h_{t-1} over its 4H
    gate features, N_cell the H cells). Every backend runs it (the Triton kernels recur on
    r_t = o_t tanh(N_cell(c_t)) with W_hh W_hr: ``normrnn/triton_lstm.py``).
    """
    cell = "lstm"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 norm: Optional[str] = None, momentum: Optional[float] = 0.1, eps: float = 1e-5, max_steps: int = 100,
                 backend: str = "auto", gamma_init: Optional[float] = None, device=None, dtype=None,
                 proj_size: int = 0):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, norm,
                         momentum, eps, max_steps, backend, gamma_init, None, device, dtype, proj_size)


class GRU(_NormRNNBase):
    r"""GRU with optional normalization (see ``normrnn.reference.gru`` for the equations).

    .. math::
        a_t = N_{ih}(W_{ih} x_t) + b_{ih},\ u_t = N_{hh}(W_{hh} h_{t-1}) + b_{hh},\quad
        r, z = \sigma(a_{r,z} + u_{r,z}),\ n = \tanh(a_n + r u_n),\quad h_t = (1 - z) n + z h_{t-1}
    """
    cell = "gru"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 norm: Optional[str] = None, momentum: Optional[float] = 0.1, eps: float = 1e-5, max_steps: int = 100,
                 backend: str = "auto", gamma_init: Optional[float] = None, device=None, dtype=None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, norm,
                         momentum, eps, max_steps, backend, gamma_init, None, device, dtype)


class RNN(_NormRNNBase):
    r"""Vanilla RNN with optional normalization (see ``normrnn.reference.rnn``).

    .. math::
        h_t = \mathrm{act}(N_{ih}(W_{ih} x_t) + N_{hh}(W_{hh} h_{t-1}) + b_{ih} + b_{hh})

    ``nonlinearity`` is "tanh", "relu" or None (identity): ``RNN(norm="batch", nonlinearity=None,
    bias=False)`` puts batch norm in place of tanh and the bias.
    """
    cell = "rnn"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: Optional[str] = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 norm: Optional[str] = None, momentum: Optional[float] = 0.1, eps: float = 1e-5, max_steps: int = 100,
                 backend: str = "auto", gamma_init: Optional[float] = None, device=None, dtype=None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, norm,
                         momentum, eps, max_steps, backend, gamma_init, nonlinearity, device, dtype)


def _alias(base, norm: str, doc: str):
    class Alias(base):
        __doc__ = doc + "\n\n" + (base.__doc__ or "")

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("norm", norm)
            super().__init__(*args, **kwargs)
    Alias.__name__ = Alias.__qualname__ = ("BN" if norm == "batch" else "LN") + base.__name__
    return Alias


BNLSTM = _alias(LSTM, "batch", "LSTM with per-timestep batch norm (Cooijmans et al. 2016): ``LSTM(norm='batch')``.")
LNLSTM = _alias(LSTM, "layer", "LSTM with layer norm (Ba et al. 2016): ``LSTM(norm='layer')``.")
BNGRU = _alias(GRU, "batch", "GRU with per-timestep batch norm: ``GRU(norm='batch')``.")
LNGRU = _alias(GRU, "layer", "GRU with layer norm: ``GRU(norm='layer')``.")
BNRNN = _alias(RNN, "batch", "Vanilla RNN with per-timestep batch norm: ``RNN(norm='batch')``.")
LNRNN = _alias(RNN, "layer", "Vanilla RNN with layer norm: ``RNN(norm='layer')``.")
