"""The reference ops: exact formula, both formulations agree, float64 gradcheck, clear errors."""

import itertools
import math

import pytest
import torch

from conmim.reference import (
    ema_update_loop_,
    ema_update_reference_,
    momentum_schedule,
    patch_contrast_loss_official,
    patch_contrast_loss_reference,
)


def _inputs(B, N, d, dtype=torch.float32, seed=0, p=0.5):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, d, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randn(B, N, d, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(B, N, generator=g) < p
    return s, t, mask


def _loop_formula(s, t, mask, tau, pos=None):
    """The loss written as plainly as possible, one masked row at a time (float64)."""
    out = []
    for b in range(s.shape[0]):
        k = t[b].double()
        k = k / k.norm(dim=-1, keepdim=True)
        for i in torch.nonzero(mask[b]).flatten().tolist():
            q = s[b, i].double()
            q = q / q.norm()
            logits = (k @ q) / tau
            j = i if pos is None else int(pos[b, i])
            out.append(torch.logsumexp(logits, 0) - logits[j])
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


@pytest.mark.parametrize("B,N,d", [(3, 7, 5), (2, 49, 16), (4, 196, 32)])
def test_reference_matches_plain_formula(B, N, d):
    s, t, mask = _inputs(B, N, d)
    mask[0] = True  # one full image
    if B > 2:
        mask[1] = False  # one empty image
    got = patch_contrast_loss_reference(s, t, mask, 0.1, "none")
    want = _loop_formula(s, t, mask, 0.1)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        patch_contrast_loss_reference(s, t, mask, 0.1, "mean").double(), want.mean(), atol=2e-6, rtol=2e-6
    )
    torch.testing.assert_close(
        patch_contrast_loss_reference(s, t, mask, 0.1, "sum").double(), want.sum(), atol=1e-4, rtol=2e-6
    )


def test_positive_index_changes_the_target():
    s, t, mask = _inputs(2, 9, 4)
    pos = torch.randint(0, 9, (2, 9), generator=torch.Generator().manual_seed(1))
    got = patch_contrast_loss_reference(s, t, mask, 0.2, "none", positive_index=pos)
    torch.testing.assert_close(got.double(), _loop_formula(s, t, mask, 0.2, pos), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_official_formulation_agrees(dtype, reduction):
    s, t, mask = _inputs(4, 50, 24, dtype, seed=3)
    a = patch_contrast_loss_reference(s, t, mask, 0.1, reduction)
    b = patch_contrast_loss_official(s, t, mask, 0.1, reduction)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_official_formulation_gradients_agree():
    s, t, mask = _inputs(3, 30, 8, torch.float64, seed=4)
    s.requires_grad_(True)
    ga = torch.autograd.grad(patch_contrast_loss_reference(s, t, mask), s)[0]
    gb = torch.autograd.grad(patch_contrast_loss_official(s, t, mask), s)[0]
    torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-10)


def test_reference_gradcheck_float64():
    s, t, mask = _inputs(2, 11, 6, torch.float64, seed=5)
    mask[1, :] = False
    mask[1, 3] = True
    pos = torch.randint(0, 11, (2, 11), generator=torch.Generator().manual_seed(2))
    s.requires_grad_(True)
    t.requires_grad_(True)
    for red in ("mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda a, b, red=red: patch_contrast_loss_reference(a, b, mask, 0.1, red, positive_index=pos),
            (s, t),
        )


def test_empty_mask_gives_zero_loss_and_zero_gradient():
    s, t, _ = _inputs(2, 7, 4)
    s.requires_grad_(True)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    loss = patch_contrast_loss_reference(s, t, mask)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert patch_contrast_loss_reference(s, t, mask, reduction="none").shape == (0,)


def test_uniform_features_give_log_n():
    # All keys equal: every logit is the same, so each row's loss is log N exactly.
    B, N, d = 2, 13, 5
    s = torch.randn(B, N, d)
    t = torch.ones(B, N, d)
    mask = torch.ones(B, N, dtype=torch.bool)
    torch.testing.assert_close(
        patch_contrast_loss_reference(s, t, mask).item(), math.log(N), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "make,exc,words",
    [
        (lambda s, t, m: (s[0], t, m), ValueError, "student must have shape [B, N, d]"),
        (lambda s, t, m: (s, t[:, :3], m), ValueError, "teacher must have the student's shape"),
        (lambda s, t, m: (s, t, m.float()), TypeError, "mask must be a bool tensor"),
        (lambda s, t, m: (s, t, m[:, :3]), ValueError, "mask must have shape [B, N]"),
        (lambda s, t, m: (s[..., :0], t[..., :0], m), ValueError, "d >= 1"),
        (lambda s, t, m: (s, t.double(), m), TypeError, "teacher must be float32, bfloat16 or float16 with"),
        (
            lambda s, t, m: (s.double(), t.half(), m),
            TypeError,
            "teacher must be float64 with a torch.float64",
        ),
        (lambda s, t, m: (s.long(), t.long(), m), TypeError, "student must be float32"),
        (lambda s, t, m: (s, t, m.to("meta")), ValueError, "mask must be on the student's device"),
        (lambda s, t, m: (s, t.to("meta"), m), ValueError, "teacher must be on the student's device"),
        (lambda s, t, m: (s.numpy(), t, m), TypeError, "student must be a torch.Tensor"),
    ],
)
def test_bad_input_is_named(make, exc, words):
    s, t, m = _inputs(2, 5, 3)
    with pytest.raises(exc, match=None) as info:
        patch_contrast_loss_reference(*make(s, t, m))
    assert words in str(info.value)


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature="hot"), TypeError, "temperature must be a float"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(positive_index=torch.zeros(2, 5)), TypeError, "positive_index must be an int64"),
        (dict(positive_index=torch.full((2, 5), 5)), ValueError, "positive_index must lie in [0, N)"),
    ],
)
def test_bad_options_are_named(kwargs, exc, words):
    s, t, m = _inputs(2, 5, 3, p=1.0)
    with pytest.raises(exc) as info:
        patch_contrast_loss_reference(s, t, m, **kwargs)
    assert words in str(info.value)


def test_momentum_schedule_values():
    assert momentum_schedule(0, 1000) == pytest.approx(0.996, abs=1e-15)
    assert momentum_schedule(500, 1000) == pytest.approx(0.998, abs=1e-15)
    assert momentum_schedule(1000, 1000) == pytest.approx(1.0, abs=1e-15)
    assert momentum_schedule(250, 1000) == pytest.approx(
        1 - 0.004 * (1 + math.cos(math.pi / 4)) / 2, abs=1e-15
    )
    assert momentum_schedule(5000, 1000) == 1.0  # clamped
    values = [momentum_schedule(k, 100) for k in range(101)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        momentum_schedule(0, 0)


def test_ema_reference_is_foreach_lerp():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    student = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    want = [t.clone() for t in teacher]
    torch._foreach_lerp_(want, student, 1 - 0.9)
    ema_update_reference_(teacher, student, 0.9)
    for a, b in zip(teacher, want):
        assert torch.equal(a, b)
    loop = [t.clone() for t in want]
    ema_update_loop_(loop, student, 0.9)
    ema_update_reference_(want, student, torch.tensor(0.9))
    for a, b in zip(loop, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
