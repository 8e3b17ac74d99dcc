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
    with pytest.raises(ValueError, match=r"num_masking_patches must be an int in \[0, 196\], got 500"):
        block_masks(1, num_masking_patches=500)
    with pytest.raises(ValueError, match="grid must be"):
        block_masks(1, grid=(0, 3))
    with pytest.raises(ValueError, match="batch_size"):
        block_masks(-1)
    assert block_masks(0).shape == (0, 196)


@pytest.mark.parametrize(
    ("grid", "n"), [((14, 14), 196), ((8, 8), 64), ((6, 6), 36), ((5, 9), 45), (16, 256)]
)
def test_block_masks_take_a_ratio_on_any_grid(grid, n):
    """The default is a share (ConMIM's 75 of 196), so the same call works for any ViT's grid."""
    m = block_masks(400, grid=grid, generator=torch.Generator().manual_seed(3))
    assert m.shape == (400, n)
    target = round(n * 75 / 196)
    assert (m.sum(1) <= target).all() and m.sum(1).float().mean() >= 0.8 * target
    half = block_masks(400, grid=grid, ratio=0.5, generator=torch.Generator().manual_seed(3))
    assert (half.sum(1) <= round(n / 2)).all() and half.sum(1).float().mean() > m.sum(1).float().mean()


def test_the_count_stays_available_and_matches_the_ratio():
    g = lambda: torch.Generator().manual_seed(4)
    assert torch.equal(block_masks(64, generator=g()), block_masks(64, num_masking_patches=75, generator=g()))
    assert torch.equal(
        block_masks(64, ratio=0.5, generator=g()), block_masks(64, num_masking_patches=98, generator=g())
    )


@pytest.mark.parametrize("grid", [(6, 6), (4, 4), (3, 3), (2, 2), (1, 5), (5, 1), (2, 7)])
@pytest.mark.parametrize("count", [None, 1, 14])
def test_small_grids_mask_at_least_one_patch_per_image(grid, count):
    """On 6 x 6, BEiT's rule (rectangles smaller than the grid, ten attempts) left 43% of images without a masked
    patch at 14 patches; every image now gets at least one, never more than the target."""
    n = grid[0] * grid[1]
    if count is not None and count > n:
        count = n
    blocks = []
    m = block_masks(
        1000, grid=grid, num_masking_patches=count, generator=torch.Generator().manual_seed(5), blocks=blocks
    )
    target = count if count is not None else max(1, round(n * 75 / 196))
    assert (m.sum(1) >= 1).all()
    assert (m.sum(1) <= target).all()
    for img, placed in zip(m, blocks):
        union = torch.zeros(grid, dtype=torch.bool)
        for b in placed:
            union[b.top : b.top + b.height, b.left : b.left + b.width] = True
        assert torch.equal(union.flatten(), img)  # the fallback rectangle is recorded like the others


def test_zero_masked_patches_is_an_all_visible_mask():
    """num_masking_patches=0 used to fail on max_num_patches, an argument the caller never passed."""
    assert not block_masks(3, grid=6, num_masking_patches=0).any()
    assert not block_masks(3, ratio=0.0).any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_masking_patches=2.5), r"num_masking_patches must be an int in \[0, 196\], got 2\.5"),
        (dict(num_masking_patches=True), r"num_masking_patches must be an int"),
        (dict(num_masking_patches=-1), r"num_masking_patches must be an int in \[0, 196\], got -1"),
        (dict(min_num_patches=2.5), r"min_num_patches must be an int >= 1, got 2\.5"),
        (dict(max_num_patches=7.5), r"max_num_patches must be an int >= 1, got 7\.5"),
        (dict(ratio=1.5), r"ratio must be a number in \[0, 1\], got 1\.5"),
        (dict(ratio=float("nan")), r"ratio must be a number in \[0, 1\], got nan"),
        (dict(ratio="0.5"), r"ratio must be a number in \[0, 1\], got '0\.5'"),
        (dict(ratio=0.5, num_masking_patches=10), r"pass ratio or num_masking_patches, not both"),
        (dict(min_aspect=0), r"min_aspect must be a number > 0, got 0"),
        (dict(max_aspect=0.1), r"max_aspect must be a number >= min_aspect = 0\.3, got 0\.1"),
    ],
)
def test_bad_mask_arguments_name_the_argument_passed(kwargs, message):
    """Each error names the argument the caller passed; non-integer counts are refused, not truncated."""
    with pytest.raises(ValueError, match=message):
        block_masks(2, **kwargs)
