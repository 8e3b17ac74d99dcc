"""conmim-export RUN_DIR --out FILE: the teacher's backbone in timm's key layout, as safetensors.

No mask token, no projection head, no module. / _orig_mod. prefixes; a JSON sidecar (FILE + ".json") names
the timm model, the keyword arguments to create it with, the run's preprocessing and the exact call that loads
it, which is also printed:

    timm.create_model('vit_small_patch16_224', pretrained=True, pretrained_cfg_overlay=dict(file='FILE',
                      input_size=(3, 224, 224), mean=..., std=..., interpolation='bicubic', crop_pct=1.0,
                      crop_mode='center'), num_classes=0, global_pool='avg', fc_norm=False, img_size=224, ...)

The model's features are conmim-eval's: the mean of the patch tokens after the pretrained final norm
(global_pool='avg' with fc_norm=False, which keeps that norm before the pooling). Its pretrained_cfg carries the
run's preprocessing, so timm.data.resolve_data_config({}, model=model) and timm.data.create_transform rebuild
conmim-eval's transform (shorter side resized to the input size, bicubic, centre crop, the run's mean and std).
(num_classes=0: the backbone's features; num_classes=K adds a new K-class head for fine-tuning.) Both files are
written like any new file (0644 under the usual umask), each through a temporary file renamed into place.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from conmim import checkpoint
from conmim import config as cfgmod
from conmim._fs import write_atomic
from conmim.data.views import ViewConfig
from conmim.models import model_spec, strip_wrapper_prefixes


def backbone_state(state_dict: dict) -> dict:
    """``backbone.*`` entries of an encoder state dict, renamed to timm's keys (everything else dropped)."""
    out = {}
    for key, value in state_dict.items():
        key = strip_wrapper_prefixes(key)
        if key.startswith("backbone."):
            out[key[len("backbone.") :]] = value.detach().cpu().contiguous()
    if not out:
        raise ValueError("the state dict holds no backbone.* entries: not a conmim encoder")
    return out


def pooling(timm_name: str) -> dict:
    """timm keyword arguments for conmim-eval's features: the mean of the patch tokens after the final norm.
    A ViT's 'avg' pooling would otherwise move the norm after the pooling (fc_norm), dropping the trained one;
    conmim's Beit models already keep the final norm on every token (use_fc_norm=False in their spec)."""
    return (
        {"global_pool": "avg"} if timm_name.startswith("beit") else {"global_pool": "avg", "fc_norm": False}
    )


def preprocessing(cfg: dict) -> dict:
    """timm ``pretrained_cfg`` entries for conmim-eval's transform at the run's image size: resize the shorter
    side to the input size (bicubic), centre crop (crop_pct 1), normalise with the run's mean and std."""
    size = int(cfg["image_size"])
    views = ViewConfig(
        image_size=size, channels=int(cfg.get("in_chans", 3)), mean=cfg.get("mean"), std=cfg.get("std")
    )
    return {
        "input_size": (views.channels, size, size),
        "mean": tuple(float(m) for m in views.mean),
        "std": tuple(float(s) for s in views.std),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


def export(run_dir, out_file, which: str = "teacher") -> tuple[Path, dict]:
    """Write the newest loadable checkpoint's ``which`` ("teacher" or "student") backbone to ``out_file``.
    Returns (file, {"timm_model": name, "kwargs": {...}})."""
    from safetensors.torch import save

    run = Path(run_dir)
    out = Path(out_file).expanduser().resolve()
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a folder: name the .safetensors file to write")
    log = lambda m: print(f"conmim-export: {m}", file=sys.stderr)
    cfg, state = read_run(run, log, "exporting")
    timm_name, kwargs = model_spec(cfg["model"])
    kwargs.update(img_size=cfg["image_size"], patch_size=cfg["patch_size"])
    if cfg.get("in_chans", 3) != 3:
        kwargs["in_chans"] = cfg["in_chans"]
    weights = backbone_state(state[which])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        out, save(weights, metadata={"format": "pt", "source": f"conmim {which} step {state['step']}"})
    )
    kwargs.update(pooling(timm_name))
    meta = {
        "timm_model": timm_name,
        "kwargs": kwargs,
        "pretrained_cfg": preprocessing(cfg),
        "step": state["step"],
        "which": which,
    }
    meta["load"] = load_call(meta, out)
    write_atomic(str(out) + ".json", json.dumps(meta, indent=1))
    return out, meta


def read_run(run_dir, log=lambda line: None, verb: str = "reading") -> tuple[dict, dict]:
    """(the run's saved configuration, its newest verified checkpoint as plain state dicts). FileNotFoundError
    when the folder, its config.yaml or a verified checkpoint is missing: never a network that was not trained."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist")
    checkpoint.refuse_old_format(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a conmim-train run folder (it has no config.yaml)")
    cfg = cfgmod.read_file(run / "config.yaml")
    state = checkpoint.read_latest(run, log, verb)
    if state is None:
        raise FileNotFoundError(f"run folder {str(run)!r} holds no checkpoint that verifies")
    return cfg, state


def load_call(meta: dict, path) -> str:
    """The ``timm.create_model(...)`` call that loads an exported file, every argument spelled out: the file and
    the preprocessing go into the pretrained_cfg, where timm's data helpers read them."""
    overlay = {"file": str(path), **meta.get("pretrained_cfg", {})}
    args = [
        repr(meta["timm_model"]),
        "pretrained=True",
        f"pretrained_cfg_overlay=dict({', '.join(f'{k}={v!r}' for k, v in overlay.items())})",
        "num_classes=0",
        *(f"{k}={v!r}" for k, v in meta["kwargs"].items()),
    ]
    return f"timm.create_model({', '.join(args)})"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="conmim-export",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="a conmim-train run folder; its newest verified checkpoint is exported")
    p.add_argument(
        "--out", required=True, help="the .safetensors file to write (its sidecar gets .json added)"
    )
    p.add_argument(
        "--which",
        choices=("teacher", "student"),
        default="teacher",
        help="network to export (default: teacher, the one ConMIM fine-tunes)",
    )
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        path, meta = export(args.run_dir, args.out, args.which)
    except (FileNotFoundError, ValueError, KeyError, checkpoint.CheckpointError) as exc:
        print(f"conmim-export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {path}.json: the {args.which} backbone at optimizer step {meta['step']}")
    print(f"load it with: {meta['load']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
