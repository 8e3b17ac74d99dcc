"""conmim-import FILE --out OUT.safetensors: the official ConMIM checkpoints, read safely, in conmim's formats.

Reads a checkpoint written by the official code (TencentARC/ConMIM): a pretraining checkpoint, student
(checkpoint-E.pth) or teacher (checkpoint_copy-E.pth), {'model', 'optimizer', 'epoch', 'scaler', 'args'} with
args an argparse.Namespace, or a fine-tuned model ({'model': ...} or {'module': ...}, BEiT layout with a
relative position table per block, mean pooling). It is read with torch.load(weights_only=True), allowing
argparse.Namespace and nothing else. Every key is mapped or reported: a key with no place is an error.

Writes:
  OUT (.safetensors) + OUT.json   the backbone in timm's Beit layout, the shared relative position table copied
                                  into every block (as the official fine-tuning does); the sidecar has the same
                                  fields as conmim-export's and the timm.create_model call that loads it.
  OUT_STEM.encoder.safetensors    (pretraining checkpoints) a ConMIMEncoder state dict: backbone (shared table),
  + .json                         mask token and projection head, for conmim.models.build_encoder(model,
                                  **kwargs) and init_from / load_state_dict.
The optimizer and loss-scaler state are not imported.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

from conmim._fs import write_atomic
from conmim.models import MODELS, read_weights

# official (embed_dim, depth) -> conmim model
_SIZES = {(384, 12): "beit_small_conmim", (768, 12): "beit_base_conmim", (1024, 24): "beit_large_conmim"}
_HEADS = {384: 6, 768: 12, 1024: 16}

_BLOCK = re.compile(
    r"blocks\.(\d+)\.(norm1\.(weight|bias)|norm2\.(weight|bias)|attn\.(q_bias|v_bias|qkv\.weight|proj\.(weight|bias)"
    r"|relative_position_bias_table|relative_position_index)|mlp\.fc[12]\.(weight|bias)|gamma_[12])$"
)
_TOP = re.compile(
    r"(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|fc_norm\.(weight|bias)"
    r"|head\.(weight|bias)|rel_pos_bias\.relative_position_(bias_table|index))$"
)
_PROJ = re.compile(r"projectors\.(\d+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
_DROPPED = re.compile(r"(lm_head\.(weight|bias)|rel_pos_bias2\.relative_position_(bias_table|index))$")


class LayoutError(ValueError):
    """A checkpoint that is not an official ConMIM checkpoint, or has keys with no place."""


def _unwrap(obj: dict, path: Path) -> tuple[dict, argparse.Namespace | None, int | None]:
    args = obj.get("args") if isinstance(obj.get("args"), argparse.Namespace) else None
    epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
    for key in ("model", "module"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        raise LayoutError(
            f"{str(path)!r} is not an official ConMIM checkpoint: no cls_token / patch_embed.proj.weight "
            f"among its {len(sd)} tensors"
        )
    return sd, args, epoch


def architecture(sd: dict, args: argparse.Namespace | None) -> dict:
    """timm Beit keyword arguments of the official network in ``sd`` (shapes first, ``args`` for what shapes
    do not say: the layer-scale value)."""
    dim = sd["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK.match(k)))
    patch = sd["patch_embed.proj.weight"].shape[-1]
    table = sd.get(
        "rel_pos_bias.relative_position_bias_table", sd.get("blocks.0.attn.relative_position_bias_table")
    )
    if table is not None:
        heads = table.shape[1]
        side = (math.isqrt(table.shape[0] - 3) + 1) // 2  # (2 W - 1)^2 + 3 entries for a W x W grid
    elif "pos_embed" in sd:
        heads = _HEADS.get(dim) or (dim // 64)
        side = math.isqrt(sd["pos_embed"].shape[1] - 1)
    else:
        raise LayoutError("the checkpoint has neither a relative position table nor a position embedding")
    if args is not None and getattr(args, "input_size", None) not in (None, side * patch):
        raise LayoutError(
            f"args.input_size {args.input_size} disagrees with the checkpoint's grid {side}x{side}"
        )
    ls = "blocks.0.gamma_1" in sd
    init_values = float(getattr(args, "layer_scale_init_value", 0.1) or 0.1) if ls else None
    return dict(
        img_size=side * patch,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        qkv_bias="blocks.0.attn.q_bias" in sd,
        init_values=init_values,
        use_abs_pos_emb="pos_embed" in sd,
        use_rel_pos_bias="blocks.0.attn.relative_position_bias_table" in sd,
        use_shared_rel_pos_bias="rel_pos_bias.relative_position_bias_table" in sd,
        use_fc_norm="fc_norm.weight" in sd,
    )


def _check_index(key: str, value: torch.Tensor, side: int) -> None:
    """A saved relative position index must be the one timm computes (else the tables would be misread)."""
    from timm.models.beit import gen_relative_position_index

    if not torch.equal(value.long(), gen_relative_position_index((side, side))):
        raise LayoutError(f"{key} is not the standard BEiT relative position index for a {side}x{side} grid")


def convert(sd: dict, arch: dict) -> tuple[dict, dict, list[str]]:
    """(timm Beit state dict with per-block tables, ConMIMEncoder state dict or {}, dropped keys). Every key of
    ``sd`` is mapped, dropped by name (the unused BEiT lm_head), or an LayoutError."""
    side = arch["img_size"] // arch["patch_size"]
    timm_sd, enc, dropped, unmapped = {}, {}, [], []
    for k, v in sd.items():
        if k.endswith("relative_position_index"):
            _check_index(k, v, side)
            dropped.append(k)  # a buffer timm computes
        elif _BLOCK.match(k) or _TOP.match(k):
            if k != "rel_pos_bias.relative_position_bias_table":
                timm_sd[k] = v
            if not k.startswith(("head.", "fc_norm.")):
                enc["backbone." + k] = v
        elif k == "mask_token":
            enc["mask_token"] = v
        elif m := _PROJ.match(k):
            enc[f"head.net.{m.group(1)}.{m.group(2)}"] = v
        elif _DROPPED.match(k):
            dropped.append(k)
        else:
            unmapped.append(k)
    if unmapped:
        raise LayoutError(
            f"{len(unmapped)} keys have no place in the BEiT layout: {', '.join(sorted(unmapped))}"
        )
    shared = sd.get("rel_pos_bias.relative_position_bias_table")
    if shared is not None:
        for i in range(arch["depth"]):
            timm_sd[f"blocks.{i}.attn.relative_position_bias_table"] = shared.clone()
    if "mask_token" not in enc:
        enc = {}
    return (
        {k: v.contiguous() for k, v in timm_sd.items()},
        {k: v.contiguous() for k, v in enc.items()},
        dropped,
    )


def _timm_name(arch: dict) -> str:
    return "beit_large_patch16_224" if arch["embed_dim"] == 1024 else "beit_base_patch16_224"


def _encoder_spec(arch: dict, sd: dict) -> dict:
    """conmim model name and build_encoder keyword arguments for the encoder file."""
    name = _SIZES.get((arch["embed_dim"], arch["depth"]), "beit_base_conmim")
    spec = MODELS[name][1]
    mine = dict(arch, use_fc_norm=False)
    defaults = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
    overrides = {k: v for k, v in mine.items() if spec.get(k, defaults.get(k)) != v}
    linears = sorted(int(m.group(1)) for k in sd if (m := _PROJ.match(k)) and sd[k].dim() == 2)
    hidden, out = (
        sd[f"projectors.{linears[0]}.weight"].shape[0],
        sd[f"projectors.{linears[-1]}.weight"].shape[0],
    )
    return {"model": name, "head_hidden": hidden, "head_out": out, "kwargs": overrides}


def normalisation(args: argparse.Namespace | None) -> tuple[tuple, tuple]:
    """(mean, std) the official network was trained with: ImageNet's with --imagenet_default_mean_and_std (the
    README's ViT-L and fine-tuning commands, assumed when there are no args), else the script default 0.5."""
    from timm.data import (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        IMAGENET_INCEPTION_MEAN,
        IMAGENET_INCEPTION_STD,
    )

    if args is None or getattr(args, "imagenet_default_mean_and_std", True):
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return tuple(IMAGENET_INCEPTION_MEAN), tuple(IMAGENET_INCEPTION_STD)


