"""Per-timestep batch statistics of a program's columns inside the fused kernels, and their backward.

Under batch norm a program owns hidden units for the whole batch, so the statistics of its
columns never leave it. Over the active rows of step t (n of them), per column v:

    mean = sum v / n,   var = M2 / n with M2 = sum (v - mean)^2,   v_hat = (v - mean) / sqrt(var + eps)
    running <- (1 - momentum) running + momentum (mean, M2 / (n - 1))          (training)
    dL/dv = rstd (g - sum g / n - v_hat sum (g v_hat) / n),   g = dL/dv_hat     (batch statistics)

A batch of at most ``ROWS_PER_TILE`` rows is one tile a program holds at once: one pass
(``batch_statistics``, ``batch_norm_backward``). A larger one does not fit in registers (at B=512,
H=2048 the LSTM's kernels spilled 1.4 to 5 KB a thread on sm_90 with Triton 3.9, 9 KB with 3.6), so
the program walks it in chunks of that many rows, in several passes a step: the moments of each
chunk (its mean and M2) merged in chunk order with Chan, Golub and LeVeque's pairwise update
(``merge_moments``: exact in exact arithmetic, and the same order every run), and the backward's
two column sums added up chunk by chunk (``batch_norm_backward_from_sums``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tiles import load_step_statistics, row_active, step_offset, store_step_statistics

# The rows of a batch tile, what a program holds at once (every kernel; compiled for sm_90 at B=64,
# H=512 without spills, ``docs/gpu-compile``); a program that needs the batch statistics of its
# columns walks a larger batch in chunks of that many rows.
ROWS_PER_TILE = 64


def chunked(batch: int, column_statistics: bool) -> bool:
    """Whether a program walks the batch of its columns in chunks of ``ROWS_PER_TILE`` rows:
    where it needs their batch statistics (``column_statistics``: batch norm in training) and the
    batch is larger than one tile."""
    return column_statistics and batch > ROWS_PER_TILE


@triton.jit
def chunk_rows(first_row, t, lengths_ptr, B, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr):
    """The chunk of BLOCK_B rows from ``first_row``: the rows, their mask, which of them run at
    step t, the same as 1.0 / 0.0 in a (BLOCK_B, 1) column, and how many run."""
    rows = first_row + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    active = row_active(t, rows, row_mask, lengths_ptr, HAS_LENGTHS)
    active_f = active.to(tl.float32)
    return rows, row_mask, active, active_f[:, None], tl.sum(active_f, axis=0)


@triton.jit
def chunk_moments(value, active_f, count):
    """Mean and M2 (sum of squared deviations from it) per column of ``value`` (rows, columns)
    over its ``count`` active rows (``active_f``: 1.0 active, 0.0 not; (rows, 1))."""
    mean = tl.sum(value * active_f, axis=0) / tl.maximum(count, 1.0)
    centered = (value - mean[None, :]) * active_f
    return mean, tl.sum(centered * centered, axis=0)


@triton.jit
def merge_moments(count, mean, m2, chunk_count, chunk_mean, chunk_m2):
    """Moments of rows seen so far (``count`` of them) merged with those of the next chunk:
    mean += delta n_b / n, M2 += M2_b + delta^2 n_a n_b / n, delta = mean_b - mean_a."""
    total = count + chunk_count
    chunk_share = chunk_count / tl.maximum(total, 1.0)
    delta = chunk_mean - mean
    return mean + delta * chunk_share, m2 + chunk_m2 + delta * delta * count * chunk_share


@triton.jit
def statistics_from_moments(batch_mean, m2, count, use_batch, running_mean_ptr, running_var_ptr, columns,
                            column_mask, momentum, eps, TRAINING: tl.constexpr):
    """(mean, rstd) that normalize the columns: the batch's, from its moments over ``count``
    active rows, or the running statistics where batch statistics do not exist (evaluation, fewer
    than two active rows: ``use_batch`` false); in training, a step with batch statistics updates
    the running ones (unbiased variance)."""
    safe_count = tl.maximum(count, 1.0)
    batch_var = m2 / safe_count
    running_mean = tl.load(running_mean_ptr + columns, mask=column_mask, other=0.0)
    running_var = tl.load(running_var_ptr + columns, mask=column_mask, other=1.0)
    mean = tl.where(use_batch, batch_mean, running_mean)
    var = tl.where(use_batch, batch_var, running_var)
    if TRAINING:
        unbiased = m2 / tl.maximum(count - 1.0, 1.0)
        tl.store(running_mean_ptr + columns,
                 tl.where(use_batch, (1.0 - momentum) * running_mean + momentum * batch_mean, running_mean),
                 mask=column_mask)
        tl.store(running_var_ptr + columns,
                 tl.where(use_batch, (1.0 - momentum) * running_var + momentum * unbiased, running_var),
                 mask=column_mask)
    rstd = 1.0 / tl.sqrt(var + eps)
    return mean, rstd


@triton.jit
def merge_pair_moments(wx, wh, active_f, chunk_count, count, ih_mean, ih_m2, hh_mean, hh_m2):
    """The moments of some columns of the input projection (``wx``) and the recurrent one (``wh``)
    over the rows so far (``count`` active), merged with those of the next chunk of rows."""
    chunk_mean, chunk_m2 = chunk_moments(wx, active_f, chunk_count)
    ih_mean, ih_m2 = merge_moments(count, ih_mean, ih_m2, chunk_count, chunk_mean, chunk_m2)
    chunk_mean, chunk_m2 = chunk_moments(wh, active_f, chunk_count)
    hh_mean, hh_m2 = merge_moments(count, hh_mean, hh_m2, chunk_count, chunk_mean, chunk_m2)
    return ih_mean, ih_m2, hh_mean, hh_m2


@triton.jit
def pair_statistics(ih_mean, ih_m2, hh_mean, hh_m2, count, use_batch, slot, stats_step, columns, column_mask,
                    ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr, momentum, eps,
                    FEATURES: tl.constexpr, TRAINING: tl.constexpr, STORE: tl.constexpr):
    """(mean, rstd) of N_ih and N_hh for some ``columns`` of the two projections (FEATURES wide)
    from the moments of their batch: ``statistics_from_moments``, with the running statistics
    (max_steps, FEATURES) of step ``slot``; with ``STORE`` also written at ``stats_step`` of the
    (T, 2, FEATURES) per-step statistics (row 0 the mean, row 1 the rstd)."""
    slot_start = step_offset(slot, FEATURES)
    ih_mean, ih_rstd = statistics_from_moments(ih_mean, ih_m2, count, use_batch, ih_mean_ptr + slot_start,
                                               ih_var_ptr + slot_start, columns, column_mask, momentum, eps,
                                               TRAINING)
    hh_mean, hh_rstd = statistics_from_moments(hh_mean, hh_m2, count, use_batch, hh_mean_ptr + slot_start,
                                               hh_var_ptr + slot_start, columns, column_mask, momentum, eps,
                                               TRAINING)
    if STORE:
        store_step_statistics(ih_stats_ptr, stats_step, columns, ih_mean, ih_rstd, column_mask, FEATURES)
        store_step_statistics(hh_stats_ptr, stats_step, columns, hh_mean, hh_rstd, column_mask, FEATURES)
    return ih_mean, ih_rstd, hh_mean, hh_rstd


@triton.jit
def batch_statistics(value, active_f, count, use_batch, running_mean_ptr, running_var_ptr, columns, column_mask,
                     momentum, eps, TRAINING: tl.constexpr):
    """``statistics_from_moments`` of a tile that holds the whole batch (BLOCK_B, BLOCK_H)."""
    mean, m2 = chunk_moments(value, active_f, count)
    return statistics_from_moments(mean, m2, count, use_batch, running_mean_ptr, running_var_ptr, columns,
                                   column_mask, momentum, eps, TRAINING)


@triton.jit
def batch_norm_backward_from_sums(grad_normalized, normalized, rstd, grad_sum, grad_normalized_sum, count, active_f,
                                  use_batch):
    """dL/dv of v_hat = (v - mean) * rstd given g = dL/dv_hat for some rows of the batch, and
    the sums over all its active rows of g (``grad_sum``) and of g v_hat (``grad_normalized_sum``):
    with batch statistics (mean and variance depend on v), or fixed running statistics."""
    safe_count = tl.maximum(count, 1.0)
    batch = rstd[None, :] * (grad_normalized - (grad_sum / safe_count)[None, :]
                             - normalized * (grad_normalized_sum / safe_count)[None, :])
    fixed = grad_normalized * rstd[None, :]
    return tl.where(use_batch, batch, fixed) * active_f


@triton.jit
def batch_norm_backward(grad_normalized, normalized, rstd, active_f, count, use_batch):
    """``batch_norm_backward_from_sums`` of a tile that holds the whole batch."""
    grad_sum = tl.sum(grad_normalized * active_f, axis=0)
    grad_normalized_sum = tl.sum(grad_normalized * normalized * active_f, axis=0)
    return batch_norm_backward_from_sums(grad_normalized, normalized, rstd, grad_sum, grad_normalized_sum, count,
                                         active_f, use_batch)


@triton.jit
def stored_pair_statistics(t, step, pid, wx_ptr, wh_ptr, ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr,
                           hh_mean_ptr, hh_var_ptr, lengths_ptr, B, max_steps, momentum, eps, H: tl.constexpr,
                           GATES: tl.constexpr, TRAINING: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """For a batch walked in chunks, once the program has stored its recurrent projection of
    step t at ``step`` of ``wh`` (T or 1, B, GATES * H): the statistics of its columns
    gate * H + units of each gate, of wx_t (T, B, GATES * H) and of that projection, over the whole
    batch (``merge_pair_moments``, then ``pair_statistics`` with the running statistics updated),
    stored at ``step`` of ih_stats and hh_stats for the finishing pass to read."""
    units = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    unit_mask = units < H
    slot = tl.minimum(t, max_steps - 1)
    for gate in tl.static_range(GATES):
        columns = gate * H + units
        ih_mean = tl.zeros((BLOCK_H,), dtype=tl.float32)
        ih_m2 = ih_mean
        hh_mean = ih_mean
        hh_m2 = ih_mean
        count = tl.sum(ih_mean, axis=0)
        wx_step = wx_ptr + step_offset(t, B * GATES * H)
        wh_step = wh_ptr + step_offset(step, B * GATES * H)
        for first_row in range(0, B, BLOCK_B):
            rows, row_mask, _, active_f, chunk_count = chunk_rows(first_row, t, lengths_ptr, B, HAS_LENGTHS, BLOCK_B)
            tile_mask = row_mask[:, None] & unit_mask[None, :]
            offsets = rows[:, None] * (GATES * H) + columns[None, :]
            wx = tl.load(wx_step + offsets, mask=tile_mask, other=0.0).to(tl.float32)
            wh = tl.load(wh_step + offsets, mask=tile_mask, other=0.0)
            ih_mean, ih_m2, hh_mean, hh_m2 = merge_pair_moments(wx, wh, active_f, chunk_count, count, ih_mean, ih_m2,
                                                                hh_mean, hh_m2)
            count += chunk_count
        pair_statistics(ih_mean, ih_m2, hh_mean, hh_m2, count, TRAINING & (count >= 2.0), slot, step, columns,
                        unit_mask, ih_stats_ptr, hh_stats_ptr, ih_mean_ptr, ih_var_ptr, hh_mean_ptr, hh_var_ptr,
                        momentum, eps, GATES * H, TRAINING, True)


@triton.jit
def chunked_pair_backward(t, pid, wx_ptr, wh_ptr, ih_weight_ptr, hh_weight_ptr, ih_stats_ptr, hh_stats_ptr,
                          grad_u_ptr, dwx_ptr, dwh_ptr, dwh_low_ptr, partial_ptr, lengths_ptr, B, H: tl.constexpr,
                          GATES: tl.constexpr, PARTIAL_ROWS: tl.constexpr, U_SUM_ROW: tl.constexpr,
                          A_HAT_ROW: tl.constexpr, U_HAT_ROW: tl.constexpr, TRAINING: tl.constexpr,
                          HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                          LOW_GRAD: tl.constexpr):
    """For a batch walked in chunks, the backward's last pass: with a = gamma_ih wx_hat + ... and
    u = gamma_hh wh_hat + ... (one gate's columns gate * H + units of GATES), dwx_t and dwh_t
    through the two batch norms from da (in dwx) and du (in ``grad_u_ptr``: dwh, or dwx where
    a and u share one gradient) as the first pass stored them, and the column sums over the whole
    batch, added up in chunk order from the first pass's partials (T, chunks, PARTIAL_ROWS,
    GATES * H): row 0 sum da, ``U_SUM_ROW`` sum du, ``A_HAT_ROW`` sum da wx_hat, ``U_HAT_ROW``
    sum du wh_hat."""
    units = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    unit_mask = units < H
    features = GATES * H
    tiles = tl.cdiv(B, BLOCK_B)
    count = tl.sum(tl.zeros((BLOCK_H,), dtype=tl.float32), axis=0)
    for first_row in range(0, B, BLOCK_B):
        _, _, _, _, chunk_count = chunk_rows(first_row, t, lengths_ptr, B, HAS_LENGTHS, BLOCK_B)
        count += chunk_count
    use_batch = TRAINING & (count >= 2.0)
    for gate in tl.static_range(GATES):
        columns = gate * H + units
        grad_a_sum = tl.zeros((BLOCK_H,), dtype=tl.float32)
        grad_u_sum = grad_a_sum
        grad_a_hat_sum = grad_a_sum
        grad_u_hat_sum = grad_a_sum
        for tile in range(tiles):
            partial = (partial_ptr + step_offset(t, tiles * PARTIAL_ROWS * features) + tile * PARTIAL_ROWS * features
                       + columns)
            grad_a_sum += tl.load(partial, mask=unit_mask, other=0.0)
            grad_u_sum += tl.load(partial + U_SUM_ROW * features, mask=unit_mask, other=0.0)
            grad_a_hat_sum += tl.load(partial + A_HAT_ROW * features, mask=unit_mask, other=0.0)
            grad_u_hat_sum += tl.load(partial + U_HAT_ROW * features, mask=unit_mask, other=0.0)
        ih_weight = tl.load(ih_weight_ptr + columns, mask=unit_mask, other=0.0)
        hh_weight = tl.load(hh_weight_ptr + columns, mask=unit_mask, other=0.0)
        ih_mean, ih_rstd = load_step_statistics(ih_stats_ptr, t, columns, unit_mask, features)
        hh_mean, hh_rstd = load_step_statistics(hh_stats_ptr, t, columns, unit_mask, features)
        step_start = step_offset(t, B * features)
        for first_row in range(0, B, BLOCK_B):
            rows, row_mask, _, active_f, _ = chunk_rows(first_row, t, lengths_ptr, B, HAS_LENGTHS, BLOCK_B)
            tile_mask = row_mask[:, None] & unit_mask[None, :]
            offsets = rows[:, None] * features + columns[None, :]
            wx_hat = (tl.load(wx_ptr + step_start + offsets, mask=tile_mask, other=0.0).to(tl.float32)
                      - ih_mean[None, :]) * ih_rstd[None, :]
            wh_hat = ((tl.load(wh_ptr + step_start + offsets, mask=tile_mask, other=0.0) - hh_mean[None, :])
                      * hh_rstd[None, :])
            grad_a = tl.load(dwx_ptr + step_start + offsets, mask=tile_mask, other=0.0)
            grad_u = tl.load(grad_u_ptr + step_start + offsets, mask=tile_mask, other=0.0)
            grad_wx = batch_norm_backward_from_sums(grad_a * ih_weight[None, :], wx_hat, ih_rstd,
                                                    ih_weight * grad_a_sum, ih_weight * grad_a_hat_sum, count,
                                                    active_f, use_batch)
            grad_wh = batch_norm_backward_from_sums(grad_u * hh_weight[None, :], wh_hat, hh_rstd,
                                                    hh_weight * grad_u_sum, hh_weight * grad_u_hat_sum, count,
                                                    active_f, use_batch)
            tl.store(dwx_ptr + step_start + offsets, grad_wx, mask=tile_mask)
            tl.store(dwh_ptr + step_start + offsets, grad_wh, mask=tile_mask)
            if LOW_GRAD:
                tl.store(dwh_low_ptr + step_start + offsets, grad_wh.to(dwh_low_ptr.dtype.element_ty), mask=tile_mask)
