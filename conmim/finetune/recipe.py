"""The fine-tuning recipe, assembled from timm's parts: the classifier (mean-pooled, fc_norm, drop path, small
head init), its initialisation from a conmim run or an exported file, layer-wise LR decay through timm's
optimizer factory, the cosine schedule, Mixup/CutMix with label smoothing, RandAugment transforms and the loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from conmim.finetune.config import FinetuneConfig


# ------------------------------------------------------------------------------------------- initialisation
def read_pretraining_checkpoint(run_dir: Path, log) -> dict | None:
    """The newest verified checkpoint of a conmim-train run folder as ``{"student": sd, "teacher": sd, ...}``,
    or None. Every read of a pretraining run goes through here."""
    from conmim.checkpoint import read_latest

    return read_latest(run_dir, log, verb="initialising from")


@dataclass(frozen=True)
class Init:
    """Where the weights come from: the timm architecture, its backbone weights (None: random init), a label."""

    timm_name: str
    kwargs: dict
    weights: dict | None
    source: str


def resolve_init(cfg: FinetuneConfig, log=lambda m: None) -> Init:
    """The architecture and backbone weights ``cfg.init`` names: a run folder, an exported file, or none.
    ``cfg.model``/``image_size``/``patch_size`` override the architecture (required with ``init: none``)."""
    from conmim.export import backbone_state
    from conmim.models import model_spec

    spec = cfg.init
    weights, kwargs = None, {}
    if spec is None or str(spec).lower() == "none":
        if cfg.model is None:
            raise ValueError("init none (from scratch) needs model: a conmim.models.MODELS key")
        timm_name, kwargs = model_spec(cfg.model)
        source = "none"
    else:
        src = Path(spec).expanduser()
        source = str(src)
        if src.is_dir():
            from conmim import config as cfgmod

            if not (src / "config.yaml").is_file():
                raise FileNotFoundError(
                    f"init {spec!r}: a run folder must hold config.yaml (from conmim-train)"
                )
            run_cfg = cfgmod.read_file(src / "config.yaml")
            timm_name, kwargs = model_spec(run_cfg["model"])
            kwargs.update(img_size=run_cfg["image_size"], patch_size=run_cfg["patch_size"])
            state = read_pretraining_checkpoint(src, log)
            if state is None:
                raise FileNotFoundError(f"init {spec!r}: the run folder holds no loadable checkpoint")
            weights = backbone_state(state[cfg.which])
        elif src.is_file():
            sidecar = Path(str(src) + ".json")
            if not sidecar.is_file():
                raise FileNotFoundError(f"init {spec!r}: an exported file needs its sidecar {sidecar.name}")
            meta = json.loads(sidecar.read_text())
            timm_name, kwargs = meta["timm_model"], dict(meta["kwargs"])
            from safetensors.torch import load_file

            weights = load_file(str(src))
        else:
            raise FileNotFoundError(
                f"init {spec!r}: neither a run folder, an exported .safetensors file, nor none"
            )
        if cfg.model is not None and model_spec(cfg.model)[0] != timm_name:
            raise ValueError(f"model {cfg.model!r} differs from the init's network ({timm_name})")
    if cfg.patch_size is not None:
        if weights is not None and kwargs.get("patch_size", cfg.patch_size) != cfg.patch_size:
            raise ValueError(f"patch_size {cfg.patch_size} differs from the init's {kwargs['patch_size']}")
        kwargs["patch_size"] = cfg.patch_size
    if cfg.image_size is not None:
        if weights is not None and kwargs.get("img_size", cfg.image_size) != cfg.image_size:
            log(
                f"image_size {cfg.image_size} differs from the init's {kwargs['img_size']}: position embeddings "
                "and relative position tables are resampled to the new grid of patches"
            )
        kwargs["img_size"] = cfg.image_size
    return Init(timm_name, kwargs, weights, source)


def _expand_shared_rel_pos(weights: dict, model: nn.Module) -> dict:
    """A BEiT checkpoint's shared relative position table copied into every block's own table, as the official
    fine-tuning does (the fine-tuned network gives each block its own)."""
    shared = weights.pop("rel_pos_bias.relative_position_bias_table", None)
    weights.pop("rel_pos_bias.relative_position_index", None)
    if shared is not None:
        for i in range(len(model.blocks)):
            weights.setdefault(f"blocks.{i}.attn.relative_position_bias_table", shared.clone())
    return weights


def _resample_to_grid(weights: dict, model: nn.Module) -> dict:
    """Position tables pretrained at another image size, resampled to the model's grid of patches with timm's
    functions (as timm's own checkpoint filters and BEiT's fine-tuning at 384 px do): the absolute position
    embedding bicubically, its class-token entry kept; relative position bias tables to the new window."""
    from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

    own = model.state_dict()
    grid = list(model.patch_embed.grid_size)
    out = dict(weights)
    for key, value in weights.items():
        if key not in own or own[key].shape == value.shape:
            continue
        if key == "pos_embed":
            prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
            out[key] = resample_abs_pos_embed(value, new_size=grid, num_prefix_tokens=prefix)
        elif key.endswith("relative_position_index"):
            del out[key]  # the network computes its own for its grid
        elif key.endswith("relative_position_bias_table"):
            out[key] = resize_rel_pos_bias_table(
                value, new_window_size=tuple(grid), new_bias_shape=own[key].shape
            )
        else:
            raise ValueError(
                f"init weights do not fit the network: {key} is {tuple(value.shape)}, the network's "
                f"{tuple(own[key].shape)}"
            )
    return out


def build_classifier(init: Init, num_classes: int, cfg: FinetuneConfig, seed: int) -> nn.Module:
    """The timm network of ``init`` with a ``num_classes`` head on mean-pooled patch tokens (``fc_norm`` after
    the pool, the final block norm dropped, as BEiT's fine-tuning), drop path ``cfg.drop_path`` and a head
    initialised trunc-normal(0.02) x ``cfg.init_scale`` with zero bias; backbone weights loaded from ``init``.
    Random parts are drawn from ``seed``."""
    import timm

    kwargs = dict(init.kwargs)
    if kwargs.pop("use_shared_rel_pos_bias", False):
        kwargs["use_rel_pos_bias"] = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(
            init.timm_name, pretrained=False, num_classes=num_classes, global_pool="avg",
            drop_path_rate=cfg.drop_path, **kwargs,
        )  # fmt: skip
        head = model.get_classifier()
        with torch.no_grad():
            nn.init.trunc_normal_(head.weight, std=0.02)
            head.weight.mul_(cfg.init_scale)
            nn.init.zeros_(head.bias)
    if init.weights is not None:
        load_backbone_weights(model, dict(init.weights))
    return model


def load_backbone_weights(model: nn.Module, weights: dict) -> None:
    """Load pretrained backbone weights into a classifier: the head and ``fc_norm`` stay new, the pretraining's
    final ``norm`` is dropped where the classifier pools before its norm; any other missing or unexpected key
    is an error (a wrong file is never half-loaded silently)."""
    weights = _resample_to_grid(_expand_shared_rel_pos(weights, model), model)
    own = model.state_dict()
    new = {k for k in own if k.startswith(("head.", "fc_norm."))}
    unused = {k for k in weights if k.startswith("norm.") and k not in own}
    weights = {k: v for k, v in weights.items() if k not in unused and k not in new}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in new and "relative_position_index" not in k]
    if missing or unexpected:
        raise ValueError(
            f"init weights do not fit the network: missing {missing[:6]}, unexpected {list(unexpected)[:6]}"
        )


# -------------------------------------------------------------------------------------------- optimisation
def peak_lr(cfg: FinetuneConfig, world: int) -> float:
    """The linear scaling rule: ``lr`` holds at a global batch of ``lr_batch`` (official: 4e-3 at 1024)."""
    return cfg.lr * cfg.batch_size * world * cfg.accum_steps / cfg.lr_batch


def make_optimizer(model: nn.Module, cfg: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW through timm's optimizer factory with layer-wise LR decay: each group carries ``lr_scale`` =
    decay ** (depth + 1 - layer), layers numbered as BEiT's (patch embedding and tokens 0, block i i + 1,
    final norm and head depth + 1); no weight decay on 1-D parameters and the model's ``no_weight_decay()``
    names (class token, position embedding, relative position tables)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(
        model, "adamw", lr=lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
        layer_decay=cfg.layer_decay if cfg.layer_decay < 1 else None,
    )  # fmt: skip


def make_scheduler(opt: torch.optim.Optimizer, cfg: FinetuneConfig, total_steps: int, warmup_steps: int):
    """timm's per-step cosine: linear warm-up from 0 over ``warmup_steps``, then cosine to ``min_lr`` at
    ``total_steps``; it applies each group's ``lr_scale``. Stateless: ``step_update(step)`` sets the LRs."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(
        opt, t_initial=max(1, total_steps - warmup_steps), lr_min=cfg.min_lr, warmup_t=warmup_steps,
        warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
    )  # fmt: skip


