"""Data for ConMIM pretraining: two pixel-aligned views of each image plus a patch mask, on the training device.

``resolve_data(spec)`` names the source (image folder, file list, tar shards, ``samples:photos|mnist``);
``build_loader(source, batch_size, ...)`` scans it (bad files excluded and listed), builds the DALI pipeline or
the torch fallback, and yields ``(student_view, teacher_view, mask)``: float32 [B, C, S, S] twice (C =
``views.channels``, 3 by default) and bool [B, N] with N = (S / patch_size)^2, masks generated on the training
device's side from a seeded generator. ``synthetic_loader`` yields random batches of the same shapes for
benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from conmim.data.dali_loader import DaliTwoViewLoader, dali_status
from conmim.data.scan import SCANS, ImageFolder, check_image, scan_folder, scan_list, write_bad_files
from conmim.data.shards import ShardSet, scan_shards
from conmim.data.sources import DataSource, resolve_data, scan_source
from conmim.data.torch_loader import make_torch_loader
from conmim.data.views import ViewConfig
from conmim.masking import block_masks, cell_masks

LOADERS = ("auto", "dali", "torch")
MASKS = ("block", "cell")


@dataclass(frozen=True)
class MaskConfig:
    """Which masks: "block" (BEiT, ``ratio`` of N patches targeted, 75/196 by default) or "cell" (SimMIM,
    ``cell`` x ``cell`` patches per cell, ``ratio`` of the cells)."""

    kind: str = "block"
    patch_size: int = 16
    ratio: float = 75 / 196
    cell: int = 2

    def __post_init__(self):
        if self.kind not in MASKS:
            raise ValueError(f"mask kind must be one of {MASKS}, got {self.kind!r}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"mask ratio must lie in [0, 1], got {self.ratio}")

    def grid(self, image_size: int) -> tuple[int, int]:
        if image_size % self.patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {self.patch_size}")
        side = image_size // self.patch_size
        return side, side

    def make(self, batch: int, image_size: int, generator: torch.Generator) -> torch.Tensor:
        h, w = self.grid(image_size)
        if self.kind == "cell":
            return cell_masks(batch, (h, w), self.cell, self.ratio, generator=generator)
        n = round(h * w * self.ratio)
        return block_masks(
            batch, (h, w), num_masking_patches=n, min_num_patches=min(16, max(1, n)), generator=generator
        )


class TwoViewLoader:
    """Iterable over (student view, teacher view, mask) batches on ``device``; ``set_epoch`` before each epoch.

    ``last_indices`` holds the dataset indices of the batch just yielded (used by tests and for debugging).
    """

    def __init__(
        self,
        inner,
        sampler,
        device: torch.device,
        masks: MaskConfig,
        image_size: int,
        seed: int,
        rank: int,
        kind: str,
        folder: ImageFolder | None,
        batch_size: int,
    ):
        self.inner, self.sampler, self.device = inner, sampler, device
        self.masks, self.image_size, self.seed, self.rank = masks, image_size, seed, rank
        self.kind, self.folder, self.batch_size = kind, folder, batch_size
        self.epoch = 0
        self.start_batch = 0
        self.last_indices: torch.Tensor | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (its order, views and masks); ``start_batch`` resumes after that many batches with
        exactly the batches an uninterrupted epoch would have produced next."""
        self.epoch = epoch
        self.start_batch = start_batch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start_batch * self.batch_size)
        else:
            self.inner.set_epoch(epoch)

    def batches_per_epoch(self) -> int:
        """Batches in a whole epoch (``len`` counts what is left after ``start_batch`` on the torch loader)."""
        return len(self) + (self.start_batch if self.sampler is not None else 0)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7_919 + self.epoch)
        for _ in range(self.start_batch):  # the masks of the skipped batches
            self.masks.make(self.batch_size, self.image_size, g)
        inner = iter(self.inner)
        if self.sampler is None:  # DALI: read and drop the skipped batches
            for _ in range(self.start_batch):
                next(inner, None)
        for student, teacher, idx in inner:
            mask = self.masks.make(student.shape[0], self.image_size, g)
            self.last_indices = idx
            yield (
                student.to(self.device, non_blocking=True),
                teacher.to(self.device, non_blocking=True),
                mask.to(self.device, non_blocking=True),
            )


