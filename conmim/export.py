"""conmim-export RUN_DIR --out FILE: the teacher's backbone in timm's key layout, as safetensors.

No mask token, no projection head, no ``module.`` / ``_orig_mod.`` prefixes; a JSON sidecar (FILE + ".json") names
the timm model and the keyword arguments to create it with. Load it with::

    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=FILE), num_classes=10, **kwargs)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from conmim import config as cfgmod
from conmim.models import model_spec

_PREFIXES = ("module.", "_orig_mod.")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def backbone_state(state_dict: dict) -> dict:
    """``backbone.*`` entries of an encoder state dict, renamed to timm's keys (everything else dropped)."""
    out = {}
    for key, value in state_dict.items():
        key = _strip(key)
        if key.startswith("backbone."):
            out[key[len("backbone.") :]] = value.detach().cpu().contiguous()
    if not out:
        raise ValueError("the state dict holds no backbone.* entries: not a conmim encoder")
    return out


def export(run_dir, out_file, which: str = "teacher") -> tuple[Path, dict]:
    """Write the newest loadable checkpoint's ``which`` ("teacher" or "student") backbone to ``out_file``.
    Returns (file, {"timm_model": name, "kwargs": {...}})."""
    from safetensors.torch import save_file

    from conmim import fsdp
    from conmim.train import load_latest

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist")
    log = lambda m: print(f"conmim-export: {m}", file=sys.stderr)
    state = fsdp.load_latest_state_dict(run, log) or load_latest(run, log)  # an FSDP run's DCP folders first
    if state is None:
        raise FileNotFoundError(f"run folder {str(run)!r} holds no loadable checkpoint")
    cfg = cfgmod._read_yaml((run / "config.yaml").read_text(), str(run / "config.yaml"))
    timm_name, kwargs = model_spec(cfg["model"])
    kwargs.update(img_size=cfg["image_size"], patch_size=cfg["patch_size"])
    weights = backbone_state(state[which])
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata={"format": "pt", "source": f"conmim {which} step {state['step']}"})
    meta = {"timm_model": timm_name, "kwargs": kwargs, "step": state["step"], "which": which}
    Path(str(out) + ".json").write_text(json.dumps(meta, indent=1))
    return out, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="conmim-export", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher")
    args = p.parse_args(argv)
    try:
        path, meta = export(args.run_dir, args.out, args.which)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"conmim-export: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {path} ({meta['timm_model']}, {meta['kwargs']}); load with timm.create_model("
        f"{meta['timm_model']!r}, pretrained=True, pretrained_cfg_overlay=dict(file={str(path)!r}), **kwargs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
