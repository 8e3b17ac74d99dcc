"""ConMIM networks: a timm ViT or Beit wrapped (not forked) with a learned mask token, plus the projection head.

``build_encoder(name)`` returns a :class:`ConMIMEncoder`: masked patch embeddings are replaced by the mask token
before any position handling, the sequence keeps its length, and the projection head (Linear-BN-ReLU x 2,
Linear, BN without affine) maps all N + 1 tokens (BN statistics over the batch's tokens) before CLS is dropped.
The backbone's parameters keep timm's names, so ``export`` can hand them to ``timm.create_model``.

Two backbone families:

- ``vit_*``: timm ``VisionTransformer`` (learned absolute position embedding, q/k/v biases, timm's init), with
  layer scale. A supported alternative to the paper's network.
- ``beit_*_conmim``: the paper's network, timm ``Beit`` configured as the official ConMIM pretraining model: one
  relative position bias table shared by all blocks, no absolute position embedding, q and v biases (no k
  bias), layer scale 0.1 (S, B) or 1e-5 (L), LayerNorm eps 1e-6, and the official initialisation
  (:func:`official_init_`).

``init_from(encoder, source)`` starts the backbone from existing weights (a timm model, a file, a state dict).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from conmim._validate import check_patch_mask, check_vit_backbone

# The official pretraining model's layout in timm Beit's terms; ``use_fc_norm=False`` keeps the final LayerNorm
# (``norm``) that the pretraining model applies to every token (timm's default for global_pool="avg" would swap
# it for a pooled ``fc_norm``, the fine-tuning layout).
_OFFICIAL = dict(
    use_abs_pos_emb=False,
    use_rel_pos_bias=False,
    use_shared_rel_pos_bias=True,
    qkv_bias=True,
    use_fc_norm=False,
)

# name -> (timm model name, timm kwargs). The *_tiny_demo models are small enough to pretrain on a CPU in minutes.
# timm registers no small BEiT: beit_small_conmim is timm's beit_base_patch16_224 at ViT-S's width and heads.
MODELS = {
    "vit_tiny_demo": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4),
    ),
    "vit_small_patch16_224": ("vit_small_patch16_224", dict(init_values=0.1)),
    "vit_base_patch16_224": ("vit_base_patch16_224", dict(init_values=0.1)),
    "vit_large_patch16_224": ("vit_large_patch16_224", dict(init_values=1e-5)),
    "beit_tiny_demo": (
        "beit_base_patch16_224",
        dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, init_values=0.1, **_OFFICIAL),
    ),
    "beit_small_conmim": (
        "beit_base_patch16_224",
        dict(embed_dim=384, depth=12, num_heads=6, init_values=0.1, **_OFFICIAL),
    ),
    "beit_base_conmim": ("beit_base_patch16_224", dict(init_values=0.1, **_OFFICIAL)),
    "beit_large_conmim": ("beit_large_patch16_224", dict(init_values=1e-5, **_OFFICIAL)),
}

# Models built with the official ConMIM initialisation (official_init_) rather than timm's.
OFFICIAL_INIT = frozenset({"beit_tiny_demo", "beit_small_conmim", "beit_base_conmim", "beit_large_conmim"})


def model_spec(name: str) -> tuple[str, dict]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    timm_name, kwargs = MODELS[name]
    return timm_name, dict(kwargs)


def create_backbone(name: str, **overrides) -> nn.Module:
    """The timm ViT or Beit for ``name`` with no classifier head (num_classes=0), randomly initialised (the
    official ConMIM initialisation for the ``beit_*`` models)."""
    import timm

    timm_name, kwargs = model_spec(name)
    kwargs.update(overrides)
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
    if name in OFFICIAL_INIT:
        official_init_(model)
    return model


def _trunc_normal_(t: torch.Tensor, std: float) -> None:
    # The official code truncates at one standard deviation ([-std, std]), not timm's default [-2, 2].
    nn.init.trunc_normal_(t, std=std, a=-std, b=std)


@torch.no_grad()
def official_init_(module: nn.Module, std: float = 0.02) -> nn.Module:
    """The official ConMIM (BEiT) initialisation, in place, of a timm Beit or of a :class:`ConMIMEncoder`:
    every Linear and Conv2d weight truncated normal (std 0.02, cut at +-std), their biases, q/v biases and
    relative position tables zero, LayerNorm 1 / 0, class and mask tokens truncated normal, layer scale at its
    ``init_values``; then each block's attention output projection and MLP output layer divided by
    sqrt(2 * (block index + 1)). BatchNorm layers (the projection head's) keep PyTorch's init. Returns ``module``.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            _trunc_normal_(m.weight, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        for pname in ("q_bias", "v_bias", "relative_position_bias_table"):
            p = getattr(m, pname, None)
            if isinstance(p, nn.Parameter):
                nn.init.zeros_(p)
        init_values = getattr(m, "init_values", None)
        for pname in ("gamma_1", "gamma_2"):
            p = getattr(m, pname, None)
            if isinstance(p, nn.Parameter) and init_values:
                nn.init.constant_(p, init_values)
        for pname in ("cls_token", "mask_token", "pos_embed"):
            p = getattr(m, pname, None)
            if isinstance(p, nn.Parameter):
                _trunc_normal_(p, std)
    backbone = module.backbone if isinstance(module, ConMIMEncoder) else module
    for i, block in enumerate(getattr(backbone, "blocks", ())):
        block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
        block.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))
    return module


