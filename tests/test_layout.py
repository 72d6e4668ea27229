"""How the launchers cut a layer into programs (``kernels/layout.py``): the grid, the batch-norm
chunks and the backward's row tiles, the sizes the compile reports were measured at, and the
decisions on W_hh's residence and the products' precision."""
import pytest
import torch

import fused_helpers  # noqa: F401 - before Triton: on a CPU the kernels it imports are interpreted
from normrnn.kernels.layout import (NORM_BATCH, NORM_LAYER, NORM_NONE, dot_precision, grid_programs,
                                    low_precision_gradient, resident_tiles, resident_weights, state_dtype,
                                    step_layout)


@pytest.mark.parametrize("norm", [NORM_NONE, NORM_LAYER, NORM_BATCH])
def test_without_batch_statistics_the_batch_is_tiled_on_grid_axis_one(norm):
    """No norm, layer norm, and batch norm in evaluation: 131 rows in three tiles of 64, each its
    own program, and 35 units over three programs of 16 (the last with 3)."""
    layout = step_layout(131, 35, norm, training=norm != NORM_BATCH)
    assert layout.grid == (3, 3) and layout.programs == 9
    assert (layout.block_b, layout.block_h) == (64, 16)
    assert not layout.chunked and layout.row_tiles == 3
    assert layout.unit_programs == 3 and layout.block_p == 4


def test_batch_norm_in_training_keeps_the_batch_in_one_program():
    """Its statistics need every row of a column: one program for the batch, walked in three
    chunks, whose parameter partials the backward keeps apart; a batch of one tile is not chunked."""
    layout = step_layout(131, 35, NORM_BATCH, training=True)
    assert layout.grid == (3, 1) and layout.chunked and layout.row_tiles == 3
    assert layout.block_k == 32  # float32 products under batch norm: K tiles of 32, not 64
    small = step_layout(64, 35, NORM_BATCH, training=True)
    assert small.grid == (3, 1) and not small.chunked and small.row_tiles == 1
    assert grid_programs(131, 35, batch_norm=True, training=True) == 3
    assert grid_programs(131, 35, batch_norm=True, training=False) == 9


def test_the_headline_shape():
    """B=64, H=512, as the compile reports measured it: 32 programs of 64 x 16, 8 warps, K tiles
    of 64 (32 under batch norm)."""
    layout = step_layout(64, 512, NORM_NONE, training=True)
    assert layout.grid == (32, 1)
    constants = layout.tile_constants()
    assert constants["num_warps"] == 8
    assert (constants["BLOCK_B"], constants["BLOCK_H"], constants["BLOCK_K"]) == (64, 16, 64)
    assert step_layout(64, 512, NORM_BATCH, training=True).block_k == 32
    assert step_layout(5, 7, NORM_NONE, training=True).tile_constants()["num_warps"] == 4


def test_small_sizes_keep_tiles_of_sixteen():
    """Triton 3.6 needs K >= 16 in tl.dot, and the tensor cores pad a smaller M or N anyway."""
    layout = step_layout(1, 1, NORM_NONE, training=False)
    assert (layout.block_b, layout.block_h, layout.block_k) == (16, 16, 16)
    assert layout.grid == (1, 1)


def test_weights_on_chip_only_for_warpgroup_products_that_fit():
    """bfloat16 products on 64-row tiles at H=512 fit (128 KiB of operands); float32 products,
    16-row tiles, or H=1024 do not."""
    assert resident_weights(64, 16, 4, 512, torch.bfloat16, "native")
    assert not resident_weights(64, 16, 4, 512, torch.bfloat16, "tf32x3")
    assert not resident_weights(16, 16, 4, 512, torch.bfloat16, "native")
    assert not resident_weights(64, 16, 4, 1024, torch.bfloat16, "native")
    assert resident_weights(64, 16, 1, 512, torch.bfloat16, "native")  # the RNN's one gate: 80 KiB


def test_resident_tiles_widen_k_only_where_the_weights_stay(monkeypatch):
    """What a persistent forward is launched with on a GPU: at B=64, H=512 in bfloat16 all of K in
    one tile of 512 without norm and with layer norm; under batch norm (float32 h and products) and
    in float32, W_hh streamed in the layout's K tiles (32 and 64)."""
    from normrnn.kernels import layout
    monkeypatch.setattr(layout, "interpreted", lambda: False)  # what a GPU would multiply with
    for norm in (NORM_NONE, NORM_LAYER):
        tiles = resident_tiles(step_layout(64, 512, norm, training=True), 4, 512, torch.bfloat16, norm)
        assert tiles == {"RESIDENT": True, "BLOCK_K": 512}
    assert resident_tiles(step_layout(64, 512, NORM_BATCH, training=True), 4, 512, torch.bfloat16,
                          NORM_BATCH) == {"RESIDENT": False, "BLOCK_K": 32}
    assert resident_tiles(step_layout(64, 512, NORM_NONE, training=True), 4, 512, torch.float32,
                          NORM_NONE) == {"RESIDENT": False, "BLOCK_K": 64}
    assert resident_tiles(step_layout(64, 300, NORM_NONE, training=True), 3, 300, torch.bfloat16,
                          NORM_NONE) == {"RESIDENT": True, "BLOCK_K": 512}  # K padded to a power of two


def test_precision_follows_the_state_dtype(monkeypatch):
    """Under batch norm h stays float32 beside 16-bit weights (tf32x3 products, float32 dz);
    otherwise the product reads h, and dz, in the weights' dtype."""
    from normrnn.kernels import layout
    monkeypatch.setattr(layout, "interpreted", lambda: False)  # what a GPU would multiply with
    assert state_dtype(torch.bfloat16, NORM_BATCH) == torch.float32
    assert state_dtype(torch.bfloat16, NORM_LAYER) == torch.bfloat16
    assert dot_precision(torch.bfloat16, NORM_BATCH) == "tf32x3"
    assert dot_precision(torch.bfloat16, NORM_NONE) == "native"
    assert dot_precision(torch.float32, NORM_NONE) == "ieee"
    assert low_precision_gradient(torch.bfloat16, NORM_LAYER)
    assert not low_precision_gradient(torch.bfloat16, NORM_BATCH)
    assert not low_precision_gradient(torch.float32, NORM_NONE)
    monkeypatch.setattr(layout, "interpreted", lambda: True)  # the interpreter's bfloat16 tl.dot is wrong
    assert dot_precision(torch.bfloat16, NORM_NONE) == "ieee"
