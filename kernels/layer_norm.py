"""Layer norm across programs (Ba et al. 2016), shared by every cell's kernels.

A sample's statistics span all of its features, which the programs own in blocks of BLOCK_H
hidden units (of every gate), so each program publishes per-row partials of its own columns to a
(programs, 2, B) buffer and, after the launch boundary or the grid barrier that orders them, every
program combines all of them in the same fixed order: deterministic, no float atomics.

Forward: each program's (mean, M2) of its columns, combined with Chan et al.'s formula (free of
the cancellation of a sum of squares):

    mean = sum_p n_p mean_p / N,   M2 = sum_p (M2_p + n_p (mean_p - mean)^2),   rstd = 1 / sqrt(M2 / N + eps)

Backward: the two row sums that dL/dv = rstd (g - mean(g) - v_hat mean(g v_hat)) needs, summed
over the programs' partial sums of g and g v_hat.

The buffer is written by other programs during the launch (in a persistent kernel, at the same
address every step): it is read past L1, which is not coherent across SMs and could hold last
step's values.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_row_partials(partial_ptr, pid, rows, row_mask, B, first, second):
    """Program ``pid``'s two per-row partials (mean and M2, or two partial sums) at partial_ptr[pid]."""
    tl.store(partial_ptr + pid * 2 * B + rows, first, mask=row_mask)
    tl.store(partial_ptr + pid * 2 * B + B + rows, second, mask=row_mask)


@triton.jit
def publish_row_statistics(value, valid_f, partial_ptr, pid, rows, row_mask, B, columns_owned):
    """Per-row mean and M2 of ``value`` over the program's valid columns, at partial_ptr[pid]."""
    mean = tl.sum(value * valid_f, axis=1) / columns_owned
    centered = (value - mean[:, None]) * valid_f
    store_row_partials(partial_ptr, pid, rows, row_mask, B, mean, tl.sum(centered * centered, axis=1))


@triton.jit
def combine_row_statistics(partial_ptr, rows, row_mask, B, programs, eps, H: tl.constexpr,
                           FEATURES_PER_UNIT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """Mean and rstd per row over all H * FEATURES_PER_UNIT features from the per-program
    (mean, M2): mean = sum n_p mean_p / N, M2 = sum (M2_p + n_p (mean_p - mean)^2)."""
    program_ids = tl.arange(0, BLOCK_P)
    program_mask = program_ids < programs
    owned = tl.minimum(H - program_ids * BLOCK_H, BLOCK_H) * FEATURES_PER_UNIT
    owned_f = tl.where(program_mask, owned, 0).to(tl.float32)[:, None]
    tile_mask = program_mask[:, None] & row_mask[None, :]
    offsets = program_ids[:, None] * 2 * B + rows[None, :]
    means = tl.load(partial_ptr + offsets, mask=tile_mask, other=0.0, cache_modifier=".cg")
    m2s = tl.load(partial_ptr + B + offsets, mask=tile_mask, other=0.0, cache_modifier=".cg")
    total = H * FEATURES_PER_UNIT
    mean = tl.sum(owned_f * means, axis=0) / total
    spread = means - mean[None, :]
    m2 = tl.sum(m2s + owned_f * spread * spread, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)
    return mean, rstd


@triton.jit
def sum_row_partials(partial_ptr, rows, row_mask, B, programs, BLOCK_P: tl.constexpr):
    """Row sums of the two per-program partial sums at partial_ptr (programs, 2, B), in a fixed order."""
    program_ids = tl.arange(0, BLOCK_P)
    tile_mask = (program_ids < programs)[:, None] & row_mask[None, :]
    offsets = program_ids[:, None] * 2 * B + rows[None, :]
    first = tl.sum(tl.load(partial_ptr + offsets, mask=tile_mask, other=0.0, cache_modifier=".cg"), axis=0)
    second = tl.sum(tl.load(partial_ptr + B + offsets, mask=tile_mask, other=0.0, cache_modifier=".cg"), axis=0)
    return first, second
