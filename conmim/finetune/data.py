"""Labelled data for fine-tuning: the train/val split of a class folder (or the bundled digits), a seeded
per-class subset for low-label runs, and loaders whose every random draw comes from a per-(epoch, image) seed,
so an epoch's batches and augmentations are the same after a resume, whatever the workers.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from conmim.data.torch_loader import ShardSampler, sample_seed


def class_subset(labels: list[int], fraction: float, seed: int) -> list[int]:
    """Sorted indices of ``fraction`` of each class's items (at least one per class), chosen with ``seed``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must lie in (0, 1], got {fraction}")
    if fraction == 1:
        return list(range(len(labels)))
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    keep = []
    for y in sorted(by_class):
        items = by_class[y]
        n = max(1, round(fraction * len(items)))
        keep += [items[j] for j in torch.randperm(len(items), generator=g)[:n].tolist()]
    return sorted(keep)


class _Seeded:
    """Python's, numpy's and torch's global generators seeded for one image, restored afterwards: timm's
    transforms draw from all three."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        # the CPU generator only: torch.manual_seed also queues a lazy seed of every CUDA generator and records a
        # traceback for it, which cost 5 ms per image here
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc):
        random.setstate(self.saved[0])
        np.random.set_state(self.saved[1])
        torch.set_rng_state(self.saved[2])


class LabelledImages(Dataset):
    """Items: an index, or an (index, seed) pair from :class:`ShardSampler`; returns (image tensor, label)."""

    def __init__(self, files: list[str], labels: list[int], transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        from PIL import Image

        index, seed = item if isinstance(item, tuple) else (item, 0)
        with Image.open(self.files[index]) as im:
            img = im.convert("RGB")
        with _Seeded(seed):
            return self.transform(img), self.labels[index]


def train_loader(files, labels, transform, batch_size, rank, world, seed, num_workers, pin_memory):
    """(DataLoader, sampler): a seeded permutation per epoch sharded over ranks (``sampler.set_epoch(epoch,
    start)`` resumes mid-epoch), full batches only (mixup pairs each image with another of its batch)."""
    sampler = ShardSampler(len(files), rank, world, seed)
    loader = DataLoader(
        LabelledImages(files, labels, transform), batch_size=batch_size, sampler=sampler,
        num_workers=num_workers, pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    return loader, sampler


PAD_LABEL = -1  # a validation image repeated only so every rank has as many; not counted


def eval_loader(files, labels, transform, batch_size, rank, world, num_workers, pin_memory):
    """This rank's share of the validation images: every ``world``-th, the shorter shares padded to the longest
    with the first image labelled PAD_LABEL (not counted: counts sum exactly), so every rank runs as many
    forward passes (FSDP's all-gathers need every rank in each)."""
    share = list(range(rank, len(files), world))
    fill = -(-len(files) // world) - len(share)
    share_labels = [labels[i] for i in share] + [PAD_LABEL] * fill
    share += [0] * fill
    return DataLoader(
        LabelledImages([files[i] for i in share], share_labels, transform),
        batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
    )  # fmt: skip


__all__ = ["PAD_LABEL", "LabelledImages", "class_subset", "eval_loader", "sample_seed", "train_loader"]
