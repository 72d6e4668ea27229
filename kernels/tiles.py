"""Pieces of the step functions that every fused cell shares: tanh, which rows and hidden units a
program owns, the rows of W_hh a persistent kernel keeps on chip and the recurrent product in the
precision the cell chose, which rows are still running, how the GRU and the RNN store h_t, the
backward's one cross-program read, dL/dh_{t} = sum over gates of dwh_{t+1}[:, gate] W_hh[gate, :, units],
the grid barrier of the persistent kernels, and the layout of the per-step statistics the backward
reads."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh(x) = 2 sigmoid(2x) - 1: triton.language has a sigmoid but no tanh (only the backends'
    libdevice has one), and this runs the same compiled and in the interpreter."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def step_offset(index, size):
    """index * size in 64-bit arithmetic: where step (or statistics slot) ``index`` of a tensor of
    ``size`` elements a step begins. In 32 bits it wraps once the tensor passes 2^31 elements: a
    (T, B, 4H) projection does at T=1025 for B=256, H=2048, or T=513 for B=512. Added to the base
    pointer before the tile's offsets (``ptr + step_offset(t, size) + offsets``), it moves a scalar
    pointer, and the tile's offsets stay 32-bit vectors (what it costs in registers, compiled for
    sm_90: ``docs/kernels.md``, "Offsets past 2^31 elements")."""
    return tl.cast(index, tl.int64) * size


@triton.jit
def program_tile(pid, B, H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rows (grid axis 1 tiles the batch) and hidden units (grid axis 0) of this program, masked."""
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    return rows, units, rows < B, units < H


