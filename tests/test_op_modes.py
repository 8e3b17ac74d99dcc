"""The loss under the modes users wrap it in: autocast, torch.func transforms, torch.compile(dynamic=True)."""

import pytest
import torch

import conmim
from tests.conftest import loss_backends_here

B, N, D = 2, 16, 8


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, D, generator=g)
    t = torch.randn(B, N, D, generator=g)
    mask = torch.rand(B, N, generator=g) < 0.5
    mask[:, 0] = True
    return s, t, mask


@pytest.mark.parametrize("backend", loss_backends_here())
def test_bf16_autocast(backend):
    # The student comes out of a Linear under autocast in bf16; the loss is still computed in fp32 from it.
    s, t, mask = _inputs()
    lin = torch.nn.Linear(D, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = lin(s)
        loss = conmim.patch_contrast_loss(x, t, mask, backend=backend)
    assert x.dtype == torch.bfloat16 and loss.dtype == torch.float32
    (gw,) = torch.autograd.grad(loss, [lin.weight])
    want = conmim.patch_contrast_loss_reference(x.detach().float(), t, mask)
    torch.testing.assert_close(loss.detach(), want, atol=2e-4, rtol=2e-4)
    assert torch.isfinite(gw).all()


def test_torch_func_grad_on_the_reference_backend():
    s, t, mask = _inputs(1)

    def f(x):
        return conmim.patch_contrast_loss(x, t, mask, backend="reference")

    got = torch.func.grad(f)(s)
    x = s.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(f(x), [x])
    torch.testing.assert_close(got, want)
    # and a second order, which the double-backward error points to
    hvp = torch.func.grad(lambda x: (torch.func.grad(f)(x) * t).sum())(s)
    assert hvp.shape == s.shape and torch.isfinite(hvp).all() and hvp.abs().sum() > 0


@pytest.mark.parametrize("backend", [b for b in loss_backends_here() if b != "reference"])
def test_torch_func_on_a_fused_backend_names_the_way_out(backend):
    s, t, mask = _inputs(2)
    with pytest.raises(RuntimeError, match=r"torch\.func transforms run on backend='reference' only"):
        torch.func.grad(lambda x: conmim.patch_contrast_loss(x, t, mask, backend=backend))(s)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compile_dynamic_fullgraph(backend):
    torch._dynamo.reset()
    s, t, mask = _inputs(3)

    def f(s, t, mask, tau):
        return conmim.patch_contrast_loss(s, t, mask, tau, backend=backend)

    fn = torch.compile(f, dynamic=True, fullgraph=True, backend="aot_eager")
    for tau in (0.1, 0.2):
        torch.testing.assert_close(fn(s, t, mask, tau), f(s, t, mask, tau))