class ProjectionHead(nn.Module):
    """Linear(D, H, no bias) - BN - ReLU - Linear(H, H, no bias) - BN - ReLU - Linear(H, out, no bias) - BN(no affine)."""

    def __init__(self, dim: int, hidden: int = 4096, out: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out, affine=False),
        )  # fmt: skip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, D] -> [B, T, out], BN statistics over all B * T tokens."""
        B, T, D = tokens.shape
        return self.net(tokens.reshape(B * T, D)).reshape(B, T, -1)


# ------------------------------------------------------------------------- per-family forward after patch_embed
# Each takes the (masked) patch embeddings [B, N, D] (or [B, H, W, D] for a dynamic-size ViT) and returns the
# tokens [B, prefix + N, D] after the last block, before the final norm.
def _vit_blocks(bb: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = bb._pos_embed(x)
    x = bb.patch_drop(x)
    x = bb.norm_pre(x)
    return bb.blocks(x)


def _beit_blocks(bb: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = torch.cat((bb.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
    if bb.pos_embed is not None:
        x = x + bb.pos_embed
    x = bb.pos_drop(x)
    # computed once per forward and handed to every block: the official model's shared table
    shared = bb.rel_pos_bias() if bb.rel_pos_bias is not None else None
    for block in bb.blocks:
        x = block(x, shared_rel_pos_bias=shared)
    return x


_BLOCKS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "vit": _vit_blocks,
    "beit": _beit_blocks,
}


class ConMIMEncoder(nn.Module):
    """The masked student for a timm ViT or Beit: backbone + learned mask token + projection head.

    ``forward(images [B, 3, S, S], mask bool [B, N] or None) -> patch features [B, N, out]`` (CLS and other prefix
    tokens dropped): where ``mask`` is True the patch embedding is replaced by the mask token before any position
    handling (absolute embedding, or relative bias inside attention). Without a mask it gives the teacher's
    targets, so ``MomentumTeacher(encoder)(images)`` is the teacher's [B, N, out] through the same head.

    Args:
        backbone: a timm VisionTransformer or Beit, e.g. ``timm.create_model("vit_small_patch16_224")`` or
            ``create_backbone("beit_base_conmim")``. Its classifier is removed (``reset_classifier(0)``):
            pretraining never uses it, and an unused head would make DDP fail and be exported.
        hidden, out: widths of the projection head (ConMIM: 4096 and 256).
    """

    def __init__(self, backbone: nn.Module, hidden: int = 4096, out: int = 256):
        super().__init__()
        self.family = check_vit_backbone(backbone)
        if getattr(backbone, "num_classes", 0) and hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)
        self.backbone = backbone
        dim = backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = ProjectionHead(dim, hidden, out)
        self.num_prefix_tokens = getattr(backbone, "num_prefix_tokens", 1)
        self.register_load_state_dict_post_hook(_materialize_meta_buffers)

    @property
    def num_patches(self) -> int:
        return self.backbone.patch_embed.num_patches

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns): masks for this encoder are ``block_masks(B, grid=encoder.grid)``."""
        return tuple(self.backbone.patch_embed.grid_size)

    def features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone tokens [B, prefix + N, D] after the final norm; masked patches replaced by the mask token."""
        bb = self.backbone
        x = bb.patch_embed(images)  # [B, N, D], or [B, H, W, D] for a ViT built with dynamic_img_size=True
        if mask is not None:
            grid = x.shape[1:-1]
            check_patch_mask(mask, images, x.shape[0], math.prod(grid))
            w = mask.view(x.shape[0], *grid, 1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        return bb.norm(_BLOCKS[self.family](bb, x))

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.features(images, mask)
        return self.head(tokens)[:, self.num_prefix_tokens :]


def _materialize_meta_buffers(module: nn.Module, incompatible) -> None:
    """After ``load_state_dict(..., assign=True)`` into an encoder built on the meta device, compute the
    non-persistent buffers (Beit's relative position index, its zero k bias) that no state dict carries, on the
    loaded parameters' device; without this, moving the encoder off the meta device fails."""
    device = next((p.device for p in module.parameters() if not p.is_meta), None)
    if device is None:
        return
    for m in module.modules():
        metas = [n for n, b in m.named_buffers(recurse=False) if b is not None and b.is_meta]
        if metas and hasattr(m, "init_non_persistent_buffers"):
            for n in metas:
                setattr(m, n, torch.empty_like(getattr(m, n), device=device))
            m.init_non_persistent_buffers()


def build_encoder(
    name: str, head_hidden: int = 4096, head_out: int = 256, **backbone_overrides
) -> ConMIMEncoder:
    encoder = ConMIMEncoder(create_backbone(name, **backbone_overrides), head_hidden, head_out)
    if name in OFFICIAL_INIT:  # the mask token and the projector too, as the official model does
        official_init_(encoder.head)
        with torch.no_grad():
            _trunc_normal_(encoder.mask_token, 0.02)
    return encoder


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """ConMIM's rule: no weight decay on 1-D parameters, biases, the cls/mask tokens and position embeddings."""
    return (
        param.ndim <= 1
        or name.endswith(".bias")
        or any(k in name for k in ("cls_token", "mask_token", "pos_embed"))
    )


# ------------------------------------------------------------------------------------ starting from weights
@dataclasses.dataclass
class InitReport:
    """What :func:`init_from` did. Keys are the backbone's (timm's) parameter names."""

    source: str
    loaded: list[str]
    missing: list[str]  # the backbone's keys the source lacks: left at their fresh initialisation
    unexpected: list[str]  # the source's keys the backbone has no place for (or not that shape): ignored
    resampled: list[str]  # loaded after resampling to this backbone's grid (position tables, patch embedding)
    fresh: list[str]  # parts of the source deliberately not used (its mask token and projection head)

    def lines(self) -> list[str]:
        """The report, one line per list: what was loaded, then missing, unexpected, resampled keys."""
        out = [
            f"init_from {self.source}: {len(self.loaded)} backbone tensors loaded; mask token and head fresh"
        ]
        for label, keys in (
            ("missing (kept fresh)", self.missing),
            ("unexpected (ignored)", self.unexpected),
            ("resampled to this image size", self.resampled),
        ):
            out.append(f"init_from {label}: " + (", ".join(keys) if keys else "none"))
        return out


_WRAPPERS = ("model", "module", "state_dict", "model_ema")
_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(key: str) -> str:
    """A state-dict key without DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def read_weights(path) -> dict:
    """A weights file as a dict: safetensors, or a torch pickle read with ``weights_only=True`` (tensors,
    containers and, for the official ConMIM checkpoints, ``argparse.Namespace``; nothing else is unpickled)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import argparse
    import pickle

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{str(path)!r} holds objects other than tensors, containers and argparse.Namespace, which are not "
            f"unpickled ({first})"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


def _timm_weights(name: str, file) -> dict:
    """The state dict of timm model ``name`` from local weights only: ``file`` (timm's
    ``pretrained_cfg_overlay=dict(file=...)``, converted by the model's own checkpoint filter) or the Hub cache."""
    import timm
    from timm.models import get_pretrained_cfg

    if file is None:
        from huggingface_hub import try_to_load_from_cache

        cfg = get_pretrained_cfg(name)
        repo = cfg.hf_hub_id if cfg is not None else None
        if repo is None:
            raise FileNotFoundError(
                f"init_from: timm model {name!r} names no Hub weights; pass its weights file (file=...)"
            )
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        found = [try_to_load_from_cache(repo, n) for n in names]
        file = next((f for f in found if isinstance(f, str)), None)
        if file is None:
            raise FileNotFoundError(
                f"init_from: the weights of timm model {name!r} ({repo}) are not in the local Hub cache; "
                f"download them first or pass a weights file"
            )
    if not Path(file).is_file():
        raise FileNotFoundError(f"init_from: weights file {str(file)!r} does not exist")
    model = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), num_classes=0
    )
    return model.state_dict()


