"""Pure-PyTorch reference ops: the oracle for tests, the baseline for benchmarks, the last-resort backend.

They follow the method exactly (see README, "The method"):

    q_i = s_b[i] / ||s_b[i]||,  k_j = t_b[j] / ||t_b[j]||
    logit_ij = <q_i, k_j> / tau                  for masked i of image b, every j of the same image
    loss_i = logsumexp_j(logit_ij) - logit_i,pos(i)      pos(i) = i unless positive_index says otherwise

Arithmetic is float32 (float64 for float64 inputs) whatever the input dtype, so the reference is the exact
value that low-precision kernels are compared against. These functions may synchronise with the device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from conmim._validate import (
    check_momentum,
    check_patch_contrast_args,
    check_positive_index_range,
    check_tensor_lists,
    is_int,
)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for an input dtype: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / max(per_row.shape[0], 1)


def patch_contrast_loss_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 0.1,
    reduction: str = "mean",
    normalize: bool = True,
    positive_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """ConMIM patch-contrast loss computing the masked rows only (padded batched matmul).

    Args:
        student: [B, N, d] float tensor (fp32/bf16/fp16/fp64); student features of every patch.
        teacher: [B, N, d] on the same device, fp32/bf16/fp16 (fp64 with fp64); teacher features (the keys).
        mask: bool [B, N]; True where the patch was masked for the student. Any count per image, 0..N.
        temperature: tau > 0.
        reduction: "mean" over all masked patches of the batch (0 when there are none), "sum", or "none"
            (one loss per masked patch, in ``mask.nonzero()`` order).
        normalize: L2-normalise both features first (False for features already normalised).
        positive_index: optional int64 [B, N]; key index of each query's positive (default: same index).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [M] for reduction="none".
    """
    _, N, _ = check_patch_contrast_args(
        student, teacher, mask, positive_index, temperature, reduction, normalize
    )
    if student.device.type == "meta":
        raise ValueError("the reference loss reads the mask's values, which meta tensors do not have")
    if positive_index is not None:
        check_positive_index_range(positive_index, mask, N)
    return _reduce(
        masked_rows_loss(student, teacher, mask, temperature, normalize, positive_index), reduction
    )


def masked_rows_loss(student, teacher, mask, temperature, normalize, positive_index) -> torch.Tensor:
    """[M] loss of each masked patch in ``mask.nonzero()`` order, inputs already validated. A positive index
    outside [0, N) (which the caller could not check: torch.compile, graph capture) gives that row NaN, as the
    fused kernels do, never another row's logit."""
    B, N, d = student.shape
    acc = acc_dtype(student.dtype)
    q, k = student.to(acc), teacher.to(acc)
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    b_idx, i_idx = mask.nonzero(as_tuple=True)
    rank = (torch.cumsum(mask, dim=1) - 1)[b_idx, i_idx]
    m_max = int(mask.sum(dim=1).max()) if B > 0 else 0
    q_pad = q.new_zeros(B, m_max, d)
    q_pad = q_pad.index_put((b_idx, rank), q[b_idx, i_idx])
    logits = torch.bmm(q_pad, k.transpose(1, 2)) / temperature  # [B, m_max, N]
    rows = logits[b_idx, rank]  # [M, N]
    if positive_index is None:
        return torch.logsumexp(rows, dim=-1) - rows.gather(1, i_idx[:, None]).squeeze(1)
    pos = positive_index[b_idx, i_idx]
    bad = (pos < 0) | (pos >= N)
    per_row = torch.logsumexp(rows, dim=-1) - rows.gather(1, pos.clamp(0, N - 1)[:, None]).squeeze(1)
    return per_row.masked_fill(bad, float("nan"))


def patch_contrast_loss_official(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """The loss written the way the official ConMIM code writes it: full [B, N, N] logits, then boolean
    indexing of the masked rows and a cross-entropy against the same-position label.

    Kept as the benchmark baseline (its memory is O(B N^2)) and cross-checked against
    :func:`patch_contrast_loss_reference`. Shapes and dtypes as there; with an all-empty mask the "mean" of this
    formulation is NaN (an empty cross-entropy), as in the official code.
    """
    B, N, _ = check_patch_contrast_args(student, teacher, mask, None, temperature, reduction)
    acc = acc_dtype(student.dtype)
    q = F.normalize(student.to(acc), dim=-1)
    k = F.normalize(teacher.to(acc), dim=-1)
    logits = torch.bmm(q, k.transpose(1, 2)) / temperature  # [B, N, N]
    labels = torch.arange(N, device=student.device).expand(B, N)
    return F.cross_entropy(logits[mask], labels[mask], reduction=reduction)


def momentum_schedule(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine momentum of the teacher: ``final - (final - base) * (1 + cos(pi * step / total_steps)) / 2``.

    ``base`` at step 0, ``final`` at ``total_steps``; steps outside [0, total_steps] are clamped.
    """
    if not is_int(total_steps) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not is_int(step):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    step, total_steps = int(step), int(total_steps)
    for name, v in (("base", base), ("final", final)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} momentum must lie in [0, 1], got {v}")
    k = min(max(step, 0), total_steps)
    return final - (final - base) * (1.0 + math.cos(math.pi * k / total_steps)) / 2.0


# Pairs that torch._foreach_lerp_ updates exactly as the fp32/fp64 formula does.
_EXACT = (torch.float32, torch.float64)


@torch.no_grad()
def ema_update_reference_(teacher, student, momentum) -> None:
    """``teacher <- teacher + (1 - m) * (student - teacher)`` for each pair, with ``torch._foreach_lerp_``
    semantics, computed in float32 (float64 for float64 teachers) and stored in each teacher's dtype.

    Args:
        teacher: sequence of floating tensors, updated in place.
        student: sequence of tensors of the same shapes (any float dtype, any strides).
        momentum: float in [0, 1] or a 0-d floating tensor.
    """
    check_tensor_lists(teacher, student)
    check_momentum(momentum)
    m = float(momentum) if isinstance(momentum, torch.Tensor) else momentum
    weight = 1.0 - m
    same = [i for i, (t, s) in enumerate(zip(teacher, student)) if t.dtype == s.dtype and t.dtype in _EXACT]
    if same:
        torch._foreach_lerp_([teacher[i] for i in same], [student[i] for i in same], weight)
    done = set(same)
    for i, (t, s) in enumerate(zip(teacher, student)):
        if i in done:
            continue
        acc = acc_dtype(t.dtype)
        t.copy_(torch.lerp(t.to(acc), s.to(acc), weight))


@torch.no_grad()
def ema_update_loop_(teacher, student, momentum: float) -> None:
    """The per-parameter loop of the official code (``t.mul_(m).add_((1 - m) * s)``): the benchmark baseline."""
    for t, s in zip(teacher, student):
        t.mul_(momentum).add_(s.detach().to(t.dtype), alpha=1.0 - momentum)


__all__ = [
    "acc_dtype",
    "ema_update_loop_",
    "ema_update_reference_",
    "momentum_schedule",
    "patch_contrast_loss_official",
    "patch_contrast_loss_reference",
]
