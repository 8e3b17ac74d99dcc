"""Accuracy against float64 by DESIGN.md's rule, including a saturated softmax (the positive's probability near 1),
and temperatures whose 1 / tau leaves float32.

The rule: a fused result's error against the float64 reference is at most twice the error of the plain torch
computation in the same dtype (the official formulation, autograd for its gradients), plus a small floor.
"""

import pytest
import torch
import torch.nn.functional as F

import conmim
from conmim._validate import MIN_TEMPERATURE
from conmim.kernels import interpreting
from tests.conftest import HAS_GPU, assert_within_rule, loss_backends_here
from tests.test_patch_contrast import loss_and_grads, make_mask

BACKENDS = loss_backends_here()
# name -> (teacher = student + noise * this, or an independent teacher when None; temperature)
CASES = {
    "random-tau0.1": (None, 0.1),
    "random-tau0.05": (None, 0.05),
    "correlated-tau0.1": (0.05, 0.1),
    "correlated-tau0.05": (0.05, 0.05),
    "correlated-tau0.02": (0.01, 0.02),
}


def _eps_at(dtype: torch.dtype, ref: torch.Tensor) -> float:
    return torch.finfo(dtype).eps * max(ref.double().abs().max().item(), 1e-30)


def plain_loss_and_grads(s, t, mask, temperature):
    """The official formulation computed in the inputs' own dtype, gradients by autograd (cotangents as in
    loss_and_grads)."""
    s = s.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    q, k = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    logits = torch.bmm(q, k.transpose(1, 2)) / temperature
    rows = (torch.logsumexp(logits, -1) - logits.diagonal(dim1=1, dim2=2))[mask]
    g = torch.randn(rows.shape, generator=torch.Generator().manual_seed(9)).to(rows.dtype)
    return rows.detach(), torch.autograd.grad(rows, [s, t], g)


def make_case(case: str, dtype: torch.dtype, B=2, N=64, d=32):
    noise, tau = CASES[case]
    gen = torch.Generator().manual_seed(17)
    s = torch.randn(B, N, d, generator=gen)
    t = torch.randn(B, N, d, generator=gen)
    if noise is not None:
        t = s + noise * t
    return s.to(dtype), t.to(dtype), tau


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_error_against_float64_within_twice_plain_torch(backend, case, dtype):
    s, t, tau = make_case(case, dtype)
    mask = make_mask("ragged", *s.shape[:2], seed=4)
    # Triton on a GPU gets CUDA tensors: there its fp32 products run on tensor cores (3xTF32), and plain TF32
    # (~1e-3 relative error on these logits) would break the rule against fp32 torch on the CPU
    dev = "cuda" if backend == "triton" and HAS_GPU and not interpreting() else "cpu"
    loss, grads = loss_and_grads(backend, s.to(dev), t.to(dev), mask.to(dev), temperature=tau)
    loss, grads = loss.cpu(), [g.cpu() for g in grads]
    ref_loss, ref_grads = loss_and_grads("reference", s.double(), t.double(), mask, temperature=tau)
    plain_loss, plain_grads = plain_loss_and_grads(s, t, mask, tau)
    # the floor: one rounding of the result's dtype at its scale, so that a plain computation that happens to be
    # exact does not demand exactness
    assert_within_rule("loss", loss, plain_loss, ref_loss, floor=_eps_at(torch.float32, ref_loss))
    for name, got, plain, want in zip(("d_student", "d_teacher"), grads, plain_grads, ref_grads):
        assert_within_rule(name, got, plain, want, floor=_eps_at(dtype, want))


SATURATED = ["correlated-tau0.05", "correlated-tau0.02"]


@pytest.mark.parametrize("case", SATURATED)
def test_saturated_cases_do_saturate(case):
    # A check of the cancellation only if the positive's probability p is close enough to 1 that p - 1 computed
    # as exp(logit - lse) - 1 (lse ~ 1 / tau, rounded in float32) loses most of its digits somewhere.
    s, t, tau = make_case(case, torch.float64)
    logits = torch.bmm(F.normalize(s, dim=-1), F.normalize(t, dim=-1).transpose(1, 2)) / tau
    p_pos = torch.softmax(logits, -1).diagonal(dim1=1, dim2=2)
    assert (1 - p_pos).min() < 1e-5


@pytest.mark.parametrize("case", SATURATED)
@pytest.mark.parametrize("backend", BACKENDS)
def test_saturated_gradient_has_no_cancellation(backend, case):
    # The positive's 1 - p computed without cancellation keeps fp32 gradients near fp32 rounding (the reference:
    # ~3e-6 relative); computed as 1 - exp(logit - lse) it loses 1e-4..1 relative (issue 13, item 4).
    s, t, tau = make_case(case, torch.float32)
    mask = make_mask("ragged", *s.shape[:2], seed=4)
    _, grads = loss_and_grads(backend, s, t, mask, temperature=tau)
    _, ref_grads = loss_and_grads("reference", s.double(), t.double(), mask, temperature=tau)
    for name, got, want in zip(("d_student", "d_teacher"), grads, ref_grads):
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel < 2e-5, f"{name}: relative error {rel:.3g} against float64"


@pytest.mark.parametrize("tau", [1e-39, 1.1e-38, 0.0, -0.1, float("inf"), float("nan")], ids=str)
def test_temperature_outside_float32_is_rejected(tau):
    s = torch.randn(1, 3, 4)
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="temperature must be"):
        conmim.patch_contrast_loss(s, s, mask, tau)
    with pytest.raises(ValueError, match="temperature must be"):
        conmim.FusedPatchContrastLoss(tau)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_smallest_temperature_is_accepted_with_finite_row_losses(backend):
    # Each row's loss is at most 2 / tau + log N (about 1.7e38 here); a mean over rows that large can overflow
    # in its sum, so the rows are checked.
    g = torch.Generator().manual_seed(0)
    s = F.normalize(torch.randn(1, 3, 4, generator=g), dim=-1)
    mask = torch.ones(1, 3, dtype=torch.bool)
    rows = conmim.patch_contrast_loss(s, -s, mask, MIN_TEMPERATURE, "none", backend=backend)
    assert torch.isfinite(rows).all() and (rows > 0).all(), rows
