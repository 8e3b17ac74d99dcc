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


def rand_augment_args(policy: str) -> dict:
    """DALI's RandAugment arguments for a timm policy string ``rand-m<M>[-n<N>]...``: N operations (timm's
    default 2) at magnitude M of timm's 10, as DALI's bin M of 11 (``monotonic_mag``, DALI's default, matches
    timm's ``inc1``). timm's ``mstd`` (a random magnitude per operation) has no DALI counterpart: DALI keeps M."""
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ValueError(
            f"auto_augment {policy!r}: the DALI loader takes RandAugment policies (rand-m...) only"
        )
    out = {"n": 2, "m": None}
    for part in parts[1:]:
        for key in ("m", "n"):
            if part.startswith(key) and part[1:].isdigit():
                out[key] = int(part[1:])
    if out["m"] is None or not 0 <= out["m"] <= 10:
        raise ValueError(f"auto_augment {policy!r}: needs a magnitude m0 to m10")
    return {"n": out["n"], "m": out["m"], "num_magnitude_bins": 11}


class DaliLabelledLoader:
    """NVIDIA DALI training batches (image [B, 3, S, S] float, label [B]) for fine-tuning: read, decode (on the
    GPU when ``device_id`` is given), random-resized crop (bicubic), flip, DALI's RandAugment, normalisation;
    then timm's RandomErasing on the batch. Acts as its own sampler: ``set_epoch(epoch, start)``, and ``len`` is
    this rank's samples per epoch.

    The pipeline is rebuilt with a seed of (seed, rank, epoch) at each epoch, so an epoch's order and
    augmentations depend on its number alone; a resume at sample ``start`` of an epoch runs that epoch's
    pipeline and drops its first ``start / batch_size`` batches (decoded again: a mid-epoch resume costs that
    much reading). Ranks read contiguous parts of the images (DALI's readers), rotated by the epoch, every rank
    as many whole batches; the samples past the last whole batch of a part are not seen that epoch."""

    def __init__(self, files, labels, cfg, image_size: int, batch_size: int, rank: int, world: int, seed: int,
                 device_id: int | None, num_threads: int):  # fmt: skip
        import tempfile

        from conmim.data.dali_loader import dali_paths, dali_status

        why = dali_status()
        if why is not None:
            raise ValueError(f"loader dali: {why}")
        self._links = tempfile.TemporaryDirectory(prefix="conmim-dali-")  # removed with the loader
        self.files, self.labels = dali_paths(list(files), self._links.name), list(labels)
        self.cfg, self.image_size, self.batch_size = cfg, image_size, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.device_id, self.num_threads = device_id, num_threads
        policy = None if cfg.auto_augment in (None, "none") else cfg.auto_augment
        self.rand_augment = None if policy is None else rand_augment_args(policy)
        self.epoch, self.start, self.it = 0, 0, None
        # every rank takes the smallest part's whole batches
        self.per_rank = len(self.files) // world // batch_size * batch_size
        self.set_epoch(0)

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Build the epoch's pipeline afresh (a pipeline run twice would continue its reader's shuffle)."""
        self.start, self.epoch = start, epoch
        self.it = self._build(epoch)

    def _build(self, epoch: int):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.auto_aug import rand_augment
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from conmim.data.dali_loader import _dali_errors, decode_device
        from conmim.data.views import IMAGENET_MEAN, IMAGENET_STD

        cfg, size, ra = self.cfg, self.image_size, self.rand_augment
        seed = (self.seed * 1_000_003 + self.rank * 7_919 + epoch * 104_729) % (2**31 - 1)

        @pipeline_def(enable_conditionals=True)
        def labelled():
            encoded, label = fn.readers.file(
                files=self.files, labels=self.labels, shard_id=(self.rank + epoch) % self.world,
                num_shards=self.world, random_shuffle=True, pad_last_batch=True, name="Reader", seed=seed,
            )  # fmt: skip
            image = fn.decoders.image(encoded, device=decode_device(self.device_id), output_type=types.RGB)
            image = fn.random_resized_crop(
                image, size=[size, size], random_area=[cfg.crop_scale_min, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                interp_type=types.INTERP_CUBIC, antialias=True,
            )  # fmt: skip
            if ra is not None:
                image = rand_augment.rand_augment(image, shape=[size, size], **ra)
            image = fn.crop_mirror_normalize(
                image, mirror=fn.random.coin_flip(probability=cfg.hflip), output_layout="CHW", dtype=types.FLOAT,
                mean=[m * 255.0 for m in IMAGENET_MEAN], std=[v * 255.0 for v in IMAGENET_STD],
            )  # fmt: skip
            return image, label

        pipe = labelled(
            batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id, seed=seed
        )
        with _dali_errors():
            pipe.build()
            return DALIGenericIterator(
                [pipe], ["image", "label"], reader_name="Reader", last_batch_policy=LastBatchPolicy.DROP,
                auto_reset=True,
            )  # fmt: skip

    def __iter__(self):
        from timm.data.random_erasing import RandomErasing

        from conmim.data.dali_loader import _dali_errors

        erase = None
        if self.cfg.reprob > 0:
            erase = RandomErasing(self.cfg.reprob, mode="pixel", max_count=1, device="cpu")
        skip, done = self.start // self.batch_size, 0
        with _dali_errors():
            for out in self.it:
                if done * self.batch_size >= self.per_rank:
                    continue  # a longer part's extra batch (every rank takes as many), drained
                x, y = out[0]["image"], out[0]["label"].reshape(-1).long()
                done += 1
                if done <= skip:
                    continue
                if erase is not None:
                    erase.device = x.device
                    with _Seeded(sample_seed(self.seed, self.epoch, self.rank * 1_000_003 + done)):
                        x = erase(x)
                yield x, y


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


__all__ = [
    "PAD_LABEL",
    "DaliLabelledLoader",
    "LabelledImages",
    "class_subset",
    "eval_loader",
    "sample_seed",
    "train_loader",
]
