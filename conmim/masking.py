"""Patch masks for ConMIM: BEiT block-wise masking and SimMIM-style cell masking.

Both generate a whole batch from a seeded ``torch.Generator`` (same generator state -> same masks) and return a
bool tensor [B, N] with N = grid height * grid width, True where the patch is masked for the student.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


def _is_int(x) -> bool:
    """A Python or NumPy integer (not a bool)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _grid(grid) -> tuple[int, int]:
    if _is_int(grid):
        grid = (grid, grid)
    if not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(_is_int(g) and g > 0 for g in grid):
        raise ValueError(
            f"grid must be a positive int or a (height, width) pair of positive ints, got {grid!r}"
        )
    return int(grid[0]), int(grid[1])


def _check_batch(batch_size) -> int:
    if not _is_int(batch_size) or batch_size < 0:
        raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
    return int(batch_size)


@dataclass(frozen=True)
class Block:
    """One rectangle placed by the block-wise generator (for inspection and tests)."""

    top: int
    left: int
    height: int
    width: int
    target_area: float
    aspect: float
    newly_masked: int


class _Uniforms:
    """Uniform [0, 1) numbers drawn from a torch.Generator in batches, consumed one by one on the host."""

    def __init__(self, generator: torch.Generator | None, chunk: int = 512):
        self.generator = generator
        self.chunk = chunk
        self.buf: list[float] = []
        self.pos = 0

    def __call__(self) -> float:
        if self.pos == len(self.buf):
            self.buf = torch.rand(self.chunk, generator=self.generator, dtype=torch.float64).tolist()
            self.pos = 0
        self.pos += 1
        return self.buf[self.pos - 1]


def _block_mask_one(
    rand: _Uniforms,
    height: int,
    width: int,
    num_masking_patches: int,
    min_num_patches: int,
    max_num_patches: int,
    log_aspect: tuple[float, float],
    max_attempts: int,
    blocks: list[Block] | None,
) -> list[list[bool]]:
    mask = [[False] * width for _ in range(height)]
    count = 0
    while count < num_masking_patches:
        budget = min(num_masking_patches - count, max_num_patches)
        delta = 0
        for _ in range(max_attempts):
            lo, hi = min_num_patches, budget
            target_area = lo + (hi - lo) * rand()
            aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * rand())
            h = round(math.sqrt(target_area * aspect))
            w = round(math.sqrt(target_area / aspect))
            ru, rv = rand(), rand()
            if w < width and h < height:
                top = int(ru * (height - h + 1))
                left = int(rv * (width - w + 1))
                already = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - already <= budget:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i][j]:
                                mask[i][j] = True
                                delta += 1
                    if blocks is not None:
                        blocks.append(Block(top, left, h, w, target_area, aspect, h * w - already))
            if delta > 0:
                break
        if delta == 0 and count == 0:
            # Nothing fitted (a small grid): the last shape cut to the grid and the budget, at a uniform
            # position, so that no image goes without a masked patch.
            h, w = max(1, min(h, height)), max(1, min(w, width))
            while h * w > budget:
                if h >= w:
                    h -= 1
                else:
                    w -= 1
            top, left = int(rand() * (height - h + 1)), int(rand() * (width - w + 1))
            for i in range(top, top + h):
                for j in range(left, left + w):
                    mask[i][j] = True
            delta = h * w
            if blocks is not None:
                blocks.append(Block(top, left, h, w, target_area, aspect, delta))
        if delta == 0:
            break
        count += delta
    return mask


DEFAULT_RATIO = 75 / 196  # ConMIM's (BEiT's) 75 of the 196 patches of a 224 px image in 16 px patches


