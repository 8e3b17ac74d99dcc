"""The NVIDIA DALI loader: file reader, decode (``mixed`` on a GPU, ``cpu`` with ``device_id=None`` without
one: the only difference between the two), one random-resized crop and one flip shared by both views, the
teacher branch's photometric perturbation, ImageNet normalisation, NCHW float output.

DALI is imported lazily (``pip install -e ".[dali]"``). Every file given to it must decode: conmim.data.scan
excludes bad files first, since one undecodable JPEG aborts a DALI pipeline.
"""

from __future__ import annotations

import contextlib

from conmim.data.shards import DALI_EXT, ShardSet
from conmim.data.views import ViewConfig


def dali_status() -> str | None:
    """None when DALI imports, else why not."""
    try:
        import nvidia.dali
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as exc:
        return f"NVIDIA DALI is not available ({type(exc).__name__}: {exc}); pip install -e '.[dali]'"
    return None


def dali_paths(files, workdir) -> list[str]:
    """``files`` as names DALI can take: DALI's Python binding takes UTF-8 strings only, so a file whose name
    is not UTF-8 (a str with surrogate escapes) is reached through a link with a plain name in ``workdir``."""
    import os

    out = []
    for i, f in enumerate(files):
        try:
            f.encode("utf-8")
            out.append(f)
        except UnicodeEncodeError:
            link = os.path.join(
                workdir, f"{i:012d}{os.path.splitext(f)[1].encode('ascii', 'replace').decode()}"
            )
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(f), link)
            out.append(link)
    return out


def decode_device(device_id: int | None) -> str:
    """ "mixed" (decode on the GPU) when a GPU is used, "cpu" otherwise."""
    return "cpu" if device_id is None else "mixed"


def _pipeline(
    files,
    shards,
    cfg: ViewConfig,
    shard_id: int,
    num_shards: int,
    seed: int,
    device_id: int | None,
    batch_size: int,
    num_threads: int,
    shuffle: bool,
):
    from nvidia.dali import fn, pipeline_def, types

    mean = [m * 255.0 for m in cfg.mean]
    std = [s * 255.0 for s in cfg.std]
    b, c, s, h = cfg.jitter

    def jitter(image):
        brightness = fn.random.uniform(range=[1 - b, 1 + b])
        contrast = fn.random.uniform(range=[1 - c, 1 + c])
        if cfg.channels == 1:  # saturation and hue do not exist for one channel
            return fn.brightness_contrast(image, brightness=brightness, contrast=contrast)
        return fn.color_twist(
            image, brightness=brightness, contrast=contrast,
            saturation=fn.random.uniform(range=[1 - s, 1 + s]), hue=fn.random.uniform(range=[-h * 360.0, h * 360.0]),
        )  # fmt: skip

    @pipeline_def(enable_conditionals=True)
    def two_views():
        if shards is None:
            encoded, index = fn.readers.file(
                files=list(files), labels=list(range(len(files))), shard_id=shard_id, num_shards=num_shards,
                random_shuffle=shuffle, pad_last_batch=True, name="Reader", seed=seed,
            )  # fmt: skip
        else:  # the sample number is the member name in our index files; source_info reports it
            paths, indexes, width = shards
            encoded = fn.readers.webdataset(
                paths=paths, index_paths=indexes, ext=[DALI_EXT], shard_id=shard_id, num_shards=num_shards,
                random_shuffle=shuffle, pad_last_batch=True, name="Reader", seed=seed,
                missing_component_behavior="error",
            )  # fmt: skip
            index = fn.pad(fn.get_property(encoded, key="source_info"), axes=[0], shape=[width], fill_value=0)
        kind = types.RGB if cfg.channels == 3 else types.GRAY
        image = fn.decoders.image(encoded, device=decode_device(device_id), output_type=kind)
        image = fn.random_resized_crop(
            image, size=[cfg.image_size, cfg.image_size], random_area=list(cfg.scale),
            random_aspect_ratio=list(cfg.ratio), interp_type=types.INTERP_CUBIC, antialias=True,
        )  # fmt: skip
        mirror = fn.random.coin_flip(probability=cfg.flip_p)
        student = fn.crop_mirror_normalize(
            image, mirror=mirror, mean=mean, std=std, output_layout="CHW", dtype=types.FLOAT
        )
        teacher = image
        if cfg.perturb:
            if fn.random.coin_flip(probability=cfg.jitter_p, dtype=types.BOOL):
                teacher = jitter(teacher)
            if cfg.channels == 3 and fn.random.coin_flip(probability=cfg.gray_p, dtype=types.BOOL):
                gray = fn.color_space_conversion(teacher, image_type=types.RGB, output_type=types.GRAY)
                teacher = fn.cat(gray, gray, gray, axis=2)
            if fn.random.coin_flip(probability=cfg.blur_p, dtype=types.BOOL):
                teacher = fn.gaussian_blur(teacher, sigma=fn.random.uniform(range=list(cfg.blur_sigma)))
            if fn.random.coin_flip(probability=cfg.solarize_p, dtype=types.BOOL):
                high = teacher >= 128
                teacher = fn.cast(teacher + high * (255 - 2 * teacher), dtype=types.UINT8)
        teacher = fn.crop_mirror_normalize(
            teacher, mirror=mirror, mean=mean, std=std, output_layout="CHW", dtype=types.FLOAT
        )
        return student, teacher, index

    return two_views(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)


