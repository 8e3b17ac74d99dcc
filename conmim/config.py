"""conmim-train's configuration: YAML defaults, presets, command-line overrides, validation."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

PRESETS = ("tiny_demo", "vit_s", "vit_b", "vit_l")
CHOICES = {
    "loader": ("auto", "dali", "torch"),
    "precision": ("bf16", "fp16", "fp32"),
    "mask": ("block", "cell"),
    "device": ("auto", "cpu", "cuda"),
}
# Keys that define the network: a run folder's checkpoints only fit a configuration with the same values.
ARCH_KEYS = ("model", "image_size", "patch_size", "head_hidden", "head_out")


class ConfigError(ValueError):
    """A bad configuration key or value (the message names it)."""


def _read_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def defaults() -> dict:
    return _read_yaml(resources.files("conmim").joinpath("configs/default.yaml").read_text(), "default.yaml")


def _load_config_file(name_or_path: str) -> dict:
    if name_or_path in PRESETS:
        text = resources.files("conmim").joinpath(f"configs/{name_or_path}.yaml").read_text()
        return _read_yaml(text, f"preset {name_or_path}")
    p = Path(name_or_path)
    if not p.is_file():
        raise ConfigError(
            f"--config {name_or_path!r}: no such file and not a preset (presets: {', '.join(PRESETS)})"
        )
    return _read_yaml(p.read_text(), str(p))


def _check_value(key: str, value, default):
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key {key!r} must be one of {CHOICES[key]}, got {value!r}")
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
            value = int(value)
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    return value


def resolve(config: str | None = None, overrides: dict | None = None) -> dict:
    """defaults <- preset or YAML file <- overrides; every key checked against the defaults."""
    cfg = defaults()
    layers = []
    if config:
        layers.append((f"--config {config}", _load_config_file(config)))
    if overrides:
        layers.append(("command line", overrides))
    for where, layer in layers:
        for key, value in layer.items():
            if key not in cfg:
                raise ConfigError(
                    f"{where}: unknown config key {key!r} (known keys: {', '.join(sorted(cfg))})"
                )
            cfg[key] = _check_value(key, value, defaults()[key])
    for key in (
        "batch_size",
        "accum_steps",
        "epochs",
        "log_every",
        "keep_last",
        "max_bad_steps",
        "image_size",
        "patch_size",
    ):
        if cfg[key] is None or cfg[key] < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {cfg[key]!r}")
    if cfg["image_size"] % cfg["patch_size"]:
        raise ConfigError(
            f"image_size {cfg['image_size']} must be a multiple of patch_size {cfg['patch_size']}"
        )
    if cfg["lr"] <= 0 or cfg["min_lr"] < 0 or cfg["temperature"] <= 0:
        raise ConfigError("lr and temperature must be > 0 and min_lr >= 0")
    if not 0 < cfg["crop_scale_min"] <= 1:
        raise ConfigError(f"config key 'crop_scale_min' must lie in (0, 1], got {cfg['crop_scale_min']}")
    if not 0 < cfg["mask_ratio"] < 1:
        raise ConfigError(f"config key 'mask_ratio' must lie in (0, 1), got {cfg['mask_ratio']}")
    from conmim.models import MODELS

    if cfg["model"] not in MODELS:
        raise ConfigError(f"unknown model {cfg['model']!r}; expected one of {sorted(MODELS)}")
    if cfg["data"] is None:
        raise ConfigError("config key 'data' is required: an image folder, samples:photos or samples:mnist")
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


def dump(cfg: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=True))
    tmp.replace(path)
