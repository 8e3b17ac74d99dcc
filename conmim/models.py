"""ConMIM networks: a timm ViT wrapped (not forked) with a learned mask token, plus the projection head.

``build_encoder(name)`` returns a :class:`ConMIMEncoder`: masked patch embeddings are replaced by the mask token
before the position embedding, the sequence keeps its length, and the projection head (Linear-BN-ReLU x 2,
Linear, BN without affine) maps all N + 1 tokens (BN statistics over the batch's tokens) before CLS is dropped.
The backbone's parameters keep timm's names, so ``export`` can hand them to ``timm.create_model``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from conmim._validate import check_patch_mask, check_vit_backbone

# name -> (timm model name, timm kwargs). "vit_tiny_demo" is small enough to pretrain on a CPU in minutes.
MODELS = {
    "vit_tiny_demo": (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4),
    ),
    "vit_small_patch16_224": ("vit_small_patch16_224", dict(init_values=0.1)),
    "vit_base_patch16_224": ("vit_base_patch16_224", dict(init_values=0.1)),
    "vit_large_patch16_224": ("vit_large_patch16_224", dict(init_values=1e-5)),
}


def model_spec(name: str) -> tuple[str, dict]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    timm_name, kwargs = MODELS[name]
    return timm_name, dict(kwargs)


def create_backbone(name: str, **overrides) -> nn.Module:
    """The timm ViT for ``name`` with no classifier head (num_classes=0), randomly initialised."""
    import timm

    timm_name, kwargs = model_spec(name)
    kwargs.update(overrides)
    return timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)


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


class ConMIMEncoder(nn.Module):
    """The masked student for any timm ViT: backbone + learned mask token + projection head.

    ``forward(images [B, 3, S, S], mask bool [B, N] or None) -> patch features [B, N, out]`` (CLS and other prefix
    tokens dropped): where ``mask`` is True the patch embedding is replaced by the mask token before the position
    embedding. Without a mask it gives the teacher's targets, so ``MomentumTeacher(encoder)(images)`` is the
    teacher's [B, N, out] through the same head.

    Args:
        backbone: a timm VisionTransformer, e.g. ``timm.create_model("vit_small_patch16_224")``. Its classifier
            is removed (``reset_classifier(0)``): pretraining never uses it, and an unused head would make DDP
            fail and be exported.
        hidden, out: widths of the projection head (ConMIM: 4096 and 256).
    """

    def __init__(self, backbone: nn.Module, hidden: int = 4096, out: int = 256):
        super().__init__()
        check_vit_backbone(backbone)
        if getattr(backbone, "num_classes", 0) and hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)
        self.backbone = backbone
        dim = backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = ProjectionHead(dim, hidden, out)
        self.num_prefix_tokens = getattr(backbone, "num_prefix_tokens", 1)

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
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        x = bb.norm_pre(x)
        x = bb.blocks(x)
        return bb.norm(x)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.features(images, mask)
        return self.head(tokens)[:, self.num_prefix_tokens :]


def build_encoder(
    name: str, head_hidden: int = 4096, head_out: int = 256, **backbone_overrides
) -> ConMIMEncoder:
    return ConMIMEncoder(create_backbone(name, **backbone_overrides), head_hidden, head_out)


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """ConMIM's rule: no weight decay on 1-D parameters, biases, the cls/mask tokens and position embeddings."""
    return (
        param.ndim <= 1
        or name.endswith(".bias")
        or any(k in name for k in ("cls_token", "mask_token", "pos_embed"))
    )
