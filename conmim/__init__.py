"""conmim: fused kernels for ConMIM pretraining (masked patch contrast loss, momentum-teacher EMA).

The drop-in pieces for a training loop of your own: ``ConMIMEncoder`` (the masked student around any timm ViT),
``MomentumTeacher`` (its EMA copy; ``teacher(images)`` gives the targets), ``FusedPatchContrastLoss`` and
``block_masks`` / ``cell_masks``. README.md, section "Use", shows the whole loop.
"""

from conmim.loss import FusedPatchContrastLoss, patch_contrast_loss
from conmim.masking import block_masks, cell_masks
from conmim.models import ConMIMEncoder, build_encoder
from conmim.reference import (
    ema_update_reference_,
    momentum_schedule,
    patch_contrast_loss_official,
    patch_contrast_loss_reference,
)
from conmim.teacher import MomentumTeacher, ema_update_

__version__ = "0.2.0"

__all__ = [
    "ConMIMEncoder",
    "FusedPatchContrastLoss",
    "MomentumTeacher",
    "block_masks",
    "build_encoder",
    "cell_masks",
    "ema_update_",
    "ema_update_reference_",
    "momentum_schedule",
    "patch_contrast_loss",
    "patch_contrast_loss_official",
    "patch_contrast_loss_reference",
]
