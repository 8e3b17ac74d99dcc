"""conmim-finetune's configuration: a frozen dataclass whose fields carry default, help and allowed values, YAML
presets in ``conmim/configs/finetune/``, command-line overrides, one validation.

The helpers here (``option``, ``resolve``, ``parse_args``, ``dump``) are this module's own small versions of the
project-wide configuration API; they keep its signatures so that switching to it changes the imports only.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

PRESET_DIR = "configs/finetune"
PRESETS = ("official", "cpu_demo")
DEFAULT_PRESET = "official"


class ConfigError(ValueError):
    """A bad configuration key or value (the message names it)."""


def option(default, help: str, choices: tuple | None = None, check=None):
    """A config field: its default, one-line help, allowed values and a range check ``check(value) -> bool``."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "check": check})


positive = lambda v: v > 0
non_negative = lambda v: v >= 0
at_least_one = lambda v: v >= 1
unit = lambda v: 0 <= v <= 1
_RANGE_TEXT = {positive: "> 0", non_negative: ">= 0", at_least_one: ">= 1", unit: "in [0, 1]"}


@dataclass(frozen=True)
class FinetuneConfig:
    """A resolved, validated conmim-finetune configuration. Defaults are the official ConMIM/BEiT recipe
    (``run_class_finetuning.py`` with the ViT-B command of the official README)."""

    # what to fine-tune, on what
    init: str | None = option(
        None,
        "initialisation: a conmim-train run folder (its newest checkpoint), an exported .safetensors file "
        "(with its .json sidecar), or none (random initialisation: the from-scratch baseline)",
    )
    which: str = option(
        "teacher",
        "network of a run folder to start from (ConMIM fine-tunes the teacher)",
        ("teacher", "student"),
    )
    data: str | None = option(
        None, "labelled folder with train/<class>/ and val/<class>/, or samples:mnist (bundled digits)"
    )
    out: str | None = option(None, "run folder (config, metrics, checkpoints, results); required")
    train_fraction: float = option(
        1.0, "fraction of each class's training images used (low-label runs; chosen with seed)", check=unit
    )
    model: str | None = option(
        None, "network (a conmim.models.MODELS key); default: the one the init was pretrained with"
    )
    image_size: int | None = option(None, "input side in pixels; default: the init's", check=at_least_one)
    patch_size: int | None = option(None, "patch side in pixels; default: the init's", check=at_least_one)
    baseline: bool = option(
        False, "also fine-tune the same network from random initialisation (in OUT/scratch) and report both"
    )
    # network
    drop_path: float = option(0.1, "stochastic depth rate of the last block (linear from 0)", check=unit)
    init_scale: float = option(0.001, "the new head's initial weights are scaled by this", check=non_negative)
    # optimisation
    epochs: int = option(100, "training epochs", check=at_least_one)
    warmup_epochs: float = option(20, "linear warm-up from 0 over this many epochs", check=non_negative)
    batch_size: int = option(128, "images per rank per micro-batch (even: mixup pairs a batch with its flip)",
                             check=at_least_one)  # fmt: skip
    accum_steps: int = option(
        1, "micro-batches per optimizer step (gradient accumulation)", check=at_least_one
    )
    lr: float = option(
        4e-3, "peak learning rate at a global batch of lr_batch (linear scaling)", check=positive
    )
    lr_batch: int = option(1024, "global batch at which lr applies: peak = lr * global batch / lr_batch",
                           check=at_least_one)  # fmt: skip
    min_lr: float = option(1e-6, "learning rate at the end of the cosine", check=non_negative)
    layer_decay: float = option(0.65, "layer-wise learning-rate decay (1: none)", check=unit)
    weight_decay: float = option(0.05, "AdamW weight decay (not on 1-D params, tokens, position tables)",
                                 check=non_negative)  # fmt: skip
    beta1: float = option(0.9, "AdamW beta1", check=unit)
    beta2: float = option(0.999, "AdamW beta2", check=unit)
    clip_grad: float = option(0.0, "gradient-norm clipping (0: off)", check=non_negative)
    # augmentation and loss
    auto_augment: str | None = option("rand-m9-mstd0.5-inc1", "timm RandAugment policy (none: off)")
    crop_scale_min: float = option(0.08, "random-resized-crop smallest area fraction", check=unit)
    hflip: float = option(0.5, "horizontal flip probability", check=unit)
    reprob: float = option(0.25, "random erasing probability", check=unit)
    mixup: float = option(0.8, "mixup alpha (0: off)", check=non_negative)
    cutmix: float = option(1.0, "cutmix alpha (0: off)", check=non_negative)
    mixup_prob: float = option(1.0, "probability of mixup or cutmix per batch", check=unit)
    mixup_switch_prob: float = option(
        0.5, "probability of cutmix rather than mixup when both are on", check=unit
    )
    smoothing: float = option(0.1, "label smoothing", check=unit)
    eval_crop_pct: float = option(
        0.875, "validation: resize to image_size / crop_pct, centre crop", check=unit
    )
    # machinery
    seed: int = option(0, "seed of the labelled subset, the head, the data order, augmentations and mixup")
    device: str = option("auto", "auto: cuda when available", ("auto", "cpu", "cuda"))
    precision: str = option("bf16", "autocast dtype (fp32: none)", ("bf16", "fp32"))
    grad_checkpointing: bool = option(False, "recompute block activations in backward (less memory)")
    num_workers: int = option(8, "data-loading worker processes per rank", check=non_negative)
    eval_every: int = option(
        1, "epochs between validations (the last epoch is always validated)", check=at_least_one
    )
    eval_batch_size: int = option(192, "validation images per forward pass", check=at_least_one)
    log_every: int = option(20, "optimizer steps between metrics records", check=at_least_one)
    checkpoint_every: int = option(0, "also checkpoint every this many optimizer steps (0: epoch ends only)",
                                   check=non_negative)  # fmt: skip
    keep_last: int = option(2, "checkpoints kept", check=at_least_one)
    progress: bool = option(True, "progress bar on stderr")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _convert(cls, key: str, value):
    """``value`` as ``key``'s type (an integral float to int, an int to float, "none" to None), or ConfigError."""
    f = _fields(cls)[key]
    kind = typing.get_type_hints(cls)[key]
    optional = isinstance(kind, types.UnionType)
    if optional:
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        kind = next(k for k in kind.__args__ if k is not type(None))
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
    choices, check = f.metadata["choices"], f.metadata["check"]
    if choices and value not in choices:
        raise ConfigError(f"config key {key!r} must be one of {choices}, got {value!r}")
    if check is not None and value is not None and not check(value):
        raise ConfigError(f"config key {key!r} must be {_RANGE_TEXT.get(check, 'valid')}, got {value!r}")
    return value


