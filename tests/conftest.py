"""Shared test setup.

Without a GPU, Triton kernels run on the CPU through its interpreter: TRITON_INTERPRET must be set before Triton is
first imported, hence here, before anything imports conmim.kernels.
"""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tolerances keyed by input dtype: (loss atol/rtol, gradient atol/rtol), against the fp32/fp64 reference
# computed from the same (rounded) inputs. Low-precision gradients are compared after their final rounding.
TOL = {
    torch.float64: dict(loss=(1e-10, 1e-10), grad=(1e-10, 1e-9)),
    torch.float32: dict(loss=(2e-5, 2e-5), grad=(2e-6, 2e-4)),
    torch.bfloat16: dict(loss=(2e-4, 2e-4), grad=(2e-4, 1.6e-2)),
    torch.float16: dict(loss=(2e-4, 2e-4), grad=(2e-5, 2e-3)),
}

requires_gpu = pytest.mark.skipif(
    not HAS_GPU, reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)"
)


def triton_runs_here() -> bool:
    """Triton kernels can run: on a GPU, or on the CPU under TRITON_INTERPRET=1."""
    from conmim.kernels import interpreting, triton_status

    return triton_status() is None and (HAS_GPU or interpreting())
