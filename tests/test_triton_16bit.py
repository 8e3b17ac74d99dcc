"""The Triton loss's bf16/fp16 branches on the CPU: the interpreter with IEEE bf16 (tests/interpreter16.py) runs
the products on 16-bit operands and the gradient's high/low split, as a GPU's tensor cores do, instead of the fp32
products the interpreter otherwise gets.

What a GPU computes from 16-bit features: exact products accumulated in fp32, every other operation in fp32, and
one rounding of each gradient to the features' dtype at the end. So the loss is held to plain fp32 torch's error
on the same (exactly representable) inputs, and each gradient to within 10% of the error of rounding the float64
gradient to its dtype: a product or sum of squares in the 16-bit dtype, or a gradient split that drops its
residual, is several times that.
"""

import pytest
import torch

from conmim.kernels import patch_contrast as kpc
from tests.conftest import HAS_GPU, assert_within_rule, triton_runs_here
from tests.interpreter16 import native_16bit
from tests.test_patch_contrast import loss_and_grads, make_mask

pytestmark = [
    pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here (no GPU, no interpreter)"),
    pytest.mark.skipif(HAS_GPU, reason="the interpreter's 16-bit mode; on a GPU test_patch_contrast runs it"),
]
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture
def native(monkeypatch):
    native_16bit(monkeypatch)


def _rel(got, want) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def _assert_rounding_only(name, got, want, dtype):
    """got within 10% of the error of rounding the float64 ``want`` to ``dtype`` (norms)."""
    assert torch.isfinite(got).all(), f"{name}: non-finite entries"
    ours, rounding = _rel(got, want), _rel(want.to(dtype), want)
    assert ours <= 1.1 * rounding, (
        f"{name}: relative error {ours:.3g}, rounding to {dtype} alone {rounding:.3g}"
    )


def _case(dtype, B, N, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, d, generator=g)
    t = s + 0.3 * torch.randn(B, N, d, generator=g)
    return s.to(dtype), t.to(dtype)


def test_the_mode_runs_16bit_products(native):
    const, _ = kpc.launch_meta("bwd_q", torch.bfloat16, torch.bfloat16, 40, False, True, temperature=0.1)
    assert const["F32_DOTS"] is False


# d = 40: the backward recomputes the logits per chunk (bwd_q, bwd_k); d = 100: it stores their gradient
# (bwd_w, bwd_wq, bwd_wk); N = 37: a ragged last tile
@pytest.mark.parametrize("d", [40, 100])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loss_and_gradients_as_a_gpu_computes_them(native, dtype, d):
    s, t = _case(dtype, 3, 37, d)
    mask = make_mask("ragged", 3, 37, seed=2)  # images unmasked, partly and fully masked
    assert kpc.backward_kernels(dtype, dtype, 37, d, True)[0] == ("bwd_q" if d == 40 else "bwd_w")
    loss, grads = loss_and_grads("triton", s, t, mask)
    want_loss, want = loss_and_grads("reference", s.double(), t.double(), mask)
    plain_loss, _ = loss_and_grads("reference", s.float(), t.float(), mask)
    assert_within_rule("loss", loss, plain_loss, want_loss, floor=1e-6)
    for name, got, w in zip(("d_student", "d_teacher"), grads, want):
        _assert_rounding_only(name, got, w, dtype)


def _student_gradient(backend, s, t, mask, scale):
    """d(student) for loss_and_grads's cotangents times ``scale`` (the teacher without a gradient)."""
    import conmim

    s = s.detach().requires_grad_(True)
    loss = conmim.patch_contrast_loss(s, t, mask, 0.1, "none", True, backend=backend)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(9)) * scale
    return torch.autograd.grad(loss, [s], g.to(loss.dtype))[0]


def test_fp16_gradient_tiles_past_fp16_range_are_scaled_not_overflowed(native):
    """An independent teacher of row norm ~6e-3 and cotangents ~1e3 (a loss scaler's) put entries of bwd_q's
    gradient tile, g p / (tau |k|), past 65504 while the student's gradient stays inside fp16: split unscaled,
    the tile's high part would be inf and its residual NaN."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 37, 40, generator=g).half()
    t = (torch.randn(2, 37, 40, generator=g) * 1e-3).half()
    mask = make_mask("ragged", 2, 37, seed=2)
    ds = _student_gradient("triton", s, t, mask, 1000.0)
    want = _student_gradient("reference", s.double(), t.double(), mask, 1000.0)
    assert want.abs().max() < 65504 / 4
    _assert_rounding_only("d_student", ds, want, torch.float16)
