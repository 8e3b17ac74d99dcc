"""Masking: counts, block geometry, aspect-ratio bounds, the exact SimMIM count, determinism."""

import math

import pytest
import torch

from conmim.masking import block_masks, cell_masks


def test_block_masks_counts_match_beit_statistics():
    m = block_masks(2000, generator=torch.Generator().manual_seed(0))
    assert m.shape == (2000, 196) and m.dtype == torch.bool
    counts = m.sum(1).float()
    assert counts.max() <= 75
    assert 73.5 <= counts.mean() <= 75.0  # CONMIM.md: mean ~74.5
    assert counts.min() >= 50  # CONMIM.md: min ~64 in practice


def test_block_geometry_and_aspect_bounds():
    blocks = []
    m = block_masks(300, generator=torch.Generator().manual_seed(1), blocks=blocks)
    lo, hi = math.log(0.3), math.log(1 / 0.3)
    for img, placed in zip(m, blocks):
        grid = torch.zeros(14, 14, dtype=torch.bool)
        budget = 75
        for blk in placed:
            assert lo - 1e-12 <= math.log(blk.aspect) <= hi + 1e-12
            assert min(16, budget) - 1e-9 <= blk.target_area <= max(16, budget) + 1e-9
            assert blk.height == round(math.sqrt(blk.target_area * blk.aspect))
            assert blk.width == round(math.sqrt(blk.target_area / blk.aspect))
            assert 0 < blk.newly_masked <= budget
            assert blk.top + blk.height <= 14 and blk.left + blk.width <= 14
            grid[blk.top : blk.top + blk.height, blk.left : blk.left + blk.width] = True
            budget -= blk.newly_masked
        assert torch.equal(grid.flatten(), img)  # the mask is exactly the union of the placed blocks
    first_blocks = [p[0] for p in blocks if p]
    # The first block of an image has the whole budget: its area is at least ~16 patches (rounding aside).
    assert min(b.height * b.width for b in first_blocks) >= 12


def test_block_masks_any_grid():
    m = block_masks(
        50,
        grid=(7, 12),
        num_masking_patches=30,
        min_num_patches=4,
        generator=torch.Generator().manual_seed(2),
    )
    assert m.shape == (50, 84)
    assert (m.sum(1) <= 30).all() and m.sum(1).float().mean() > 25


def test_cell_masks_exact_simmim_count():
    m = cell_masks(64, generator=torch.Generator().manual_seed(0))
    assert m.shape == (64, 196)
    assert (m.sum(1) == 148).all()
    cells = m.reshape(64, 7, 2, 7, 2)
    # each 2x2 cell is either fully masked or fully visible
    assert torch.equal(cells.all(dim=(2, 4)), cells.any(dim=(2, 4)))


def test_cell_masks_other_grids_and_errors():
    assert (
        cell_masks(3, grid=(28, 28), cell=4, ratio=0.5).sum(1) == 25 * 16
    ).all()  # ceil(49 * 0.5) cells of 4x4
    with pytest.raises(ValueError, match="divisible by cell"):
        cell_masks(1, grid=(14, 14), cell=3)
    with pytest.raises(ValueError, match="ratio must lie in"):
        cell_masks(1, ratio=1.5)


@pytest.mark.parametrize("fn", [block_masks, cell_masks])
def test_masks_are_deterministic_for_a_seed(fn):
    a = fn(16, generator=torch.Generator().manual_seed(7))
    b = fn(16, generator=torch.Generator().manual_seed(7))
    c = fn(16, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_mask_arguments_are_checked():
    with pytest.raises(ValueError, match="num_masking_patches must lie in"):
        block_masks(1, num_masking_patches=500)
    with pytest.raises(ValueError, match="grid must be"):
        block_masks(1, grid=(0, 3))
    with pytest.raises(ValueError, match="batch_size"):
        block_masks(-1)
    assert block_masks(0).shape == (0, 196)