def _read_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def read_preset(name_or_path: str) -> dict:
    """A preset's (or YAML file's) keys, unvalidated."""
    if name_or_path in PRESETS:
        text = resources.files("conmim").joinpath(f"{PRESET_DIR}/{name_or_path}.yaml").read_text()
        return _read_yaml(text, f"preset {name_or_path}")
    p = Path(name_or_path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"--config {name_or_path!r}: no such file and not a preset (presets: {', '.join(PRESETS)})"
        )
    return _read_yaml(p.read_text(), str(p))


def resolve(cls, preset: str | None = DEFAULT_PRESET, overrides: dict | None = None):
    """defaults <- preset or YAML file <- overrides, each key checked against its type, choices and range once."""
    known = _fields(cls)
    values = {}
    for where, layer in (
        (f"--config {preset}", read_preset(preset) if preset else {}),
        ("command line", overrides or {}),
    ):
        for key, value in layer.items():
            if key not in known:
                raise ConfigError(
                    f"{where}: unknown config key {key!r} (known keys: {', '.join(sorted(known))})"
                )
            values[key] = _convert(cls, key, value)
    cfg = cls(**values)
    for key in known:  # the defaults too: a range check on a default is a check of this file
        _convert(cls, key, getattr(cfg, key))
    return cfg


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


def parser(cls, prog: str, description: str = "") -> argparse.ArgumentParser:
    """argparse generated from the fields: ``--key VALUE`` for each, plus ``--config NAME_OR_YAML``."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--config",
        default=DEFAULT_PRESET,
        help=f"a preset ({', '.join(PRESETS)}) or a YAML file of the keys below (default: {DEFAULT_PRESET})",
    )
    for name, f in _fields(cls).items():
        extra = f" (choices: {', '.join(map(str, f.metadata['choices']))})" if f.metadata["choices"] else ""
        p.add_argument(
            f"--{name}", dest=name, type=_parse_value, default=argparse.SUPPRESS, metavar="VALUE",
            help=f"{f.metadata['help']}{extra} (default: {f.default})",
        )  # fmt: skip
    return p


def parse_args(cls, prog: str, argv: list[str] | None = None, description: str = ""):
    """The validated config from ``argv``: the preset or file of ``--config``, then the other flags."""
    ns = vars(parser(cls, prog, description).parse_args(argv))
    preset = ns.pop("config")
    return resolve(cls, None if str(preset).lower() == "none" else preset, ns)


def dump(cfg, path: Path) -> None:
    """The resolved config as YAML, written through a temporary file renamed into place."""
    from conmim._fs import write_atomic

    write_atomic(Path(path), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