def _load_call(timm_name: str, kwargs: dict, path: Path, num_classes: int, norm: tuple) -> str:
    overlay = [f"file={str(path)!r}", f"mean={norm[0]!r}", f"std={norm[1]!r}"]
    if num_classes:  # timm drops a classifier whose size differs from its pretrained config's
        overlay.append(f"num_classes={num_classes}")
    args = [
        repr(timm_name),
        "pretrained=True",
        f"pretrained_cfg_overlay=dict({', '.join(overlay)})",
        f"num_classes={num_classes}",
        *(f"{k}={v!r}" for k, v in kwargs.items()),
    ]
    return f"timm.create_model({', '.join(args)})"


def import_checkpoint(src, out) -> dict:
    """Convert the official checkpoint ``src`` and write ``out`` (+ .json) and, for a pretraining checkpoint,
    the encoder file beside it. Returns the sidecar dict, with "encoder" (path or None) and "dropped" added."""
    from safetensors.torch import save

    src = Path(src).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint {str(src)!r} does not exist")
    out = Path(out).expanduser().resolve()
    if out.suffix != ".safetensors" or out.is_dir():
        raise ValueError(f"--out must name a .safetensors file to write, got {str(out)!r}")
    sd, args, epoch = _unwrap(read_weights(src), src)
    arch = architecture(sd, args)
    timm_sd, enc, dropped = convert(sd, arch)
    kwargs = {k: v for k, v in arch.items() if k != "use_shared_rel_pos_bias"}
    kwargs.update(use_rel_pos_bias=arch["use_rel_pos_bias"] or arch["use_shared_rel_pos_bias"])
    kwargs["use_shared_rel_pos_bias"] = False
    num_classes = timm_sd["head.weight"].shape[0] if "head.weight" in timm_sd else 0
    which = "teacher" if "_copy" in src.name else ("student" if enc else "fine-tuned")
    origin = f"official ConMIM {which} {src.name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    enc_path = None
    if enc:
        enc_path = out.with_name(out.name.removesuffix(".safetensors") + ".encoder.safetensors")
        spec = _encoder_spec(arch, sd)
        write_atomic(enc_path, save(enc, metadata={"format": "pt", "source": origin}))
        write_atomic(str(enc_path) + ".json", json.dumps({**spec, "which": which, "epoch": epoch}, indent=1))
    write_atomic(out, save(timm_sd, metadata={"format": "pt", "source": origin}))
    meta = {"timm_model": _timm_name(arch), "kwargs": kwargs, "step": None, "which": which, "epoch": epoch}
    meta["mean"], meta["std"] = normalisation(args)
    meta["load"] = _load_call(meta["timm_model"], kwargs, out, num_classes, (meta["mean"], meta["std"]))
    write_atomic(str(out) + ".json", json.dumps(meta, indent=1))
    return {**meta, "encoder": str(enc_path) if enc_path else None, "dropped": dropped}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="conmim-import",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="an official ConMIM checkpoint (checkpoint-E.pth, checkpoint_copy-E.pth, or a fine-tuned model)")  # fmt: skip
    p.add_argument(
        "--out", required=True, help="the .safetensors file to write (timm Beit layout; sidecar .json)"
    )
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        meta = import_checkpoint(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"conmim-import: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"imported the {meta['which']} network"
        + (f" of epoch {meta['epoch']}" if meta["epoch"] is not None else "")
    )
    if meta["dropped"]:
        print(f"not imported (unused or recomputed): {', '.join(meta['dropped'])}")
    print(f"wrote {args.out} (timm Beit layout); load it with: {meta['load']}")
    if meta["encoder"]:
        print(f"wrote {meta['encoder']} (ConMIMEncoder state dict; conmim-train init_from accepts it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
