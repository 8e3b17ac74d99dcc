"""The paper's pretraining recipes: the official values beside conmim's presets, and the global-batch rule.

``python -m conmim.recipes`` prints docs/recipes.md (``--write PATH`` writes it), generated from the presets
conmim/configs/conmim_vit_{s,b,l}.yaml so that the table cannot drift from them. The official values are those
of TencentARC/ConMIM's run_conmim_pretraining.py (its argparse defaults) plus the README's command for the size.

``batch_note(model, global_batch, lr)`` is the start-up warning for a global batch other than the paper's 2048.
The LR rule is *keep*: conmim uses ``lr`` as given whatever the global batch (the official script does too; it
has no scaling rule). The note shows what the linear scaling rule (lr x global / 2048) would give.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PAPER_GLOBAL_BATCH = 2048  # 64 images per GPU x 32 GPUs, for ViT-S, -B and -L
# conmim models whose paper recipe ran at PAPER_GLOBAL_BATCH (the timm-ViT presets follow the same recipe)
PAPER_MODELS = frozenset(
    {
        "beit_small_conmim",
        "beit_base_conmim",
        "beit_large_conmim",
        "vit_small_patch16_224",
        "vit_base_patch16_224",
        "vit_large_patch16_224",
    }
)
PRESETS = {"conmim_vit_s": "ViT-S/16", "conmim_vit_b": "ViT-B/16", "conmim_vit_l": "ViT-L/16"}

SCRIPT = "script default"
README_L = "README ViT-L command"


@dataclass(frozen=True)
class Official:
    """One official setting: how the official code spells it, where it comes from, its value in conmim's terms
    and, where plain equality is not the test, how a conmim value is judged equal."""

    text: str
    source: str
    value: object
    same: Callable[[object], bool] | None = None

    def matches(self, value) -> bool:
        if self.same is not None:
            return self.same(value)
        if isinstance(self.value, float) or isinstance(value, float):
            return math.isclose(float(value), float(self.value), rel_tol=1e-12)
        return value == self.value


def _official_common() -> dict[str, Official]:
    return {
        "image_size": Official("--input_size 224", SCRIPT, 224),
        "patch_size": Official("patch16 models", SCRIPT, 16),
        "head_hidden": Official("projector mlp_dim 4096", SCRIPT, 4096),
        "head_out": Official("projector dim 256", SCRIPT, 256),
        "batch_size": Official("--batch_size 64 per process (x 32 GPUs = 2048)", SCRIPT, 64),
        "accum_steps": Official("no accumulation", SCRIPT, 1),
        "epochs": Official("--epochs 300", SCRIPT, 300),
        "lr": Official("--lr 5e-4", SCRIPT, 5e-4),
        "min_lr": Official("--min_lr 1e-5", SCRIPT, 1e-5),
        "warmup_epochs": Official("--warmup_epochs 5 (linear from 0)", SCRIPT, 5),
        "weight_decay": Official("--weight_decay 0.05, constant (--weight_decay_end unset)", SCRIPT, 0.05),
        "beta1": Official("--opt_betas 0.9 0.98", SCRIPT, 0.9),
        "beta2": Official("--opt_betas 0.9 0.98", SCRIPT, 0.98),
        "clip_grad": Official("--clip_grad None (no clipping)", SCRIPT, 0.0),
        "precision": Official("fp16 autocast + GradScaler", SCRIPT, "fp16"),
        "temperature": Official("--temp 0.1", SCRIPT, 0.1),
        "base_momentum": Official("--t_momentum 0.996", SCRIPT, 0.996),
        "final_momentum": Official("cosine_scheduler(0.996, 1, ...): 1 is the end point", SCRIPT, 1.0),
        "mask": Official("--mask_type block", SCRIPT, "block"),
        "mask_ratio": Official(
            "--num_mask_patches 75 (of 196)", SCRIPT, 75 / 196, lambda v: round(float(v) * 196) == 75
        ),
        "perturb": Official("teacher view: jitter 0.8, grey 0.2, blur 0.1, solarise 0.2", SCRIPT, True),
        "crop_scale_min": Official("random resized crop scale (0.08, 1)", SCRIPT, 0.08),
        "seed": Official("--seed 0", SCRIPT, 0),
    }


def official(preset: str) -> dict[str, Official]:
    """The official value of every recipe key of ``preset`` (one of PRESETS)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    rows = _official_common()
    if preset == "conmim_vit_s":
        rows["model"] = Official("conmim_small_patch16_224, layer scale 0.1", SCRIPT, "beit_small_conmim")
    elif preset == "conmim_vit_b":
        rows["model"] = Official("conmim_base_patch16_224, layer scale 0.1", SCRIPT, "beit_base_conmim")
        rows["epochs"] = Official("800 (the README's ViT-B model)", "README model zoo", 800)
    else:
        rows["model"] = Official(
            "conmim_large_patch16_224, --layer_scale_init_value 1e-5", README_L, "beit_large_conmim"
        )
        rows.update(
            epochs=Official("--epochs 1600", README_L, 1600),
            batch_size=Official("--batch_size 64 per process (x 32 GPUs = 2048)", README_L, 64),
            lr=Official("--lr 7.5e-4", README_L, 7.5e-4),
            warmup_epochs=Official("--warmup_epochs 10", README_L, 10),
            clip_grad=Official("--clip_grad 1.0", README_L, 1.0),
            mask=Official("--mask_type random_mps32", README_L, "cell"),
            mask_ratio=Official("--mask_ratio 0.75", README_L, 0.75),
            mask_cell=Official("32 px mask cells over 16 px patches", README_L, 2),
        )
    return {"model": rows.pop("model"), **rows}