@triton.jit
def weight_rows(w_hh_ptr, gate, units, unit_mask, H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows gate * H + ``units`` of W_hh (gates * H, H), all of K in one (BLOCK_H, BLOCK_K) tile:
    what a persistent kernel with resident weights loads once, before its step loop."""
    ks = tl.arange(0, BLOCK_K)
    return tl.load(w_hh_ptr + gate * H * H + units[:, None] * H + ks[None, :],
                   mask=unit_mask[:, None] & (ks < H)[None, :], other=0.0)


@triton.jit
def state_columns(h_ptr, t, rows, row_mask, B, H: tl.constexpr, k0, BLOCK_K: tl.constexpr):
    """Columns k0 .. k0 + BLOCK_K of h_{t-1} (row t of h, (T+1, B, H)) for the program's rows, the
    operand of the recurrent product. Other programs wrote it: it is read past L1, which is not
    coherent across SMs."""
    ks = k0 + tl.arange(0, BLOCK_K)
    return tl.load(h_ptr + step_offset(t, B * H) + rows[:, None] * H + ks[None, :],
                   mask=row_mask[:, None] & (ks < H)[None, :], other=0.0, cache_modifier=".cg")


@triton.jit
def recurrent_product(h_tile, w_rows, DOT_PRECISION: tl.constexpr):
    """h_tile (BLOCK_B, K) times ``w_rows`` (BLOCK_H, K, rows of W_hh) transposed, in float32:
    "native" multiplies in the weights' 16-bit dtype (h rounded to it), "ieee" and "tf32x3" in
    float32 with that input precision (``dot_precision``)."""
    if DOT_PRECISION != "native":
        product = tl.dot(h_tile.to(tl.float32), tl.trans(w_rows).to(tl.float32), input_precision=DOT_PRECISION)
    else:
        product = tl.dot(h_tile.to(w_rows.dtype), tl.trans(w_rows))
    return product


@triton.jit
def row_active(t, rows, row_mask, lengths_ptr, HAS_LENGTHS: tl.constexpr):
    """Which rows run at step t (a sequence of length L runs steps 0..L-1)."""
    active = row_mask
    if HAS_LENGTHS:
        lengths = tl.load(lengths_ptr + rows, mask=row_mask, other=0)
        active = row_mask & (t < lengths)
    return active


@triton.jit
def row_activity(t, steps, rows, row_mask, lengths_ptr, HAS_LENGTHS: tl.constexpr):
    """Which rows run at step t and at step t + 1 (a sequence of length L runs steps 0..L-1)."""
    if HAS_LENGTHS:
        lengths = tl.load(lengths_ptr + rows, mask=row_mask, other=0)
        active = row_mask & (t < lengths)
        active_next = row_mask & (t + 1 < lengths)
    else:
        active = row_mask
        active_next = row_mask & (t + 1 < steps)
    return active, active_next


@triton.jit
def store_hidden_state(h_ptr, h_operand_ptr, out_ptr, t, B, H: tl.constexpr, state_offsets, tile_mask, active, h_new,
                       h_prev, OPERAND_COPY: tl.constexpr):
    """The GRU's and RNN's step ends: h_t = h_new where the row is still running and h_{t-1} where
    its sequence has ended (row t + 1 of h, and of its rounded copy ``h_operand`` where the
    recurrent product reads one: ``OPERAND_COPY``), and the output h_new, zero past the end."""
    keep = active[:, None]
    h_next = tl.where(keep, h_new, h_prev)
    tl.store(h_ptr + step_offset(t + 1, B * H) + state_offsets, h_next.to(h_ptr.dtype.element_ty), mask=tile_mask)
    if OPERAND_COPY:
        tl.store(h_operand_ptr + step_offset(t + 1, B * H) + state_offsets, h_next.to(h_operand_ptr.dtype.element_ty),
                 mask=tile_mask)
    tl.store(out_ptr + step_offset(t, B * H) + state_offsets, tl.where(keep, h_new, 0.0).to(out_ptr.dtype.element_ty),
             mask=tile_mask)


@triton.jit
def recurrent_gradient(grad_ptr, w_hh_ptr, t, rows, units, row_mask, unit_mask, B, H: tl.constexpr,
                       GATES: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """dwh_t (T, B, GATES * H; float32, or already rounded to the weights' dtype) times W_hh
    (GATES * H, H) for the program's rows and units.

    dwh_t was written by every program: it is read past L1, which is not coherent across SMs."""
    result = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    grad_step = grad_ptr + step_offset(t, B * GATES * H)
    for gate in range(GATES):
        result = add_gate_gradient_product(result, grad_step, GATES * H, gate * H, w_hh_ptr, gate, rows, units,
                                           row_mask, unit_mask, H, DOT_PRECISION, BLOCK_K)
    return result


@triton.jit
def add_gate_gradient_product(result, grad_step_ptr, row_stride, first_column, w_hh_ptr, gate, rows, units, row_mask,
                              unit_mask, H: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """result + g W_hh[gate * H:(gate + 1) * H, units], for the gradient g of one gate: the H columns
    from ``first_column`` of the program's rows of a step's buffer (at ``grad_step_ptr``, rows
    ``row_stride`` elements apart). A cell whose dwh lies in more than one buffer gathers its
    product gate by gate.

    g was written by every program: it is read past L1, which is not coherent across SMs."""
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        grad_tile = tl.load(grad_step_ptr + rows[:, None] * row_stride + first_column + ks[None, :],
                            mask=row_mask[:, None] & k_mask[None, :], other=0.0, cache_modifier=".cg")
        w_tile = tl.load(w_hh_ptr + (gate * H + ks[:, None]) * H + units[None, :],
                         mask=k_mask[:, None] & unit_mask[None, :], other=0.0)
        if DOT_PRECISION != "native":
            result += tl.dot(grad_tile.to(tl.float32), w_tile.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            result += tl.dot(grad_tile.to(w_tile.dtype), w_tile)
    return result


@triton.jit
def grid_barrier(barrier_ptr, arrivals):
    """Every thread's stores finish, one release add on a counter, then acquire reads until
    ``arrivals`` programs have arrived (the counter only grows: arrivals = calls so far x grid)."""
    tl.debug_barrier()
    tl.atomic_add(barrier_ptr, 1, sem="release")
    arrived = tl.atomic_add(barrier_ptr, 0, sem="acquire")
    while arrived < arrivals:
        arrived = tl.atomic_add(barrier_ptr, 0, sem="acquire")


@triton.jit
def store_step_statistics(stats_ptr, t, index, mean, rstd, mask, FEATURES):
    """Step t's (mean, rstd) at ``index`` of a (T, 2, FEATURES) buffer: row 0 the mean, row 1 the
    rstd (features are columns for batch norm, rows of the batch for layer norm)."""
    step = stats_ptr + step_offset(t, 2 * FEATURES)
    tl.store(step + index, mean, mask=mask)
    tl.store(step + FEATURES + index, rstd, mask=mask)


@triton.jit
def load_step_statistics(stats_ptr, t, index, mask, FEATURES):
    """Step t's (mean, rstd) at ``index`` of a (T, 2, FEATURES) buffer (``store_step_statistics``)."""
    step = stats_ptr + step_offset(t, 2 * FEATURES)
    return tl.load(step + index, mask=mask, other=0.0), tl.load(step + FEATURES + index, mask=mask, other=0.0)