# ------------------------------------------------------------------------------------- augmentation, loss
def make_mixup(cfg: FinetuneConfig, num_classes: int):
    """timm's Mixup/CutMix (per batch) with label smoothing folded into its soft targets; None when both
    alphas are 0 (then the loss smooths the hard labels)."""
    from timm.data import Mixup

    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
        mode="batch", label_smoothing=cfg.smoothing, num_classes=num_classes,
    )  # fmt: skip


def make_criterion(cfg: FinetuneConfig, mixup) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


def posterize_keep_zero_bits(img, bits_to_keep, **kwargs):
    """timm's RandAugment posterize, keeping Pillow < 13's answer for 0 bits (an all-black image): Pillow 13
    refuses 0 bits, which the official policy ('inc1' at magnitude 10, reached with mstd 0.5) asks for."""
    if bits_to_keep <= 0:
        from PIL import Image

        return Image.new(img.mode, img.size)
    return _TIMM_POSTERIZE(img, bits_to_keep, **kwargs)


_TIMM_POSTERIZE = None


def _posterize_compat() -> None:
    """Route timm's posterize ops through :func:`posterize_keep_zero_bits` (before any policy is built: the
    ops look their function up when created)."""
    global _TIMM_POSTERIZE
    from timm.data import auto_augment as aa

    if _TIMM_POSTERIZE is None:
        _TIMM_POSTERIZE = aa.posterize
    for name, fn in aa.NAME_TO_OP.items():
        if fn is _TIMM_POSTERIZE:
            aa.NAME_TO_OP[name] = posterize_keep_zero_bits


def make_transforms(cfg: FinetuneConfig, image_size: int):
    """(train, eval) transforms from timm's ``create_transform`` on PIL images: random-resized crop (bicubic),
    flip, RandAugment, ImageNet normalisation, random erasing; eval: resize to size / crop_pct, centre crop."""
    from timm.data import create_transform

    from conmim.data.views import IMAGENET_MEAN, IMAGENET_STD

    _posterize_compat()
    policy = None if cfg.auto_augment in (None, "none") else cfg.auto_augment
    train = create_transform(
        image_size, is_training=True, scale=(cfg.crop_scale_min, 1.0), hflip=cfg.hflip, auto_augment=policy,
        interpolation="bicubic", re_prob=cfg.reprob, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )  # fmt: skip
    val = create_transform(
        image_size, is_training=False, interpolation="bicubic", crop_pct=cfg.eval_crop_pct, mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )  # fmt: skip
    return train, val