class DaliTwoViewLoader:
    """Iterates (student, teacher, indices) batches from a DALI pipeline (``DALIGenericIterator`` with
    ``reader_name``); ``drop_last`` drops each epoch's partial batch, else it is returned trimmed.

    The pipeline is rebuilt with a seed derived from (seed, rank, epoch) whenever the epoch changes, so an epoch's
    order, crops and perturbations depend on its number alone: a run resumed at epoch e sees what an
    uninterrupted run saw there.

    Ranks: DALI's readers cut the samples into ``world_size`` contiguous parts (sizes differing by at most one)
    and shuffle within a part through a buffer; rank r reads part (r + epoch) mod world_size, so the parts move
    between ranks from epoch to epoch. Every rank yields the same number of batches (the largest part's,
    DALI's ``pad_last_batch``); with ``drop_last`` the samples past the last whole batch of a part are not seen
    that epoch, otherwise every sample is seen exactly once (a shorter part's last batch is just smaller).
    """

    def __init__(
        self,
        files,
        cfg: ViewConfig,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device_id: int | None,
        num_threads: int,
        drop_last: bool = True,
        shuffle: bool = True,
    ):
        import tempfile

        why = dali_status()
        if why is not None:
            raise RuntimeError(why)
        self._links = tempfile.TemporaryDirectory(prefix="conmim-dali-")  # removed with the loader
        self.shards = None
        if isinstance(files, ShardSet):
            paths, indexes = files.write_dali_indexes(self._links.name)
            paths = dali_paths(paths, self._links.name)
            width = max(len(p.encode()) for p in paths) + 48
            self.shards = (paths, indexes, width)
            files = None
        else:
            files = dali_paths(files, self._links.name)
        self.args = (files, cfg, rank, world_size)
        self.seed, self.device_id, self.batch_size, self.num_threads = (
            seed,
            device_id,
            batch_size,
            num_threads,
        )
        self.drop_last, self.shuffle = drop_last, shuffle
        self.epoch = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        files, cfg, rank, world_size = self.args
        seed = (self.seed * 1_000_003 + rank * 7_919 + epoch * 104_729) % (2**31 - 1)
        self.pipe = _pipeline(
            files,
            self.shards,
            cfg,
            (rank + epoch) % world_size,  # DALI splits the samples in contiguous parts: rotate them per epoch
            world_size,
            seed,
            self.device_id,
            self.batch_size,
            self.num_threads,
            self.shuffle,
        )
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        with _dali_errors():
            self.pipe.build()
            self.it = DALIGenericIterator(
                [self.pipe],
                ["student", "teacher", "index"],
                reader_name="Reader",
                last_batch_policy=policy,
                auto_reset=True,
            )
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.it)

    def __iter__(self):
        with _dali_errors():
            yield from self._batches()

    def _batches(self):
        for out in self.it:
            d = out[0]
            if d["student"].shape[0] == 0:  # a rank whose part ran out one batch early (partial batches only)
                continue
            if self.shards is None:
                yield d["student"], d["teacher"], d["index"].reshape(-1).long()
            else:
                yield d["student"], d["teacher"], _sample_numbers(d["index"])


@contextlib.contextmanager
def _dali_errors():
    """DALI's failure on a file the scan would have excluded (scan="off") as one line naming the cause."""
    try:
        yield
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "C++ context" not in ln]
        cause = next(
            (ln for ln in lines if "failed" in ln.lower() or "failure" in ln.lower()),
            lines[0] if lines else "",
        )
        raise RuntimeError(
            f"DALI stopped on a file it cannot read ({cause}); scan='content' (the default) finds and excludes "
            "such files before the run"
        ) from exc


def _sample_numbers(info):
    """Sample numbers from DALI's zero-padded ``source_info`` ("SHARD:OFFSET:NUMBER.img") rows."""
    import torch

    rows = info.cpu().numpy()
    return torch.tensor([int(bytes(r).rstrip(b"\0").rsplit(b":", 1)[1].split(b".")[0]) for r in rows])
