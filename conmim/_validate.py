"""Argument checks shared by the reference ops and the fused ops: one place, one wording.

Every check raises TypeError (wrong type or dtype) or ValueError (wrong shape, value or device) naming the
argument and what was expected. None of them synchronises with the device.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MIXABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # student and teacher may differ among these
REDUCTIONS = ("mean", "sum", "none")
# The smallest temperature: float32's smallest normal number, so that tau itself, 1 / tau and the loss of a row
# (at most 2 / tau for normalised features) are all finite normal float32 numbers.
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def is_real(x) -> bool:
    """A Python or NumPy real number (not a bool)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_int(x) -> bool:
    """A Python or NumPy integer (not a bool)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_patch_contrast_args(
    student, teacher, mask, positive_index=None, temperature=0.1, reduction="mean", normalize=True
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
    if teacher.dtype != student.dtype and not {student.dtype, teacher.dtype} <= set(MIXABLE_DTYPES):
        allowed = "float32, bfloat16 or float16" if student.dtype in MIXABLE_DTYPES else "float64"
        raise TypeError(f"teacher must be {allowed} with a {student.dtype} student, got {teacher.dtype}")
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
    check_normalize(normalize)
    if student.device.type == "meta" and reduction == "none":
        raise ValueError(
            "reduction='none' returns one loss per masked patch, a count that meta tensors do not have; "
            "use 'mean' or 'sum' on meta tensors"
        )
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
    if not is_real(temperature):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) tau is a symbolic float, which
    # comparisons guard on and math.isfinite cannot trace
    if not (0 < temperature < math.inf):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be at least float32's smallest normal number {MIN_TEMPERATURE:.4g} (tau, 1 / tau "
            f"and the loss, up to 2 / tau, must be finite in float32), got {temperature}"
        )


def check_normalize(normalize) -> None:
    if not isinstance(normalize, bool):
        raise TypeError(
            f"normalize must be a bool (True or False), got {type(normalize).__name__} {normalize!r}"
        )


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_momentum(momentum) -> None:
    """A float in [0, 1] or a 0-d floating tensor. A CPU tensor's value is checked too; a GPU tensor's is the
    caller's to keep in [0, 1] (reading it would synchronise with the device: the point of passing a tensor)."""
    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0 or not momentum.is_floating_point():
            raise TypeError(
                f"momentum must be a float or a 0-d floating tensor, got a {momentum.dtype} tensor of shape "
                f"{_shape(momentum)}"
            )
        if momentum.device.type == "meta":
            raise ValueError("momentum must be a tensor with a value (CPU or GPU), got a meta tensor")
        if momentum.device.type == "cpu":
            _check_momentum_range(float(momentum))
        return
    if not is_real(momentum):
        raise TypeError(f"momentum must be a float or a 0-d tensor, got {type(momentum).__name__}")
    _check_momentum_range(momentum)


def _check_momentum_range(momentum: float) -> None:
    if not (0.0 <= momentum <= 1.0):  # NaN fails too
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
        if t.device.type == "meta":
            raise ValueError(f"teacher[{i}] and student[{i}] are meta tensors: there are no values to update")
        if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
            raise ValueError(
                f"teacher[{i}] has stride 0 along a dimension of size > 1 (e.g. from expand), so several of its "
                f"elements share memory and cannot be updated in place; pass a tensor that owns its elements"
            )


# The parts each backbone family's forward uses (conmim.models runs them in order): a timm VisionTransformer
# (learned absolute position embedding via ``_pos_embed``) or a timm Beit (relative position bias, shared or per
# block, optional absolute position embedding), the layout the paper's official code trains.
BACKBONE_PARTS = {
    "vit": ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "embed_dim"),
    "beit": (
        "patch_embed",
        "cls_token",
        "pos_embed",
        "pos_drop",
        "rel_pos_bias",
        "blocks",
        "norm",
        "embed_dim",
    ),
}


def check_vit_backbone(backbone) -> str:
    """A timm VisionTransformer or Beit (or a model with its parts), whose patch embeddings can be masked.
    Returns the family, "vit" or "beit"."""
    if not isinstance(backbone, torch.nn.Module):
        raise TypeError(
            f"backbone must be a timm ViT or Beit (torch.nn.Module), got {type(backbone).__name__}"
        )
    missing = {}
    for family, parts in BACKBONE_PARTS.items():
        missing[family] = [a for a in parts if not hasattr(backbone, a)]
        if not missing[family]:
            return family
    raise TypeError(
        f"backbone must be a timm VisionTransformer or Beit (e.g. timm.create_model('vit_small_patch16_224') or "
        f"conmim.models.create_backbone('beit_base_conmim')); {type(backbone).__name__} has no "
        f"{', '.join(missing['vit'])} (VisionTransformer) and no {', '.join(missing['beit'])} (Beit)"
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
