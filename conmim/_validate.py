"""Argument checks shared by the reference ops and the fused ops: one place, one wording.

Every check raises TypeError (wrong type or dtype) or ValueError (wrong shape, value or device) naming the
argument and what was expected. None of them synchronises with the device.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_patch_contrast_args(
    student, teacher, mask, positive_index=None, temperature=0.1, reduction="mean"
) -> tuple[int, int, int]:
    """Validate the loss inputs; returns (B, N, d)."""
    for name, t in (("student", student), ("teacher", teacher), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if student.dim() != 3:
        raise ValueError(f"student must have shape [B, N, d], got {_shape(student)}")
    B, N, d = student.shape
    if teacher.shape != student.shape:
        raise ValueError(f"teacher must have the student's shape [{B}, {N}, {d}], got {_shape(teacher)}")
    if N == 0:
        raise ValueError("student must have at least one patch (N >= 1), got N = 0")
    if d == 0:
        raise ValueError("student must have a non-empty feature dimension (d >= 1), got d = 0")
    if student.dtype not in FLOAT_DTYPES:
        raise TypeError(f"student must be float32, bfloat16, float16 or float64, got {student.dtype}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"teacher must have the student's dtype {student.dtype}, got {teacher.dtype}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor of shape [{B}, {N}], got dtype {mask.dtype}")
    if mask.shape != (B, N):
        raise ValueError(f"mask must have shape [B, N] = [{B}, {N}], got {_shape(mask)}")
    if teacher.device != student.device:
        raise ValueError(f"teacher must be on the student's device {student.device}, got {teacher.device}")
    if mask.device != student.device:
        raise ValueError(f"mask must be on the student's device {student.device}, got {mask.device}")
    if positive_index is not None:
        if not isinstance(positive_index, torch.Tensor):
            raise TypeError(
                f"positive_index must be a torch.Tensor or None, got {type(positive_index).__name__}"
            )
        if positive_index.dtype != torch.int64:
            raise TypeError(f"positive_index must be an int64 (long) tensor, got {positive_index.dtype}")
        if positive_index.shape != (B, N):
            raise ValueError(
                f"positive_index must have shape [B, N] = [{B}, {N}], got {_shape(positive_index)}"
            )
        if positive_index.device != student.device:
            raise ValueError(
                f"positive_index must be on the student's device {student.device}, got {positive_index.device}"
            )
    check_temperature(temperature)
    check_reduction(reduction)
    return B, N, d


def check_positive_index_range(positive_index: torch.Tensor, mask: torch.Tensor, N: int) -> None:
    """Range check of the positives of masked rows. Reads the tensor on the host, so callers on a GPU skip it
    while capturing a CUDA graph or compiling."""
    if positive_index.numel() == 0:
        return
    sel = positive_index[mask]
    if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= N):
        raise ValueError(
            f"positive_index must lie in [0, N) = [0, {N}) for every masked patch, "
            f"got values in [{int(sel.min())}, {int(sel.max())}]"
        )


def check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_momentum(momentum) -> None:
    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0 or not momentum.is_floating_point():
            raise TypeError(
                f"momentum must be a float or a 0-d floating tensor, got a {momentum.dtype} tensor of shape "
                f"{_shape(momentum)}"
            )
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float or a 0-d tensor, got {type(momentum).__name__}")
    if not (0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")


def check_tensor_lists(teacher, student) -> None:
    """EMA inputs: two equally long sequences of same-shaped floating tensors on one device each pair."""
    for name, lst in (("teacher", teacher), ("student", student)):
        if isinstance(lst, torch.Tensor) or not hasattr(lst, "__len__"):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(lst).__name__}")
    if len(teacher) != len(student):
        raise ValueError(
            f"teacher and student must hold as many tensors, got {len(teacher)} and {len(student)}"
        )
    for i, (t, s) in enumerate(zip(teacher, student)):
        if not isinstance(t, torch.Tensor) or not isinstance(s, torch.Tensor):
            raise TypeError(f"teacher[{i}] and student[{i}] must be tensors")
        if t.shape != s.shape:
            raise ValueError(f"student[{i}] must have teacher[{i}]'s shape {_shape(t)}, got {_shape(s)}")
        if t.dtype not in FLOAT_DTYPES or s.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"teacher[{i}] and student[{i}] must be floating tensors, got {t.dtype} and {s.dtype}"
            )
        if t.device != s.device:
            raise ValueError(f"student[{i}] must be on teacher[{i}]'s device {t.device}, got {s.device}")


_VIT_PARTS = ("patch_embed", "_pos_embed", "blocks", "norm", "embed_dim")


def check_vit_backbone(backbone) -> None:
    """A timm VisionTransformer (or a model with its parts), whose patch embeddings can be masked."""
    if not isinstance(backbone, torch.nn.Module):
        raise TypeError(f"backbone must be a timm ViT (torch.nn.Module), got {type(backbone).__name__}")
    missing = [a for a in _VIT_PARTS if not hasattr(backbone, a)]
    if missing:
        raise TypeError(
            f"backbone must be a timm VisionTransformer (e.g. timm.create_model('vit_small_patch16_224')); "
            f"{type(backbone).__name__} has no {', '.join(missing)}"
        )


def check_patch_mask(mask, images: torch.Tensor, batch: int, patches: int) -> None:
    """The student's patch mask: bool [B, N] on the images' device (True = masked)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"mask must be a bool tensor of shape [{batch}, {patches}] or None, got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor of shape [{batch}, {patches}], got dtype {mask.dtype}")
    if mask.shape != (batch, patches):
        raise ValueError(f"mask must have shape [B, N] = [{batch}, {patches}], got {_shape(mask)}")
    if mask.device != images.device:
        raise ValueError(f"mask must be on the images' device {images.device}, got {mask.device}")
