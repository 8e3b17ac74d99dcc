"""Configuration for conmim's command-line tools: typed dataclasses whose fields carry their own default, help
text, choices and range check (the one source of truth), YAML presets as overlays, and argparse generated from
the fields.

    cfg = resolve(TrainConfig, "tiny_demo", {"epochs": 2})      # defaults <- preset or YAML file <- overrides
    cfg = parse_args(TrainConfig, "conmim-train", sys.argv[1:])  # the same from a command line

Every value is checked once, when the configuration is resolved, so nothing downstream re-validates and a bad
value fails before anything is written. ``dump`` saves a resolved configuration as YAML (a run folder's
``config.yaml``), which ``resolve`` reads back as a file.
"""

import argparse
import dataclasses
import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from conmim._fs import write_atomic
from conmim.data import LOADERS, MASKS, SCANS, ViewConfig
from conmim.models import MODELS
from conmim.parallel import DEVICES, PRECISIONS, STRATEGIES


class ConfigError(ValueError):
    """A bad configuration key or value (the message names it)."""


# --------------------------------------------------------------------------------------------- range checks
# Each returns None when the value is acceptable, else what was expected (the error names key and value).
def at_least(low):
    return lambda v: None if math.isfinite(v) and v >= low else f"a finite number >= {low}"


def above(low):
    return lambda v: None if math.isfinite(v) and v > low else f"a finite number > {low}"


def within(low, high, closed=(True, True)):
    lo_ok = (lambda v: v >= low) if closed[0] else (lambda v: v > low)
    hi_ok = (lambda v: v <= high) if closed[1] else (lambda v: v < high)
    text = f"{'[' if closed[0] else '('}{low}, {high}{']' if closed[1] else ')'}"
    return lambda v: None if math.isfinite(v) and lo_ok(v) and hi_ok(v) else f"a number in {text}"


def option(default, help: str, choices=None, check: Callable[[Any], str | None] | None = None, arch=False):
    """A config field: its default, its one-line help, its allowed values or range check, and whether it
    defines the network (``arch``: a run folder's checkpoints only fit a configuration with the same value)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "check": check}
    meta["arch"] = arch
    return dataclasses.field(default=default, metadata=meta)


def arch(cfg) -> dict:
    """The values of ``cfg``'s network-defining fields."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("arch")}


# ------------------------------------------------------------------------------------------- conmim-train
_POSITIVE_INT = at_least(1)


