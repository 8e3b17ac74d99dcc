"""The GPU loss kernels' work order: which rows of each image a program owns, computed on the mask's device."""

from __future__ import annotations

import torch


def work_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPU loss kernels' work list, computed on the mask's device without a host sync.

    mask: bool [B, N]. Returns (order int64 [B, N]: each image's masked patches first, in index order, then the
    rest; counts int32 [B]: masked patches per image). Shared by the Triton and CUDA launchers (torch only, so
    the CUDA backend runs where Triton is not installed).
    """
    counts = mask.sum(dim=1, dtype=torch.int32)
    order = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices
    return order.contiguous(), counts


__all__ = ["work_order"]
