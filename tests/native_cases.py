"""Shared by the tests of the compiled launchers (conmim.native): inputs in any (student, teacher) dtype pair, the
float64 reference of the dense [B, N] loss and its gradients, and the comparison with the rule of tests/conftest.TOL.
"""

import torch

from conmim.reference import patch_contrast_loss_reference
from tests.conftest import TOL

LOW = [torch.float32, torch.bfloat16, torch.float16]
PAIRS = [(s, t) for s in LOW for t in LOW] + [(torch.float64, torch.float64)]


def pair_id(pair):
    return "-".join(str(d).removeprefix("torch.") for d in pair)


def inputs(B, N, D, pair, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, D, generator=g).to(pair[0])
    t = torch.randn(B, N, D, generator=g).to(pair[1])
    grad = torch.randn(B, N, generator=g)
    pos = torch.randint(0, N, (B, N), generator=g) if positive else None
    return s, t, grad, pos


def reference(s, t, mask, pos, temperature, normalize, grad):
    """(loss [B, N], d_student, d_teacher) in float64 from the (rounded) inputs; loss 0 on unmasked rows."""
    s64 = s.double().requires_grad_(True)
    t64 = t.double().requires_grad_(True)
    rows = patch_contrast_loss_reference(s64, t64, mask, temperature, "none", normalize, pos)
    dense = torch.zeros(mask.shape, dtype=torch.float64).index_put(mask.nonzero(as_tuple=True), rows)
    ds, dt = torch.autograd.grad((dense * grad.double()).sum(), [s64, t64], allow_unused=True)
    zero = torch.zeros_like(s64)
    return dense.detach(), zero if ds is None else ds, zero if dt is None else dt


def assert_close_to(got, want, dtype, kind, what):
    """got vs the float64 `want` with TOL[dtype][kind] (atol + rtol * max |want|)."""
    atol, rtol = TOL[dtype][kind]
    assert not torch.isnan(got).any(), f"{what}: NaN (an element left unwritten?)"
    err = (got.double() - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= atol + rtol * scale, f"{what}: error {err:.3g} at scale {scale:.3g}"


def loss_tol_dtype(pair):
    """The pair's least precise dtype: its rounding bounds the loss error."""
    order = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    return max(pair, key=order.index)
