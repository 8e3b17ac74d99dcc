"""User API of the patch-contrast loss: ``patch_contrast_loss`` and ``FusedPatchContrastLoss``."""

from __future__ import annotations

import torch
from torch import nn

from conmim import backends
from conmim._validate import (
    check_normalize,
    check_patch_contrast_args,
    check_positive_index_range,
    check_reduction,
    check_temperature,
)
from conmim.ops import GPU_BACKENDS, patch_contrast_backend, patch_contrast_op
from conmim.order import work_order
from conmim.reference import patch_contrast_loss_reference


def _host_checks_allowed(t: torch.Tensor) -> bool:
    """Host-side value checks (they read device memory) are skipped while compiling or capturing a CUDA graph,
    and for meta tensors (no values)."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def patch_contrast_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 0.1,
    reduction: str = "mean",
    normalize: bool = True,
    positive_index: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """ConMIM masked patch-to-patch contrastive loss (InfoNCE over the patches of the same image).

    For every masked patch i of image b: ``logsumexp_j(<q_i, k_j> / tau) - <q_i, k_pos(i)> / tau`` with
    q = normalised student features, k = normalised teacher features of the same image, j over all N patches.
    Never materialises the [B, N, N] logits on the fused backends.

    Args:
        student: [B, N, d] float32 / bfloat16 / float16 (float64: cpu and reference backends); any strides.
        teacher: [B, N, d] on the same device; float32 / bfloat16 / float16 whatever the student's (e.g. a bf16
            student from autocast with an fp32 teacher), float64 with float64. Each is read in its own dtype.
            Gets a gradient (in its own dtype) only if it requires grad.
        mask: bool [B, N]; any number of masked patches per image, including none and all.
        temperature: tau > 0 (ConMIM: 0.1).
        reduction: "mean" over all masked patches of the batch (0 if there are none), "sum", or "none"
            (one loss per masked patch in ``mask.nonzero()`` order; this one reads the count on the host).
        normalize: L2-normalise both inputs (False for features that are already normalised); a bool.
        positive_index: optional int64 [B, N]; key index of each query's positive (default: same index).
            Values outside [0, N) on masked rows raise a ValueError; where the host cannot read them
            (torch.compile, CUDA-graph capture) every backend bounds them itself and gives that row a NaN
            loss and NaN gradients for its image (a non-finite loss, never a read of another row's memory).
        backend: "auto", "triton", "cuda", "cpu" or "reference" (env CONMIM_BACKEND overrides "auto").

    Returns:
        float32 loss (float64 for float64 inputs); gradients flow back in each input's dtype. Double backward
        (a gradient of the gradient) is not supported.
    """
    _, N, _ = check_patch_contrast_args(
        student, teacher, mask, positive_index, temperature, reduction, normalize
    )
    if positive_index is not None and _host_checks_allowed(positive_index):
        check_positive_index_range(positive_index, mask, N)
    name = patch_contrast_backend(student, teacher, backends.requested_backend(backend))
    if torch._C._are_functorch_transforms_active():
        # torch.func (grad, vjp, jacrev, ...) cannot see through a custom op's autograd; the reference's plain
        # torch ops can (higher orders included), the fused kernels have no such form
        if name != "reference":
            raise RuntimeError(
                f"patch_contrast_loss: torch.func transforms run on backend='reference' only (this call chose "
                f"{name!r}); pass backend='reference' or use conmim.patch_contrast_loss_reference"
            )
        return patch_contrast_loss_reference(
            student, teacher, mask, temperature, reduction, normalize, positive_index
        )
    order, counts = work_order(mask) if name in GPU_BACKENDS else (None, None)  # once: forward and backward
    row_loss, _ = patch_contrast_op(
        student, teacher, mask, positive_index, float(temperature), normalize, name, order, counts
    )
    if reduction == "none":
        return row_loss[mask]
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / mask.sum().clamp_min(1).to(total.dtype)


class FusedPatchContrastLoss(nn.Module):
    """Drop-in module form of :func:`patch_contrast_loss`.

    Example::

        loss_fn = conmim.FusedPatchContrastLoss(temperature=0.1)
        loss = loss_fn(student_feats, teacher_feats.detach(), mask)   # [B, N, d], [B, N, d], bool [B, N]
    """

    def __init__(
        self, temperature: float = 0.1, reduction: str = "mean", normalize: bool = True, backend: str = "auto"
    ):
        super().__init__()
        check_temperature(temperature)
        check_reduction(reduction)
        check_normalize(normalize)
        if backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {backends.BACKENDS}, got {backend!r}")
        self.temperature = float(temperature)
        self.reduction = reduction
        self.normalize = normalize
        self.backend = backend

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        mask: torch.Tensor,
        positive_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return patch_contrast_loss(
            student,
            teacher,
            mask,
            self.temperature,
            self.reduction,
            self.normalize,
            positive_index,
            self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, reduction={self.reduction!r}, normalize={self.normalize}, "
            f"backend={self.backend!r}"
        )
