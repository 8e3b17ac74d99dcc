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
        if delta == 0:
            break
        count += delta
    return mask


def block_masks(
    batch_size: int,
    grid=(14, 14),
    num_masking_patches: int = 75,
    min_num_patches: int = 16,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    max_attempts: int = 10,
    generator: torch.Generator | None = None,
    device=None,
    blocks: list[list[Block]] | None = None,
) -> torch.Tensor:
    """BEiT block-wise masking, as used by ConMIM by default.

    Rectangles of target area uniform in [min_num_patches, remaining budget] and aspect ratio log-uniform in
    [min_aspect, max_aspect] (default 1 / min_aspect) are placed at uniform positions until
    ``num_masking_patches`` patches are masked or 10 attempts in a row add nothing; a rectangle is kept only if
    it masks at least one new patch and no more than the remaining budget. The count therefore varies per image
    (on 14 x 14 with 75: mean about 74.5, never above 75).

    Args:
        batch_size: B.
        grid: patch grid (height, width) or one int for a square grid; N = height * width.
        generator: CPU torch.Generator for reproducible masks (default: torch's global generator).
        device: where the returned tensor lives.
        blocks: if a list is given, one list of :class:`Block` per image is appended to it.

    Returns:
        bool [B, N].
    """
    B = _check_batch(batch_size)
    height, width = _grid(grid)
    n = height * width
    if not 0 <= num_masking_patches <= n:
        raise ValueError(f"num_masking_patches must lie in [0, N] = [0, {n}], got {num_masking_patches}")
    if min_num_patches < 1:
        raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
    if not _is_int(max_attempts) or max_attempts < 1:
        raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
    max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    if max_num_patches < 1:
        raise ValueError(f"max_num_patches must be >= 1, got {max_num_patches}")
    if not min_aspect > 0:
        raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    if max_aspect < min_aspect:
        raise ValueError(f"max_aspect must be >= min_aspect = {min_aspect}, got {max_aspect}")
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
