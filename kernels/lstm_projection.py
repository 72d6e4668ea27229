"""The LSTM's recurrent projection h_{t-1} W_hh^T for the four gates (i, f, g, o) of a program's
hidden units, shared by its forward kernels (``lstm_forward.py``, ``lstm_layer_norm_forward.py``):
from W_hh's rows held on chip for the whole sequence by a persistent kernel, or streamed from
memory in K tiles every step; at step 0 plus a product given outright (``HAS_INITIAL``), which
is how the LSTM with an output projection starts from its h_0 (``normrnn/triton_lstm.py``)."""
from __future__ import annotations

import triton
import triton.language as tl

from .tiles import program_tile, recurrent_product, state_columns, weight_rows


@triton.jit
def load_recurrent_weights(pid, w_hh_ptr, B, H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr):
    """With ``RESIDENT``: the rows of W_hh of program ``pid``'s units, all of K in one
    (BLOCK_H, BLOCK_K) tile per gate (i, f, g, o), for a persistent kernel to load before its step
    loop. Without: four placeholders, as ``recurrent_projection`` then streams W_hh itself."""
    # one return after a constexpr branch: Triton types every return statement of a function,
    # also one in a branch it does not compile, and an early return of placeholders would clash
    if RESIDENT:
        _, units, _, unit_mask = program_tile(pid, B, H, BLOCK_B, BLOCK_H)
        w_i = weight_rows(w_hh_ptr, 0, units, unit_mask, H, BLOCK_K)
        w_f = weight_rows(w_hh_ptr, 1, units, unit_mask, H, BLOCK_K)
        w_g = weight_rows(w_hh_ptr, 2, units, unit_mask, H, BLOCK_K)
        w_o = weight_rows(w_hh_ptr, 3, units, unit_mask, H, BLOCK_K)
    else:
        w_i, w_f, w_g, w_o = 0, 0, 0, 0
    return w_i, w_f, w_g, w_o


@triton.jit
def _resident_projection(t, h_ptr, w_i, w_f, w_g, w_o, rows, row_mask, B, H: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """h_{t-1} W_hh^T with the weights of ``load_recurrent_weights``, all of K in one tile.
    Loaded before the persistent kernel's loop, they are loop-invariant: Triton 3.6 and 3.9 hoist
    their copy into shared memory out of the loop (see the compile report), so W_hh is read from
    global memory once per launch instead of once per step."""
    h_tile = state_columns(h_ptr, t, rows, row_mask, B, H, 0, BLOCK_K)
    acc_i = recurrent_product(h_tile, w_i, DOT_PRECISION)
    acc_f = recurrent_product(h_tile, w_f, DOT_PRECISION)
    acc_g = recurrent_product(h_tile, w_g, DOT_PRECISION)
    acc_o = recurrent_product(h_tile, w_o, DOT_PRECISION)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def recurrent_projection(t, h_ptr, w_hh_ptr, rows, units, row_mask, unit_mask, B, H: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_K: tl.constexpr, w_i, w_f, w_g, w_o, RESIDENT: tl.constexpr, initial_ptr,
                         HAS_INITIAL: tl.constexpr):
    """h_{t-1} W_hh^T for the four gates (i, f, g, o) of the program's units: with ``RESIDENT``,
    from the weight tiles ``w_*`` the persistent kernel loaded once; otherwise W_hh is streamed
    from memory in K tiles (the ``w_*`` are unused). h_{t-1} (row t of h) was written by other
    programs: it is read past L1, which is not coherent across SMs. With ``HAS_INITIAL``, step 0
    adds the float32 (B, 4H) product at ``initial_ptr`` (see ``_add_initial_product``)."""
    if RESIDENT:
        acc_i, acc_f, acc_g, acc_o = _resident_projection(t, h_ptr, w_i, w_f, w_g, w_o, rows, row_mask, B, H,
                                                          DOT_PRECISION, BLOCK_K)
    else:
        acc_i, acc_f, acc_g, acc_o = _streamed_projection(t, h_ptr, w_hh_ptr, rows, units, row_mask, unit_mask, B,
                                                          H, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    if HAS_INITIAL:
        acc_i, acc_f, acc_g, acc_o = _add_initial_product(t, initial_ptr, rows, units, row_mask, unit_mask, B, H,
                                                          acc_i, acc_f, acc_g, acc_o)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _add_initial_product(t, initial_ptr, rows, units, row_mask, unit_mask, B, H: tl.constexpr, acc_i, acc_f, acc_g,
                         acc_o):
    """At step 0, the four gates' columns of the (B, 4H) product at ``initial_ptr`` added to the
    recurrent product; at every other step nothing. The projecting LSTM runs its state
    r_t = o_t * tanh(N_c(c_t)) through the kernels with W_hh W_hr in place of W_hh and r_{-1} = 0:
    its first product, h_{-1} W_hh^T of the given h_{-1}, comes this way, and 0 + p is p exactly."""
    if t == 0:
        mask = row_mask[:, None] & unit_mask[None, :]
        offsets = rows[:, None] * (4 * H) + units[None, :]
        acc_i += tl.load(initial_ptr + offsets, mask=mask, other=0.0)
        acc_f += tl.load(initial_ptr + offsets + H, mask=mask, other=0.0)
        acc_g += tl.load(initial_ptr + offsets + 2 * H, mask=mask, other=0.0)
        acc_o += tl.load(initial_ptr + offsets + 3 * H, mask=mask, other=0.0)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _streamed_projection(t, h_ptr, w_hh_ptr, rows, units, row_mask, unit_mask, B, H: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """h_{t-1} W_hh^T with W_hh read from memory in K tiles."""
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        h_tile = state_columns(h_ptr, t, rows, row_mask, B, H, k0, BLOCK_K)
        # one set of offsets for all gates: loaded through tiles.weight_rows (offsets of its own per
        # gate) the step kernels took more registers on sm_90 (Triton 3.9: the GRU's float32 one 138, from 74)
        w_offsets = units[:, None] * H + ks[None, :]
        w_mask = unit_mask[:, None] & k_mask[None, :]
        w_i = tl.load(w_hh_ptr + w_offsets, mask=w_mask, other=0.0)
        w_f = tl.load(w_hh_ptr + H * H + w_offsets, mask=w_mask, other=0.0)
        w_g = tl.load(w_hh_ptr + 2 * H * H + w_offsets, mask=w_mask, other=0.0)
        w_o = tl.load(w_hh_ptr + 3 * H * H + w_offsets, mask=w_mask, other=0.0)
        acc_i += recurrent_product(h_tile, w_i, DOT_PRECISION)
        acc_f += recurrent_product(h_tile, w_f, DOT_PRECISION)
        acc_g += recurrent_product(h_tile, w_g, DOT_PRECISION)
        acc_o += recurrent_product(h_tile, w_o, DOT_PRECISION)
    return acc_i, acc_f, acc_g, acc_o
