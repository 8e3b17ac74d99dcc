"""The torch/torchvision loader: a Dataset of two views, a seeded rank-aware sampler, DataLoader workers with
pinned memory, and per-batch masks generated from a seeded generator."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from conmim.data.views import ViewConfig, decode_image, two_views


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-(epoch, image) seed, independent of ranks, workers and batch composition."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**63 - 1)


class TwoViewDataset(Dataset):
    """Items are (index, seed) pairs from :class:`ShardSampler`; returns (student view, teacher view, index).

    ``items``: the image files, or a reader of samples inside tar shards (``read(i) -> bytes``)."""

    def __init__(self, items, cfg: ViewConfig):
        self.items = items
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, index: int) -> bytes:
        if isinstance(self.items, list):
            with open(self.items[index], "rb") as fh:
                return fh.read()
        return self.items.read(index)

    def __getitem__(self, item):
        index, seed = item
        try:
            img = decode_image(self._read(index), self.cfg.channels)
        except Exception as exc:  # scan="off": name the file the way DALI does, then stop
            from conmim.data.scan import printable

            name = self.items[index] if isinstance(self.items, list) else self.items.name(index)
            raise RuntimeError(f"cannot decode {printable(name)}: {printable(exc)}") from exc
        s, t = two_views(img, self.cfg, seed)
        return s, t, index


class ShardSampler(Sampler):
    """Per epoch: a seeded permutation of all images, padded to a multiple of ``world_size`` (repeating from the
    start, as DistributedSampler does), of which this rank takes every ``world_size``-th element starting at
    ``rank``. The ranks' shares are disjoint and together cover every image once (plus the padding)."""

    def __init__(self, n: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size) = [0, {world_size}), got {rank}")
        self.n, self.rank, self.world_size, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation; ``start`` skips this rank's first samples (resuming mid-epoch)."""
        self.epoch = epoch
        self.start = start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 31 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = -(-self.n // self.world_size) * self.world_size
        order += order[: total - self.n]
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        return max(0, -(-self.n // self.world_size) - self.start)

    def __iter__(self):
        for i in self.indices()[self.start :]:
            yield i, sample_seed(self.seed, self.epoch, i)


def make_torch_loader(
    items,
    cfg: ViewConfig,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    drop_last: bool = True,
    shuffle: bool = True,
):
    """A DataLoader yielding (student [B, 3, S, S], teacher [B, 3, S, S], indices [B]) on the CPU.

    Its own generator: each ``iter`` of a DataLoader draws a seed for its workers, by default from the global
    torch generator, so a run resumed mid-epoch (one more ``iter`` than the uninterrupted run) would continue
    the global RNG stream one draw later; the views and masks take their randomness from their own seeds."""
    sampler = ShardSampler(len(items), rank, world_size, seed, shuffle)
    loader = DataLoader(
        TwoViewDataset(items, cfg), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=pin_memory, drop_last=drop_last, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    return loader, sampler