# Settings of the official code that conmim's configuration has no key for: (setting, official, conmim).
NO_KEY = [
    (
        "input normalisation",
        "script default: mean = std = (0.5, 0.5, 0.5); the ViT-L and fine-tuning commands pass "
        "--imagenet_default_mean_and_std (ImageNet mean/std)",
        "ImageNet mean/std always (equal for ViT-L; S/B differ from the script default)",
    ),
    (
        "weight-decay exclusions",
        "1-D parameters, biases, pos_embed, cls_token (the mask token and relative position table decay)",
        "also the mask token is excluded (the relative position table decays, as official)",
    ),
    ("drop path", "--drop_path 0", "none (equal)"),
    ("AdamW epsilon", "--opt_eps 1e-8", "torch's 1e-8 (equal)"),
    (
        "block masking shape",
        "min 16 patches per block, aspect 0.3-3.3, 10 tries",
        "block_masks defaults (equal)",
    ),
    (
        "schedules",
        "per step; warm-up linspace(0, lr, W) reaches lr at step W - 1; then cosine to min_lr; momentum cosine",
        "per step; warm-up lr x step / W reaches lr at step W (slope lr / W, not lr / (W - 1)); cosine and momentum equal",
    ),
    ("unused parts", "lm_head (8192-way BEiT head), --second_input_size 112 (tokenizer input)", "not built"),
]


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _preset_values(preset: str) -> dict:
    from conmim import config as cfgmod

    cfg = cfgmod.resolve(
        cfgmod.TrainConfig, preset, {"data": "samples:mnist"}
    )  # data: required, not a recipe value
    return {k: getattr(cfg, k) for k in official(preset)}


def markdown() -> str:
    """docs/recipes.md: per preset, each official value beside the preset's, and what has no key."""
    out = [
        "# The paper's recipes",
        "",
        "Generated by `python -m conmim.recipes` from the presets in `conmim/configs/`; a test checks that this",
        "file matches them. Official values: TencentARC/ConMIM's run_conmim_pretraining.py defaults plus the",
        "README command for the size. Start one with `conmim-train --config conmim_vit_b --data ...`.",
        "",
        f"**Global batch and learning rate.** The paper trains every size at a global batch of {PAPER_GLOBAL_BATCH}",
        "(64 images per GPU x 32 GPUs). conmim's global batch is `batch_size x accum_steps x processes`; when it",
        f"differs from {PAPER_GLOBAL_BATCH}, conmim-train warns at start-up. The rule is **keep**: `lr` is used as",
        "given (as the official script does); the warning shows what linear scaling (`lr x global / 2048`) would",
        "give, for you to pass as `--lr` if you want it.",
        "",
    ]
    for preset, title in PRESETS.items():
        values = _preset_values(preset)
        out += [
            f"## {title}: `--config {preset}`",
            "",
            "| key | official | source | conmim | equal |",
            "|---|---|---|---|---|",
        ]
        for key, off in official(preset).items():
            ok = "yes" if off.matches(values[key]) else "**no**"
            out.append(f"| `{key}` | {off.text} | {off.source} | `{_fmt(values[key])}` | {ok} |")
        out.append("")
    out += [
        "## Official settings with no conmim key",
        "",
        "| setting | official | conmim |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in NO_KEY),
        "",
    ]
    return "\n".join(out)


def differences(preset: str) -> list[str]:
    """Keys of ``preset`` whose value differs from the official one (empty: the recipe is the paper's)."""
    values = _preset_values(preset)
    return [k for k, off in official(preset).items() if not off.matches(values[k])]


def batch_line(model: str, global_batch: int, lr: float) -> str:
    """The start-up line: the global batch and the LR rule, always."""
    return f"global batch {global_batch} (batch_size x accum_steps x processes), lr {lr:g} used as given (rule: keep)"


def batch_note(model: str, global_batch: int, lr: float) -> str | None:
    """A warning when ``global_batch`` differs from the paper's for ``model`` (None when it matches, or when
    the model has no paper recipe, e.g. the demo models)."""
    if model not in PAPER_MODELS or global_batch == PAPER_GLOBAL_BATCH:
        return None
    return (
        f"global batch {global_batch} differs from the paper's {PAPER_GLOBAL_BATCH} for {model}: lr {lr:g} is "
        f"kept as given; linear scaling (lr x {global_batch} / {PAPER_GLOBAL_BATCH}) would give "
        f"{lr * global_batch / PAPER_GLOBAL_BATCH:.3g}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m conmim.recipes", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", metavar="PATH", help="write the table to PATH instead of printing it")
    args = p.parse_args(argv)
    text = markdown()
    if args.write:
        Path(args.write).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
