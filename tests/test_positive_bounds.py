"""Out-of-range ``positive_index`` values: a ValueError in eager mode; under torch.compile (where the host does not
read the indices) every kernel bounds them itself: that row's loss and its image's gradients are NaN, every other
image's values are exact, and nothing outside the tensors is read or written (10**7 would land far outside)."""

import pytest
import torch

import conmim
from conmim import native
from tests.conftest import loss_backends_here
from tests.cuda_on_cpu import build

B, N, D = 2, 16, 8
BAD = [N, N + 3, -1, 10**7]
BAD_ROW = 5  # a masked row of image 0


def _case(bad, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, D, generator=g, dtype=dtype)
    t = torch.randn(B, N, D, generator=g, dtype=dtype)
    mask = torch.rand(B, N, generator=g) < 0.5
    mask[0, BAD_ROW] = True
    mask[1, 3] = True
    pos = torch.randint(0, N, (B, N), generator=g)
    pos[0, BAD_ROW] = bad
    return s, t, mask, pos


def _loss(backend):
    def f(s, t, mask, pos):
        return conmim.patch_contrast_loss(s, t, mask, 0.1, "sum", True, pos, backend)

    return f


def _grads(fn, s, t, mask, pos):
    s = s.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    loss = fn(s, t, mask, pos)
    ds, dt = torch.autograd.grad(loss, [s, t])
    return loss.detach(), ds, dt


def _assert_defined(loss, ds, dt, s, t, mask, pos):
    """NaN for the bad row's loss and its image's gradients (student: that row only); image 1 exactly as the
    reference computes it on image 1 alone."""
    assert torch.isnan(loss), (
        f"loss {loss.item()}: an out-of-range positive must give NaN, not another row's logit"
    )
    assert torch.isnan(ds[0, BAD_ROW]).all()
    assert torch.isnan(dt[0]).all()
    others = [i for i in range(N) if i != BAD_ROW]
    assert torch.isfinite(ds[0, others]).all(), "the NaN spread to other rows' student gradients"
    _, want_ds, want_dt = _grads(_loss("reference"), s[1:], t[1:], mask[1:], pos[1:])
    torch.testing.assert_close(ds[1:], want_ds, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dt[1:], want_dt, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("backend", loss_backends_here())
def test_eager_out_of_range_positive_is_a_value_error(backend, bad):
    s, t, mask, pos = _case(bad)
    with pytest.raises(ValueError, match=r"positive_index must lie in \[0, N\)"):
        _loss(backend)(s, t, mask, pos)


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("backend", loss_backends_here())
def test_compiled_out_of_range_positive_is_nan_and_stays_in_bounds(backend, bad):
    # aot_eager traces the whole step as inductor does (the host checks are skipped while tracing, so the
    # index reaches the kernels) without inductor's C++ compile for every case; one inductor case follows.
    torch._dynamo.reset()
    s, t, mask, pos = _case(bad)
    fn = torch.compile(_loss(backend), fullgraph=True, backend="aot_eager")
    loss, ds, dt = _grads(fn, s, t, mask, pos)
    _assert_defined(loss, ds, dt, s, t, mask, pos)


@pytest.mark.slow
def test_compiled_with_inductor_out_of_range_positive_is_nan():
    torch._dynamo.reset()
    s, t, mask, pos = _case(N + 3)
    fn = torch.compile(_loss("cpu"), fullgraph=True)
    loss, ds, dt = _grads(fn, s, t, mask, pos)
    _assert_defined(loss, ds, dt, s, t, mask, pos)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_compiled_cpu_kernel_bounds_positives_in_other_dtypes(dtype):
    torch._dynamo.reset()
    s, t, mask, pos = _case(10**7, dtype)
    fn = torch.compile(_loss("cpu"), fullgraph=True, backend="aot_eager")
    loss, ds, dt = _grads(fn, s, t, mask, pos)
    assert torch.isnan(loss) and torch.isnan(ds[0, BAD_ROW]).all() and torch.isnan(dt[0]).all()
    assert torch.isfinite(ds[1]).all() and torch.isfinite(dt[1]).all()


# The CUDA kernels, executed on the CPU by tests/cuda_on_cpu (every subscript checked): the launchers are what a
# compiled graph calls on a GPU, with no host check in between.
@pytest.fixture
def cuda_on_cpu(monkeypatch):
    why = build.why_unavailable()
    if why is not None:
        pytest.skip(why)
    from conmim import _ext

    monkeypatch.setattr(_ext, "_C", build.load(build.build()))
    monkeypatch.setenv("CONMIM_CUDA_ON_CPU_ORDER", "shuffle:5")


@pytest.mark.parametrize("bad", BAD)
def test_cuda_kernels_bound_out_of_range_positives(cuda_on_cpu, bad):
    s, t, mask, pos = _case(bad)
    grad = torch.ones(B, N)
    loss, lse = native.patch_contrast_forward_cuda(s, t, mask, pos, 0.1, True)
    ds, dt = native.patch_contrast_backward_cuda(grad, s, t, mask, pos, lse, 0.1, True, True)
    _assert_defined(loss[mask].sum(), ds, dt, s, t, mask, pos)
    assert torch.isfinite(loss[1]).all() and torch.isfinite(lse).all()
