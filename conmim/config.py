"""conmim-train's configuration: YAML defaults, presets, command-line overrides, validation.

``configs/default.yaml`` is the source of truth for every key's default and help text; :class:`Config` gives each
key its type (a test keeps the two in step). :func:`resolve` layers defaults <- preset or file <- overrides and
validates once; the driver then reads typed attributes only.
"""

import dataclasses
import re
import types
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

PRESETS = ("tiny_demo", "vit_s", "vit_b", "vit_l")
CHOICES = {
    "loader": ("auto", "dali", "torch"),
    "precision": ("bf16", "fp16", "fp32"),
    "mask": ("block", "cell"),
    "device": ("auto", "cpu", "cuda"),
    "strategy": ("ddp", "fsdp"),
}
# Keys that define the network: a run folder's checkpoints only fit a configuration with the same values.
ARCH_KEYS = ("model", "image_size", "patch_size", "head_hidden", "head_out")
_AT_LEAST_ONE = ("batch_size", "accum_steps", "epochs", "log_every", "keep_last", "max_bad_steps", "image_size",
                 "patch_size")  # fmt: skip


class ConfigError(ValueError):
    """A bad configuration key or value (the message names it)."""


@dataclass(frozen=True)
class Config:
    """A resolved, validated conmim-train configuration (defaults and meanings: configs/default.yaml)."""

    model: str
    image_size: int
    patch_size: int
    head_hidden: int
    head_out: int
    data: str | None
    out: str
    loader: str
    num_workers: int
    batch_size: int
    accum_steps: int
    epochs: int
    max_steps: int | None
    lr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    beta1: float
    beta2: float
    clip_grad: float
    precision: str
    compile: bool
    temperature: float
    base_momentum: float
    final_momentum: float
    mask: str
    mask_ratio: float
    mask_cell: int
    perturb: bool
    crop_scale_min: float
    seed: int
    device: str
    strategy: str
    reshard_after_forward: bool
    grad_checkpointing: bool
    log_every: int
    checkpoint_every: int
    keep_last: int
    keep_every_epochs: int
    max_bad_steps: int
    progress: bool
    record_samples: bool
    eval_every: int
    eval_data: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def arch(self) -> dict:
        """The values of ARCH_KEYS (what a checkpoint's network depends on)."""
        return {k: getattr(self, k) for k in ARCH_KEYS}


_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}


def _read_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def read_file(path: Path) -> dict:
    """A YAML mapping from ``path`` (e.g. a run folder's config.yaml), unvalidated; ConfigError if malformed."""
    return _read_yaml(Path(path).read_text(), str(path))


def _default_text() -> str:
    return resources.files("conmim").joinpath("configs/default.yaml").read_text()


def defaults() -> dict:
    return _read_yaml(_default_text(), "default.yaml")


def help_lines() -> dict[str, str]:
    """Each key's one-line meaning: the comment after it in default.yaml."""
    found = (re.match(r"^(\w+):[^#]*#\s*(.*)$", line) for line in _default_text().splitlines())
    return {m.group(1): m.group(2).strip() for m in found if m}


def _load_config_file(name_or_path: str) -> dict:
    if name_or_path in PRESETS:
        text = resources.files("conmim").joinpath(f"configs/{name_or_path}.yaml").read_text()
        return _read_yaml(text, f"preset {name_or_path}")
    p = Path(name_or_path)
    if not p.is_file():
        raise ConfigError(
            f"--config {name_or_path!r}: no such file and not a preset (presets: {', '.join(PRESETS)})"
        )
    return read_file(p)


def _check_value(key: str, value):
    """``value`` converted to ``key``'s type (an integral float to int, an int to float), or ConfigError."""
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key {key!r} must be one of {CHOICES[key]}, got {value!r}")
    kind = _TYPES[key]
    if isinstance(kind, types.UnionType):  # X | None
        if value is None:
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
        return kind(value)
    elif kind is str and not isinstance(value, str):
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    return value


def _check_ranges(cfg: Config) -> None:
    for key in _AT_LEAST_ONE:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(cfg, key)!r}")
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"image_size {cfg.image_size} must be a multiple of patch_size {cfg.patch_size}")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.temperature <= 0:
        raise ConfigError("lr and temperature must be > 0 and min_lr >= 0")
    if not 0 < cfg.crop_scale_min <= 1:
        raise ConfigError(f"config key 'crop_scale_min' must lie in (0, 1], got {cfg.crop_scale_min}")
    if not 0 < cfg.mask_ratio < 1:
        raise ConfigError(f"config key 'mask_ratio' must lie in (0, 1), got {cfg.mask_ratio}")
    from conmim.models import MODELS

    if cfg.model not in MODELS:
        raise ConfigError(f"unknown model {cfg.model!r}; expected one of {sorted(MODELS)}")
    if cfg.eval_every < 0:
        raise ConfigError(f"config key 'eval_every' must be >= 0, got {cfg.eval_every}")
    if cfg.data is None:
        raise ConfigError("config key 'data' is required: an image folder, samples:photos or samples:mnist")


def resolve(config: str | None = None, overrides: dict | None = None) -> Config:
    """defaults <- preset or YAML file <- overrides; every key checked once against its type and range."""
    values = {key: _check_value(key, value) for key, value in defaults().items()}
    layers = []
    if config:
        layers.append((f"--config {config}", _load_config_file(config)))
    if overrides:
        layers.append(("command line", overrides))
    for where, layer in layers:
        for key, value in layer.items():
            if key not in values:
                raise ConfigError(
                    f"{where}: unknown config key {key!r} (known keys: {', '.join(sorted(values))})"
                )
            values[key] = _check_value(key, value)
    cfg = Config(**values)
    _check_ranges(cfg)
    return cfg


def parse_overrides(args: list[str]) -> dict:
    """['--lr', '1e-3', '--compile', 'true'] -> {'lr': 0.001, 'compile': True}."""
    out = {}
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"expected --key value, got {tok!r}")
        key = tok[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            raw = args[i + 1]
            i += 2
        out[key] = _parse_value(raw)
    return out


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


def options_help() -> str:
    """conmim-train's option list: every key with its default and meaning (from default.yaml)."""
    meaning, values = help_lines(), defaults()
    width = max(map(len, values)) + 2
    rows = [f"  --{key:<{width}} {meaning.get(key, '')} (default: {values[key]})" for key in values]
    return "\n".join(rows)


def dump(cfg: Config, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=True))
    tmp.replace(path)
