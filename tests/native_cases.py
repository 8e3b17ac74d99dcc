"""Shared by the tests of the compiled launchers (conmim.native): inputs in any (student, teacher) dtype pair, the
float64 reference of the dense [B, N] loss and its gradients, and the comparison with the rule of tests/conftest.TOL.
"""

import torch

from conmim.reference import patch_contrast_loss_reference
from tests.conftest import TOL, assert_within_rule

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


def reference(s, t, mask, pos, temperature, normalize, grad, dtype=torch.float64):
    """(loss [B, N], d_student, d_teacher) from the (rounded) inputs, computed by plain torch in `dtype` (float64:
    the exact answer for the comparisons); loss 0 on unmasked rows."""
    s_ = s.to(dtype).requires_grad_(True)
    t_ = t.to(dtype).requires_grad_(True)
    rows = patch_contrast_loss_reference(s_, t_, mask, temperature, "none", normalize, pos)
    dense = torch.zeros(mask.shape, dtype=rows.dtype).index_put(mask.nonzero(as_tuple=True), rows)
    ds, dt = torch.autograd.grad((dense * grad.to(rows.dtype)).sum(), [s_, t_], allow_unused=True)
    zero = torch.zeros_like(s_)
    return dense.detach(), zero if ds is None else ds, zero if dt is None else dt


def rel_error(got, want64):
    """max |got - want| / max |want| (0 for an all-zero want)."""
    scale = want64.abs().max().item()
    return (got.double() - want64).abs().max().item() / scale if scale else 0.0


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


def saturation_case(kind, pair=(torch.float32, torch.float32)):
    """(student, teacher, temperature, normalize): [2, 40, 32] inputs in the pair's dtypes (float32 by default)
    whose logits are large (small tau, unnormalised features of norm ~30) or whose softmax saturates (a teacher
    correlated with the student)."""
    g = torch.Generator().manual_seed(11)
    s = torch.randn(2, 40, 32, generator=g)
    t = torch.randn(2, 40, 32, generator=g)
    tau, normalize = 0.05, True
    if kind.startswith("tau="):
        tau = float(kind[4:])
    elif kind == "unnormalized-norm-30":
        s, t = s * 30 / s.norm(dim=-1, keepdim=True), t * 30 / t.norm(dim=-1, keepdim=True)
        tau, normalize = 0.1, False
    else:
        t = s + 0.05 * t  # correlated teacher: p(positive) near 1
    return s.to(pair[0]), t.to(pair[1]), tau, normalize


SATURATION = ["tau=1e-3", "tau=1e-4", "tau=1e-5", "tau=1e-30", "unnormalized-norm-30", "correlated-tau=0.05"]


def assert_case_within_rule(s, t, mask, tau, normalize, grad, loss, ds, dt):
    """DESIGN.md's rule: each fused result's error against float64 is at most 2x plain torch's error in float32
    (the reference computed in float32), plus a small floor; losses finite and non-negative. The rule holds the
    loss and each float32 gradient (a 16-bit side's gradient carries its dtype's rounding, far above it)."""
    exact = reference(s, t, mask, None, tau, normalize, grad)
    plain = reference(s, t, mask, None, tau, normalize, grad, dtype=torch.float32)
    assert torch.isfinite(loss).all() and (loss >= 0).all()
    for name, got, torch32, want in zip(["loss", "d_student", "d_teacher"], [loss, ds, dt], plain, exact):
        if got.dtype != torch.float32:
            continue
        assert_within_rule(name, got, torch32, want, floor=1e-6 * want.abs().max().item())
