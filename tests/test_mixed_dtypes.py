"""Student and teacher in different dtypes (fp32 / bf16 / fp16), as torch ops accept them: every backend reads each
in its own dtype, returns the loss in fp32 and each gradient in its input's dtype."""

import pytest
import torch
from torch import nn

import conmim
from conmim.ops import patch_contrast_op
from tests.conftest import TOL, loss_backends_here
from tests.test_patch_contrast import loss_and_grads, make_inputs, make_mask

LOW = (torch.float32, torch.bfloat16, torch.float16)
PAIRS = [(s, t) for s in LOW for t in LOW if s != t]
BACKENDS = loss_backends_here()


def _looser(a: torch.dtype, b: torch.dtype) -> dict:
    """The tolerance of whichever dtype is less precise, per entry."""
    return {k: tuple(max(x, y) for x, y in zip(TOL[a][k], TOL[b][k])) for k in ("loss", "grad")}


@pytest.mark.parametrize("mask_kind", ["ragged", "full"])
@pytest.mark.parametrize("s_dtype,t_dtype", PAIRS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_pair_matches_reference(backend, s_dtype, t_dtype, mask_kind):
    B, N, d = 3, 13, 24
    s, _ = make_inputs(B, N, d, s_dtype, seed=11)
    _, t = make_inputs(B, N, d, t_dtype, seed=11)
    mask = make_mask(mask_kind, B, N, seed=3)
    loss, (gs, gt) = loss_and_grads(backend, s, t, mask)
    ref_loss, (rs, rt) = loss_and_grads("oracle", s, t, mask)  # fp32 from the same rounded inputs
    tol = _looser(s_dtype, t_dtype)
    assert loss.dtype == torch.float32
    assert gs.dtype == s_dtype and gt.dtype == t_dtype
    torch.testing.assert_close(loss, ref_loss, atol=tol["loss"][0], rtol=tol["loss"][1])
    for got, want in ((gs, rs), (gt, rt)):
        err = (got.double() - want.double()).abs().max().item()
        scale = want.double().abs().max().item()
        assert err <= tol["grad"][0] + tol["grad"][1] * scale, (
            f"gradient error {err:.3g} at scale {scale:.3g}"
        )


@pytest.mark.parametrize("s_dtype,t_dtype", PAIRS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_mixed_pair_opcheck(backend, s_dtype, t_dtype):
    # The fake registrations must give what the kernels give: d_teacher in the teacher's dtype.
    s, _ = make_inputs(2, 7, 16, s_dtype, seed=5)
    _, t = make_inputs(2, 7, 16, t_dtype, seed=5)
    mask = make_mask("ragged", 2, 7, seed=1)
    mask[1, 3] = True
    args = (s.requires_grad_(True), t.requires_grad_(True), mask, None, 0.1, True, backend)
    torch.library.opcheck(torch.ops.conmim.patch_contrast.default, args)
    _, lse = patch_contrast_op(s.detach(), t.detach(), mask, None, 0.1, True, backend)
    bargs = (torch.randn(2, 7), s.detach(), t.detach(), mask, None, lse, 0.1, True, True, backend)
    torch.library.opcheck(torch.ops.conmim.patch_contrast_backward.default, bargs)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_drop_in_bf16_autocast_student_fp32_teacher_compiled(backend):
    """As another project would write it: a head under CPU bf16 autocast makes the student features, the teacher
    features are fp32 (computed outside autocast), the step is compiled whole, and the gradient reaches the head."""
    torch.manual_seed(0)
    B, N, d = 2, 9, 16
    head = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))
    teacher_head = nn.Linear(d, d).requires_grad_(False)
    x = torch.randn(B, N, d)
    mask = make_mask("ragged", B, N, seed=2)
    mask[1, :4] = True
    loss_fn = conmim.FusedPatchContrastLoss(temperature=0.1, backend=backend)

    def step(x, mask):
        with torch.no_grad():
            target = teacher_head(x)  # fp32: outside autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = head(x)
        return loss_fn(feats, target, mask), feats.dtype, target.dtype

    compiled = torch.compile(step, fullgraph=True)
    loss, s_dtype, t_dtype = compiled(x, mask)
    assert (s_dtype, t_dtype) == (torch.bfloat16, torch.float32) and loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)

    # the same step, eager, on the reference with the student upcast by hand
    want_grads = []
    for p in head.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = head(x)
    want = conmim.patch_contrast_loss(feats.float(), teacher_head(x).detach(), mask, backend="reference")
    want.backward()
    want_grads = [p.grad for p in head.parameters()]
    torch.testing.assert_close(loss.detach(), want.detach(), atol=2e-4, rtol=2e-4)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-3, rtol=2e-2)
