"""How the fused kernels cut a layer's work into programs, and in which precision they multiply:
the host-side decisions every kernel file's launcher shares.

Program p owns ``BLOCK_H`` = 16 hidden units of every gate (grid axis 0) for a tile of up to 64
rows (grid axis 1 tiles the batch); under batch norm in training it owns the whole batch of its
columns instead, so that their statistics are local to it, and walks a batch of more than one tile
in chunks (``batch_norm.py``). A persistent kernel keeps its rows of W_hh on chip where they fit
(``resident_weights``, ``resident_tiles``). h is kept between steps in the weights' dtype, or in
float32 under batch norm (``state_dtype``), and the recurrent products multiply as
``dot_precision`` says.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import torch
import triton

from .batch_norm import ROWS_PER_TILE, chunked
from .buffers import interpreted, launch_options, new_buffer

NORM_NONE = 0
NORM_LAYER = 1  # the LSTM's runs in lstm_layer_norm_forward.py and lstm_layer_norm_backward.py
NORM_BATCH = 2


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """The tiles and the grid of a layer's kernels. ``grid`` = (programs over the hidden units,
    programs over the batch); ``chunked``: each program walks its batch in chunks of ``block_b``
    rows; ``row_tiles``: the tiles of rows whose parameter-gradient partials the backward keeps
    apart (a program's, or each chunk a program walks)."""
    block_b: int
    block_h: int
    block_k: int
    chunked: bool
    grid: Tuple[int, int]
    row_tiles: int

    @property
    def unit_programs(self) -> int:
        """Programs along the hidden units (grid axis 0): the per-program partial statistics of
        layer norm have one row each."""
        return self.grid[0]

    @property
    def programs(self) -> int:
        """Programs in the grid: what a persistent kernel needs resident at once."""
        return self.grid[0] * self.grid[1]

    @property
    def block_p(self) -> int:
        """BLOCK_P of the kernels that read every program's partials: ``unit_programs`` rounded up
        to a power of two."""
        return triton.next_power_of_2(self.unit_programs)

    def tile_constants(self) -> dict:
        """The launch options and the tile sizes (BLOCK_B, BLOCK_H, BLOCK_K) every kernel takes."""
        return dict(**launch_options(self.block_b, self.block_h), BLOCK_B=self.block_b, BLOCK_H=self.block_h,
                    BLOCK_K=self.block_k)


def step_layout(batch: int, hidden_size: int, norm: int, training: bool) -> StepLayout:
    """The layout of a cell's kernels for ``batch`` rows and ``hidden_size`` units under ``norm``."""
    block_b, block_h, block_k = block_sizes(batch, hidden_size, batch_norm=norm == NORM_BATCH)
    column_statistics = norm == NORM_BATCH and training
    chunks = chunked(batch, column_statistics)
    grid = (triton.cdiv(hidden_size, block_h), batch_tiles(batch, block_b, column_statistics))
    row_tiles = triton.cdiv(batch, block_b) if chunks else grid[1]
    return StepLayout(block_b, block_h, block_k, chunks, grid, row_tiles)


def grid_programs(batch: int, hidden_size: int, batch_norm: bool, training: bool) -> int:
    """How many programs a cell's kernels launch (the grid a persistent kernel needs resident)."""
    return step_layout(batch, hidden_size, NORM_BATCH if batch_norm else NORM_NONE, training).programs


def block_sizes(batch: int, hidden_size: int, batch_norm: bool):
    """(BLOCK_B, BLOCK_H, BLOCK_K): 16 hidden units per program, tiles of up to ``ROWS_PER_TILE``
    rows (64) and K tiles of up to 64, or 32 under ``batch_norm``; at least 16 everywhere: Triton
    3.6 needs K >= 16 in tl.dot, and the tensor cores would pad a smaller M or N anyway."""
    block_b = max(16, min(ROWS_PER_TILE, triton.next_power_of_2(batch)))
    block_h = 16
    # the h tile (BLOCK_B x BLOCK_K) is staged in shared memory; under batch norm K tiles of at
    # most 32, as products on float32 operands (tf32x3, split three ways) hold many registers: with
    # 64 the persistent LSTM and GRU at B=64, H=512 spilled 16 to 116 bytes a thread (sm_90, Triton
    # 3.6 and 3.9), with 32 none, and the per-step LSTM forward went from 238 to 132 registers
    widest = 32 if batch_norm else 64
    block_k = max(16, min(widest, triton.next_power_of_2(hidden_size)))
    return block_b, block_h, block_k


def batch_tiles(batch: int, block_b: int, column_statistics: bool) -> int:
    """Grid axis 1: the tiles of BLOCK_B rows the batch is cut into, or one program for all of
    it where a program needs the batch statistics of its columns (batch norm in training)."""
    return 1 if column_statistics else triton.cdiv(batch, block_b)


# Shared memory the persistent kernels may give to the operands of a resident recurrent matmul (the
# program's W_hh rows and the h_{t-1} tile, both with all of K): B=64, H=512 in bfloat16 takes
# 128 KiB, 130 KiB in all with the rest (227 KiB per block on sm_90); also what the h tile costs in
# registers while it is loaded (64 a thread there with 8 warps).
RESIDENT_OPERAND_BYTES = 128 * 1024


def resident_k_tile(hidden_size: int) -> int:
    """BLOCK_K of a persistent kernel with resident weights: all of K in one tile."""
    return max(16, triton.next_power_of_2(hidden_size))


def resident_weights(block_b: int, block_h: int, gates: int, hidden_size: int, dtype: torch.dtype,
                     precision: str) -> bool:
    """Whether a persistent kernel keeps the program's ``gates`` x ``block_h`` rows of W_hh on chip
    for the whole sequence: where the product runs on Hopper's warpgroup tensor cores with operands
    in shared memory ("native" 16-bit operands, a tile of ``block_b`` = a multiple of 64 rows), and
    those operands with all of K in one tile, W_hh's rows and the (``block_b``, K) tile of h in
    ``dtype``, fit ``RESIDENT_OPERAND_BYTES``. There Triton hoists the weights' copy into shared
    memory out of the step loop (the compile check asserts it). Elsewhere it did not pay when
    compiled for sm_90: with 16 rows (Ampere-style MMA) the weights stay in registers and are copied
    to shared memory every step (226 to 255 registers at H=512), and float32 products ("ieee", FMA)
    spilled 5 to 13 KB a thread at H=256; there W_hh is streamed from L2 in K tiles every step."""
    if precision != "native" or block_b % 64 != 0:
        return False
    operand_bytes = (block_b + gates * block_h) * resident_k_tile(hidden_size) * (torch.finfo(dtype).bits // 8)
    return operand_bytes <= RESIDENT_OPERAND_BYTES


def resident_tiles(layout: StepLayout, gates: int, hidden_size: int, dtype: torch.dtype, norm: int) -> dict:
    """The constants of a persistent forward kernel that say where its ``gates`` x ``block_h`` rows
    of W_hh live: ``RESIDENT``, as ``resident_weights`` decides for the layout's tiles with h in
    ``state_dtype`` and the products in ``dot_precision``, and ``BLOCK_K``: all of K in one tile
    where they stay on chip (``resident_k_tile``), the layout's streamed K tile otherwise."""
    resident = resident_weights(layout.block_b, layout.block_h, gates, hidden_size, state_dtype(dtype, norm),
                                dot_precision(dtype, norm))
    return {"RESIDENT": resident, "BLOCK_K": resident_k_tile(hidden_size) if resident else layout.block_k}


def state_dtype(dtype: torch.dtype, norm: int) -> torch.dtype:
    """The dtype h is kept in between steps: float32 under batch norm, which amplifies the
    rounding of h to bfloat16 (2.3e-2 relative error at B=16) into the statistics of every step;
    otherwise the weights' dtype, so that the recurrent matmul reads it as it is."""
    return torch.float32 if norm == NORM_BATCH else dtype


def operand_buffer(state: torch.Tensor, dtype: torch.dtype, norm: int) -> torch.Tensor:
    """For a float32 state (the GRU's and RNN's h, (T+1, B, H)) that the recurrent product reads
    rounded to the weights' 16-bit ``dtype`` (``state_dtype``: not under batch norm), a buffer of
    its shape in that dtype with step 0 copied in, which the forward kernels fill beside the state:
    every program reads all of h_{t-1} each step, and reads it in half the bytes. Elsewhere
    ``state`` itself (the kernels then write no copy)."""
    operand_dtype = state_dtype(dtype, norm)
    if operand_dtype == state.dtype:
        return state
    operand = new_buffer(state.shape, operand_dtype, state.device)
    operand[0].copy_(state[0])
    return operand


def dot_precision(dtype: torch.dtype, norm: int) -> str:
    """How the recurrent matmuls multiply: "ieee" float32 products for float32 weights (the
    accuracy bar is float32's with tf32 off) and under the interpreter (whose bfloat16 tl.dot is
    wrong); "tf32x3" (float32 accuracy on tensor cores) where h stays float32 beside bfloat16
    weights; "native" (operands in the weights' dtype) otherwise."""
    if dtype == torch.float32 or interpreted():
        return "ieee"
    if state_dtype(dtype, norm) == torch.float32:
        return "tf32x3"
    return "native"


def low_precision_gradient(dtype: torch.dtype, norm: int) -> bool:
    """Whether the backward also stores dL/d(h W_hh^T) rounded to the weights' 16-bit ``dtype``,
    for the recurrent product dh_{t-1} = dwh_t W_hh that every program computes from all of dwh_t
    (B x 4H) every step: that product rounds it to ``dtype`` anyway ("native" precision), so the
    copy halves what each program reads with the same result. Not under batch norm, where the
    product keeps float32 operands."""
    return dtype in (torch.bfloat16, torch.float16) and norm != NORM_BATCH