@dataclass(frozen=True)
class TrainConfig:
    """conmim-train's configuration; each field's help is its ``--help`` text."""

    PRESET_DIR = "configs"  # presets: conmim/configs/<name>.yaml, overlays on these defaults

    model: str = option("vit_small_patch16_224", "network (conmim.models.MODELS)", choices=MODELS, arch=True)
    image_size: int = option(224, "input side in pixels", check=_POSITIVE_INT, arch=True)
    patch_size: int = option(16, "ViT patch side in pixels (image_size must be a multiple)", check=_POSITIVE_INT, arch=True)  # fmt: skip
    head_hidden: int = option(4096, "hidden width of the projection head", check=_POSITIVE_INT, arch=True)
    head_out: int = option(256, "output width of the projection head (the loss's feature size)", check=_POSITIVE_INT, arch=True)  # fmt: skip
    in_chans: int = option(3, "image channels: 3 RGB, 1 grayscale (every image reduced to one channel)", choices=(1, 3), arch=True)  # fmt: skip
    init_from: str | None = option(None, "start the backbone (student, so the teacher too) from existing weights: a .safetensors/.pth file, a conmim run folder (its teacher), a conmim-import output, or a timm model name whose weights are in the local Hub cache; mask token and projection head stay fresh")  # fmt: skip
    data: str | None = option(None, "an image folder, a text file listing image paths, tar shards (DIR/*.tar or shards-{000000..000099}.tar), or samples:photos / samples:mnist (bundled, built on first use)")  # fmt: skip
    scan: str = option("content", "how data files are checked before training: content re-reads and digests every file and decodes new or changed ones; stat trusts size/mtime/ctime on a warm index; off checks nothing (trusted data: a bad file stops the run)", choices=SCANS)  # fmt: skip
    mean: list[float] | None = option(None, "per-channel mean of [0, 1] pixels (unset: ImageNet's for 3 channels, 0.5 for 1)")  # fmt: skip
    std: list[float] | None = option(None, "per-channel std of [0, 1] pixels (unset: ImageNet's for 3 channels, 0.25 for 1)")  # fmt: skip
    out: str = option("runs/conmim", "run folder: config, checkpoints, metrics.jsonl, loss_curve.png")
    loader: str = option("auto", "data loader", choices=LOADERS)
    num_workers: int = option(
        4, "data-loading workers (torch) or threads (DALI) per process", check=at_least(0)
    )
    batch_size: int = option(64, "images per process per micro-batch", check=_POSITIVE_INT)
    accum_steps: int = option(1, "micro-batches of batch_size per optimizer step", check=_POSITIVE_INT)
    epochs: int = option(300, "passes over the data", check=_POSITIVE_INT)
    max_steps: int | None = option(None, "stop after this many optimizer steps (demos, CI; unset: no limit)", check=_POSITIVE_INT)  # fmt: skip
    lr: float = option(5e-4, "peak learning rate, reached after the warm-up", check=above(0))
    min_lr: float = option(1e-5, "learning rate at the end of the cosine decay", check=at_least(0))
    warmup_epochs: float = option(
        10.0, "linear warm-up length in epochs (fractions allowed)", check=at_least(0)
    )
    weight_decay: float = option(0.05, "AdamW weight decay (not on norms, biases, tokens, position embeddings)", check=at_least(0))  # fmt: skip
    beta1: float = option(0.9, "AdamW beta1", check=within(0, 1, (True, False)))
    beta2: float = option(0.98, "AdamW beta2", check=within(0, 1, (True, False)))
    clip_grad: float = option(1.0, "clip the gradient norm to this value (0: no clipping)", check=at_least(0))
    precision: str = option("bf16", "autocast dtype (fp16 adds a gradient scaler)", choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the student")
    temperature: float = option(0.1, "softmax temperature of the patch contrast loss", check=above(0))
    base_momentum: float = option(
        0.996, "teacher EMA momentum at step 0 (cosine schedule)", check=within(0, 1)
    )
    final_momentum: float = option(1.0, "teacher EMA momentum at the last step", check=within(0, 1))
    mask: str = option("block", "block (BEiT block-wise) or cell (SimMIM cells)", choices=MASKS)
    mask_ratio: float = option(
        0.3827, "fraction of patches masked (75 / 196)", check=within(0, 1, (False, False))
    )
    mask_cell: int = option(2, "cell side in patches (mask: cell)", check=_POSITIVE_INT)
    perturb: bool = option(
        True, "colour jitter, grey and blur on the teacher's view (ConMIM's perturbations)"
    )
    crop_scale_min: float = option(0.08, "random-resized-crop area range [crop_scale_min, 1]", check=within(0, 1, (False, True)))  # fmt: skip
    seed: int = option(0, "seeds weights, views, masks and sampling")
    device: str = option("auto", "where to train", choices=DEVICES)
    strategy: str = option("ddp", "ddp: DistributedDataParallel under torchrun (one process trains the model as is) | fsdp: FSDP2, student, teacher and AdamW state sharded over the ranks", choices=STRATEGIES)  # fmt: skip
    reshard_after_forward: bool = option(True, "fsdp: free each block's gathered parameters after its forward, gather again in the backward")  # fmt: skip
    grad_checkpointing: bool = option(False, "recompute each transformer block's activations in the backward (ddp or fsdp)")  # fmt: skip
    log_every: int = option(10, "log metrics every this many optimizer steps (also when bad steps are checked)", check=_POSITIVE_INT)  # fmt: skip
    checkpoint_every: int = option(0, "also checkpoint every this many optimizer steps (0: only at epoch ends)", check=at_least(0))  # fmt: skip
    keep_last: int = option(3, "keep this many newest checkpoints", check=_POSITIVE_INT)
    keep_every_epochs: int = option(50, "also keep the epoch-end checkpoint of every epoch divisible by this (0: none)", check=at_least(0))  # fmt: skip
    max_bad_steps: int = option(10, "stop after this many skipped steps (non-finite loss) in a row", check=_POSITIVE_INT)  # fmt: skip
    progress: bool = option(True, "show a progress bar")
    record_samples: bool = option(False, "write the dataset indices each rank reads, per epoch (samples-e<E>-r<R>.txt)")  # fmt: skip
    eval_every: int = option(0, "log the teacher's k-NN top-1 on eval_data every this many epochs (0: never)", check=at_least(0))  # fmt: skip
    eval_data: str = option("samples:mnist", "labelled folder with train/ and val/ (one sub-folder per class) for eval_every")  # fmt: skip

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr {self.min_lr} must not exceed lr {self.lr}")
        if self.base_momentum > self.final_momentum:
            raise ConfigError(
                f"base_momentum {self.base_momentum} must not exceed final_momentum {self.final_momentum}"
            )
        if self.data is None:
            raise ConfigError(
                "config key 'data' is required: an image folder, samples:photos or samples:mnist"
            )
        try:
            ViewConfig(image_size=self.image_size, channels=self.in_chans, mean=self.mean, std=self.std)
        except ValueError as exc:
            raise ConfigError(f"config keys in_chans/mean/std: {exc}") from None
        if self.eval_every and self.in_chans != 3:
            raise ConfigError(
                "eval_every (the k-NN monitor) needs in_chans 3: it reads its labelled set as RGB"
            )


# ------------------------------------------------------------------------------------------------ machinery
def presets(cls) -> tuple[str, ...]:
    """The preset names of ``cls``: the YAML files in its ``PRESET_DIR``."""
    folder = resources.files("conmim").joinpath(cls.PRESET_DIR)
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")))


def _read_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def read_file(path) -> dict:
    """A YAML mapping from ``path`` (e.g. a run folder's config.yaml), unvalidated; ConfigError if malformed or
    unreadable."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{str(path)!r} cannot be read ({exc.strerror or exc})") from None
    return _read_yaml(text, str(path))


def _layer(cls, name_or_path: str) -> dict:
    if name_or_path in presets(cls):
        text = resources.files("conmim").joinpath(f"{cls.PRESET_DIR}/{name_or_path}.yaml").read_text()
        return _read_yaml(text, f"preset {name_or_path}")
    if not Path(name_or_path).is_file():
        raise ConfigError(
            f"--config {name_or_path!r}: no such file and not a preset (presets: {', '.join(presets(cls))})"
        )
    return read_file(name_or_path)


def _base_type(field: dataclasses.Field):
    kind = field.type  # a type: this module does not postpone annotations
    if isinstance(kind, types.UnionType):  # X | None
        return next(k for k in kind.__args__ if k is not type(None)), True
    return kind, False


def _check_value(field: dataclasses.Field, value):
    """``value`` converted to ``field``'s type (an integral float to int, an int to float) and checked against
    its choices and range, or ConfigError naming the key."""
    key, kind = field.name, None
    kind, optional = _base_type(field)
    if value is None and optional:
        return None
    choices = field.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key {key!r} must be one of {choices}, got {value!r}")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    elif kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        value = kind(value)
    elif kind is str and not isinstance(value, str):
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    elif getattr(kind, "__origin__", None) is list:  # list[float]
        numbers = isinstance(value, (list, tuple)) and value
        if not numbers or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in value):
            raise ConfigError(f"config key {key!r} must be a list of numbers, got {value!r}")
        value = [float(x) for x in value]
    check = field.metadata.get("check")
    expected = check(value) if check is not None else None
    if expected is not None:
        raise ConfigError(f"config key {key!r} must be {expected}, got {value!r}")
    return value


def resolve(cls, config: str | None = None, overrides: dict | None = None):
    """defaults <- preset or YAML file <- overrides; every key checked once against its type and range."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    layers = [(f"--config {config}", _layer(cls, config))] if config else []
    if overrides:
        layers.append(("command line", overrides))
    for where, layer in layers:
        for key, value in layer.items():
            if key not in fields:
                raise ConfigError(f"{where}: unknown config key {key!r} (known keys: {', '.join(fields)})")
            values[key] = _check_value(fields[key], value)
    try:
        return cls(**values)
    except TypeError as exc:  # a required field without a default
        raise ConfigError(str(exc)) from None


def _parse_value(raw: str):
    """A command-line value: int, then float (YAML 1.1 reads 3e-4 as a string), then YAML, then the string."""
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parser(cls, prog: str, description: str = "", epilog: str = "") -> argparse.ArgumentParser:
    """argparse for ``cls``: ``--config`` (a preset or YAML file) and one ``--key value`` per field, with the
    field's help, choices and default; values are parsed as YAML scalars and checked by :func:`resolve`."""
    p = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s [--config PRESET_OR_YAML] [--KEY VALUE ...]",
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only what was given overrides the preset
    )
    p.add_argument("--config", help=f"a preset ({', '.join(presets(cls))}) or a YAML file of the keys below")
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        what = f" ({' | '.join(map(str, choices))})" if choices and len(choices) < 8 else ""
        p.add_argument(
            f"--{f.name}",
            type=_parse_value,
            metavar=f.name.upper(),
            help=f"{f.metadata.get('help', '')}{what} (default: {f.default})",
        )
    return p


def dump(cfg, path) -> None:
    """Write ``cfg`` as YAML, atomically."""
    write_atomic(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=True))
