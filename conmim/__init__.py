"""conmim: fused kernels for ConMIM pretraining (masked patch contrast loss, momentum-teacher EMA)."""

from conmim.loss import FusedPatchContrastLoss, patch_contrast_loss
from conmim.masking import block_masks, cell_masks
from conmim.reference import (
    ema_update_reference_,
    momentum_schedule,
    patch_contrast_loss_official,
    patch_contrast_loss_reference,
)
from conmim.teacher import MomentumTeacher, ema_update_

__version__ = "0.1.0"

__all__ = [
    "FusedPatchContrastLoss",
    "MomentumTeacher",
    "block_masks",
    "cell_masks",
    "ema_update_",
    "ema_update_reference_",
    "momentum_schedule",
    "patch_contrast_loss",
    "patch_contrast_loss_official",
    "patch_contrast_loss_reference",
]