def _count(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high], or a ValueError naming the argument the caller passed."""
    want = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
    if not _is_int(value) or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return int(value)


def block_masks(
    batch_size: int,
    grid=(14, 14),
    ratio: float | None = None,
    num_masking_patches: int | None = None,
    min_num_patches: int = 16,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    max_attempts: int = 10,
    generator: torch.Generator | None = None,
    device=None,
    blocks: list[list[Block]] | None = None,
) -> torch.Tensor:
    """BEiT block-wise masking, as used by ConMIM by default, on any patch grid.

    The target is ``round(ratio * N)`` patches (``ratio`` defaults to 75 / 196, ConMIM's 75 of 196), or exactly
    ``num_masking_patches`` when that is given instead. Rectangles of target area uniform between
    min_num_patches and the remaining budget and aspect ratio log-uniform in [min_aspect, max_aspect] (default
    1 / min_aspect) are placed at uniform positions until the target is masked or ``max_attempts`` attempts in a
    row add nothing; a rectangle is kept only if it masks at least one new patch and no more than the remaining
    budget. The count therefore varies per image (on 14 x 14 with 75: mean about 74.5, never above 75).

    Small grids: rectangles must be narrower and shorter than the grid (BEiT's rule), so on grids of about
    6 x 6 and below every attempt can fail. An image that would be left with no masked patch while the target is
    at least 1 gets one rectangle of the last drawn shape cut to fit the grid and the budget (recorded in
    ``blocks`` like the others): every image then has at least one masked patch. On grids where a rectangle
    fits, as 14 x 14, this never happens and the masks are BEiT's.

    Args:
        batch_size: B.
        grid: patch grid (height, width) or one int for a square grid; N = height * width.
        ratio: share of the N patches to target, in [0, 1]; not together with ``num_masking_patches``.
        num_masking_patches: target count, an int in [0, N].
        min_num_patches, max_num_patches: area range of one rectangle (max defaults to the target).
        generator: CPU torch.Generator for reproducible masks (default: torch's global generator).
        device: where the returned tensor lives.
        blocks: if a list is given, one list of :class:`Block` per image is appended to it.

    Returns:
        bool [B, N].
    """
    B = _check_batch(batch_size)
    height, width = _grid(grid)
    n = height * width
    if ratio is not None and num_masking_patches is not None:
        raise ValueError(
            f"pass ratio or num_masking_patches, not both (got ratio={ratio!r}, "
            f"num_masking_patches={num_masking_patches!r})"
        )
    if num_masking_patches is not None:
        target = _count("num_masking_patches", num_masking_patches, 0, n)
    else:
        ratio = DEFAULT_RATIO if ratio is None else ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}")
        target = (
            min(n, max(1, round(float(ratio) * n))) if ratio > 0 else 0
        )  # a positive share masks something
    min_num_patches = _count("min_num_patches", min_num_patches, 1)
    max_attempts = _count("max_attempts", max_attempts, 1)
    if max_num_patches is None:
        max_num_patches = max(1, target)  # a target of 0 masks nothing; it needs no rectangle size
    else:
        max_num_patches = _count("max_num_patches", max_num_patches, 1)
    if isinstance(min_aspect, bool) or not isinstance(min_aspect, numbers.Real) or not min_aspect > 0:
        raise ValueError(f"min_aspect must be a number > 0, got {min_aspect!r}")
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    if (
        isinstance(max_aspect, bool)
        or not isinstance(max_aspect, numbers.Real)
        or not max_aspect >= min_aspect
    ):
        raise ValueError(f"max_aspect must be a number >= min_aspect = {min_aspect}, got {max_aspect!r}")
    num_masking_patches = target
    rand = _Uniforms(generator)
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    rows = []
    for _ in range(B):
        placed: list[Block] | None = [] if blocks is not None else None
        rows.append(
            _block_mask_one(
                rand,
                height,
                width,
                num_masking_patches,
                min_num_patches,
                max_num_patches,
                log_aspect,
                max_attempts,
                placed,
            )
        )
        if blocks is not None:
            blocks.append(placed)
    out = torch.tensor(rows, dtype=torch.bool).reshape(B, n)
    return out.to(device) if device is not None else out


def cell_masks(
    batch_size: int,
    grid=(14, 14),
    cell: int = 2,
    ratio: float = 0.75,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """SimMIM-style random masking of ``cell`` x ``cell`` patch cells (32 px cells on 16 px patches: cell=2).

    Exactly ``ceil(cells * ratio)`` cells are masked per image, chosen uniformly without replacement; on the
    14 x 14 grid with ratio 0.75 that is 37 of 49 cells = 148 of 196 patches.

    Returns:
        bool [B, N], N = grid height * grid width.
    """
    B = _check_batch(batch_size)
    height, width = _grid(grid)
    if not _is_int(cell) or cell < 1:
        raise ValueError(f"cell must be a positive int, got {cell!r}")
    if height % cell or width % cell:
        raise ValueError(f"grid {height}x{width} must be divisible by cell = {cell}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio}")
    ch, cw = height // cell, width // cell
    n_cells = ch * cw
    n_masked = math.ceil(n_cells * ratio)
    order = torch.rand(B, n_cells, generator=generator).argsort(dim=1)
    cells = torch.zeros(B, n_cells, dtype=torch.bool)
    cells.scatter_(1, order[:, :n_masked], True)
    out = cells.reshape(B, ch, 1, cw, 1).expand(B, ch, cell, cw, cell).reshape(B, height * width)
    return out.to(device) if device is not None else out.contiguous()


__all__ = ["Block", "block_masks", "cell_masks"]
