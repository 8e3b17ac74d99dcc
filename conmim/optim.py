"""Pretraining's optimizer: AdamW over ConMIM's weight-decay groups, and its learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from conmim.models import no_weight_decay


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then a cosine from ``lr`` to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * step / max(1, warmup)
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float, fused: bool):
    """AdamW over :func:`param_groups`; ``fused`` lets the step be skipped on the device (``found_inf``)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)