def build_loader(
    root,
    batch_size: int,
    views: ViewConfig | None = None,
    masks: MaskConfig | None = None,
    loader: str = "auto",
    device="cpu",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 2,
    drop_last: bool = True,
    shuffle: bool = True,
    run_dir=None,
    verbose: bool = True,
    scan: str = "content",
    index_dir=None,
    progress: bool | None = None,
) -> TwoViewLoader:
    """Loader of ConMIM batches from an image folder (class sub-folders or a flat tree, searched recursively),
    a file list or tar shards.

    Args:
        root: what :func:`resolve_data` returned, or anything it accepts (a folder, a file list, a shard
            pattern, ``samples:photos``).
        batch_size: images per batch on this rank.
        views: augmentation parameters (default: the ConMIM recipe at 224 px).
        masks: mask parameters (default: BEiT block masks, 75 of 196).
        loader: "dali", "torch", or "auto" (DALI when it imports, else torch).
        device: training device; DALI decodes there ("mixed") when it is a GPU.
        rank, world_size: global rank and number of ranks (DALI: shard_id and num_shards).
        seed: makes views and masks reproducible.
        num_workers: DataLoader workers (torch) or DALI CPU threads.
        drop_last: drop each epoch's last partial batch (training).
        run_dir: where ``bad_files.tsv`` lists the excluded files.
        verbose: log each excluded file.
        scan: "content" (default), "stat" or "off": how files are checked (see :mod:`conmim.data.scan`).
        index_dir: where the scan's index is cached (default: the user's cache folder).
        progress: a progress bar on stderr once the scan takes more than a few seconds (default: ``verbose``;
            a trainer logging excluded files itself passes ``verbose=False, progress=(rank == 0)``).
    """
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size) = [0, {world_size}), got {rank}")
    views = views or ViewConfig()
    masks = masks or MaskConfig()
    masks.grid(views.image_size)
    device = torch.device(device)
    if scan not in SCANS:
        raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
    source = resolve_data(root)
    folder = scan_source(
        source, index_dir=index_dir, report_dir=run_dir, verbose=verbose, scan=scan, progress=progress
    )
    items = folder if isinstance(folder, ShardSet) else folder.files
    per_rank = -(-len(folder) // world_size)
    if drop_last and per_rank < batch_size:
        raise ValueError(
            f"{len(folder)} usable images give {per_rank} per rank, fewer than batch_size = {batch_size}: "
            "lower batch_size or add images"
        )
    if loader == "auto":
        loader = "dali" if dali_status() is None else "torch"
    if loader == "dali":
        device_id = None if device.type == "cpu" else (device.index or 0)
        inner = DaliTwoViewLoader(
            items,
            views,
            batch_size,
            rank,
            world_size,
            seed,
            device_id,
            max(1, num_workers),
            drop_last,
            shuffle,
        )
        sampler = None
    else:
        inner, sampler = make_torch_loader(
            items.reader() if isinstance(items, ShardSet) else items,
            views,
            batch_size,
            rank,
            world_size,
            seed,
            num_workers,
            device.type == "cuda",
            drop_last,
            shuffle,
        )
    return TwoViewLoader(
        inner, sampler, device, masks, views.image_size, seed, rank, loader, folder, batch_size
    )


def synthetic_loader(
    batch_size: int,
    steps: int,
    views: ViewConfig | None = None,
    masks: MaskConfig | None = None,
    device="cpu",
    seed: int = 0,
):
    """``steps`` random batches with the shapes and dtypes of :func:`build_loader`'s (for benchmarks)."""
    views = views or ViewConfig()
    masks = masks or MaskConfig()
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, views.channels, views.image_size, views.image_size)
    student = torch.randn(shape, generator=g).to(device)
    teacher = torch.randn(shape, generator=g).to(device)
    for _ in range(steps):
        yield student, teacher, masks.make(batch_size, views.image_size, g).to(device)


__all__ = [
    "SCANS",
    "DataSource",
    "ImageFolder",
    "MaskConfig",
    "ShardSet",
    "TwoViewLoader",
    "ViewConfig",
    "build_loader",
    "check_image",
    "dali_status",
    "resolve_data",
    "scan_folder",
    "scan_list",
    "scan_shards",
    "scan_source",
    "synthetic_loader",
    "write_bad_files",
]