def _source_state(source, file, which: str, log) -> tuple[dict, str]:
    """(a state dict, as found, and a description) from any supported source."""
    from collections.abc import Mapping

    if isinstance(source, Mapping):
        state, what = dict(source), "a state dict"
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_dir():
            from conmim.checkpoint import read_latest

            state = read_latest(path, log)
            if state is None:
                raise FileNotFoundError(
                    f"init_from: run folder {str(path)!r} holds no checkpoint that verifies"
                )
            what = f"run {str(path)!r}"
        elif path.is_file():
            state, what = read_weights(path), repr(str(path))
        elif isinstance(source, str) and _is_timm_name(source):
            return _timm_weights(source, file), f"timm {source!r}"
        else:
            raise FileNotFoundError(
                f"init_from must be a weights file (.safetensors, .pth), a conmim run folder or a timm model "
                f"name, got {str(source)!r} (no such file, folder or timm model)"
            )
    else:
        raise TypeError(
            f"init_from source must be a path, a timm model name or a state dict, got {type(source).__name__}"
        )
    if "student" in state and "teacher" in state:  # a conmim run's checkpoint: one of its two networks
        state, what = state[which], f"{what} ({which})"
    for key in _WRAPPERS:
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    return {strip_wrapper_prefixes(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}, what


def _has_owner(module: nn.Module, key: str) -> bool:
    owner, _, leaf = key.rpartition(".")
    try:
        return getattr(module.get_submodule(owner), leaf, None) is not None
    except AttributeError:
        return False


def _is_timm_name(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _adapt_rel_pos_layout(state: dict, backbone: nn.Module) -> dict:
    """A shared relative position table (the pretraining layout) copied into each block where the backbone has
    per-block tables (the fine-tuning layout), as the official fine-tuning does; per-block tables that are all
    equal become the shared table of a shared-layout backbone."""
    shared = "rel_pos_bias.relative_position_bias_table"
    per_block = [
        f"blocks.{i}.attn.relative_position_bias_table"
        for i, b in enumerate(getattr(backbone, "blocks", ()))
        if getattr(getattr(b, "attn", None), "relative_position_bias_table", None) is not None
    ]
    if shared in state and per_block and getattr(backbone, "rel_pos_bias", None) is None:
        table = state.pop(shared)
        for key in per_block:
            state.setdefault(key, table.clone())
    # the reverse (a conmim-import timm file into the shared layout) only where every block holds the same table
    theirs = [k for k in state if re.fullmatch(r"blocks\.\d+\.attn\.relative_position_bias_table", k)]
    has_shared = getattr(backbone, "rel_pos_bias", None) is not None
    same = bool(theirs) and all(torch.equal(state[k], state[theirs[0]]) for k in theirs)
    if same and has_shared and not per_block and shared not in state:
        state[shared] = state[theirs[0]]
        for k in theirs:
            del state[k]
    return state


_FILTERS = {"vit": "timm.models.vision_transformer", "beit": "timm.models.beit"}


def init_from(encoder: ConMIMEncoder, source, *, file=None, which: str = "teacher", log=None) -> InitReport:
    """Load existing weights into ``encoder``'s backbone (in place); the mask token and projection head keep
    their fresh initialisation. Call it on the student before the teacher is made from it.

    Args:
        encoder: a :class:`ConMIMEncoder` (ViT or Beit).
        source: one of
            - a ``.safetensors`` file (a timm state dict, a ``conmim-export`` or ``conmim-import`` output, or a
              ConMIMEncoder state dict, whose ``backbone.*`` entries are used);
            - a ``.pth`` / ``.pt`` / ``.bin`` file, read with ``weights_only=True`` (``{'model': ...}``,
              ``{'module': ...}`` and ``{'state_dict': ...}`` wrappers are unwrapped);
            - a conmim-train run folder: its newest verified checkpoint's ``which`` network;
            - a timm model name (``"vit_base_patch16_224.mae"``) whose weights are in the local Hub cache, or in
              ``file`` (given to timm as ``pretrained_cfg_overlay=dict(file=file)``); nothing is downloaded;
            - a state dict (a mapping of tensors, or a run checkpoint's ``{"student": ..., "teacher": ...}``).
        file: the weights file of a timm model name ``source``.
        which: "teacher" (default, the network ConMIM fine-tunes) or "student", for run folders and checkpoints.
        log: called with each line of the report (default: nothing).

    Position embeddings, relative position tables and patch embeddings are resampled to the encoder's grid when
    the image or patch size differs (timm's checkpoint filter of the backbone's family: ``resample_abs_pos_embed``,
    ``resize_rel_pos_bias_table``, ``resample_patch_embed``); a shared relative position table fills per-block
    tables. Keys the backbone lacks and keys the source lacks are reported, never an error; a source with no
    usable key at all is a ValueError.
    """
    import importlib

    if not isinstance(encoder, ConMIMEncoder):
        raise TypeError(f"encoder must be a ConMIMEncoder, got {type(encoder).__name__}")
    if which not in ("student", "teacher"):
        raise ValueError(f"which must be 'student' or 'teacher', got {which!r}")
    log = log or (lambda line: None)
    state, what = _source_state(source, file, which, log)
    fresh = []
    if any(k.startswith("backbone.") for k in state):
        fresh = sorted(k for k in state if not k.startswith("backbone."))
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    backbone = encoder.backbone
    state = _adapt_rel_pos_layout(state, backbone)
    # keys whose owner this backbone lacks (an absolute position embedding, per-block tables) go straight to the
    # report: timm's filters look their owners up to resample them
    homeless = {k: v for k, v in state.items() if not _has_owner(backbone, k)}
    state = {k: v for k, v in state.items() if k not in homeless}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    filt = importlib.import_module(_FILTERS[encoder.family]).checkpoint_filter_fn
    state = {**filt(state, backbone), **homeless}
    target = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    if not usable:
        raise ValueError(
            f"init_from: {what} holds no tensor this {type(backbone).__name__} can use "
            f"(e.g. {', '.join(sorted(state)[:3]) or 'nothing'}); is it a {encoder.family} state dict?"
        )
    unexpected = sorted(
        k if k not in target else f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in state.items()
        if k not in usable
    )
    missing = sorted(k for k in target if k not in usable)
    resampled = sorted(k for k in usable if k in shapes and shapes[k] != tuple(usable[k].shape))
    with torch.no_grad():
        backbone.load_state_dict(usable, strict=False)
    report = InitReport(what, sorted(usable), missing, unexpected, resampled, fresh)
    for line in report.lines():
        log(line)
    return report
