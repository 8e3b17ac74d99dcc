"""Every loss and EMA kernel that runs here (reference, C++, Triton under its interpreter, both Triton backward
variants, the CUDA kernels on the CPU executor) on the layouts that a kernel ignoring a stride gets wrong:
stride-0 and transposed upstream gradients (``reduction="mean"`` hands the backward a stride-0 one), transposed
teachers, non-contiguous ``positive_index``; and sentinels after every buffer a launcher allocates and after every
EMA teacher, so a write one element past an output fails an assertion instead of corrupting the heap."""

import pytest
import torch

from conmim import native, ops
from tests.conftest import triton_runs_here
from tests.cuda_on_cpu import build
from tests.native_cases import reference

B, N, D = 3, 21, 12
TRITON = pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here (no GPU, no interpreter)")
BACKENDS = [
    "reference",
    "cpu",
    pytest.param("triton-recompute", marks=TRITON),
    pytest.param("triton-stored", marks=TRITON),
    "cuda-on-cpu",
]
SENTINEL = -7321.0


@pytest.fixture
def launch(request, monkeypatch):
    """(forward, backward) launchers of one backend, each as the op layer calls it."""
    name = request.param
    if name == "cuda-on-cpu":
        why = build.why_unavailable()
        if why is not None:
            pytest.skip(why)
        from conmim import _ext

        monkeypatch.setattr(_ext, "_C", build.load(build.build()))
        monkeypatch.setenv("CONMIM_CUDA_ON_CPU_ORDER", "shuffle:3")
        return native.patch_contrast_forward_cuda, native.patch_contrast_backward_cuda
    if name == "cpu":
        return native.patch_contrast_forward_cpu, native.patch_contrast_backward_cpu
    if name == "reference":

        def bwd(grad, s, t, mask, pos, lse, tau, normalize, need_teacher):
            return ops._reference_backward(grad, s, t, mask, pos, tau, normalize, need_teacher)

        return ops._reference_rows, bwd
    from conmim.kernels import patch_contrast as kpc

    kernels = ("bwd_q", "bwd_k") if name == "triton-recompute" else ("bwd_w", "bwd_wq", "bwd_wk")

    def tbwd(*args):
        return kpc.patch_contrast_backward(*args, kernels=kernels)

    return kpc.patch_contrast_forward, tbwd


def _case(seed=0, positive=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, D, generator=g)
    t = torch.randn(B, N, D, generator=g)
    mask = torch.rand(B, N, generator=g) < 0.5
    mask[0, :2] = True  # every image partly masked
    mask[:, -1] = False
    pos = torch.randint(0, N, (B, N), generator=g) if positive else None
    return s, t, mask, pos


def _check(launch, s, t, mask, pos, grad, tol=(1e-5, 1e-4)):
    fwd, bwd = launch
    loss, lse = fwd(s, t, mask, pos, 0.1, True)
    ds, dt = bwd(grad, s, t, mask, pos, lse, 0.1, True, True)
    want_loss, want_ds, want_dt = reference(s, t, mask, pos, 0.1, True, grad.contiguous())
    atol, rtol = tol
    torch.testing.assert_close(loss.double(), want_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(ds.double(), want_ds, atol=atol, rtol=rtol)
    torch.testing.assert_close(dt.double(), want_dt, atol=atol, rtol=rtol)


GRADS = {
    # each varies along both dims where it can, so a kernel reading the wrong element sees another value
    "per-image": lambda g: torch.randn(B, 1, generator=g).expand(B, N),  # strides (1, 0)
    "per-patch": lambda g: torch.randn(1, N, generator=g).expand(B, N),  # strides (0, 1)
    "scalar": lambda g: torch.randn((), generator=g).expand(B, N),  # strides (0, 0): reduction="mean"
    "transposed": lambda g: torch.randn(N, B, generator=g).t(),  # strides (1, B)
    "sliced": lambda g: torch.randn(B, 2 * N + 1, generator=g)[:, 1::2],  # strides (2N + 1, 2)
}


@pytest.mark.parametrize("kind", GRADS)
@pytest.mark.parametrize("launch", BACKENDS, indirect=True)
def test_gradient_layouts(launch, kind):
    s, t, mask, pos = _case(1)
    grad = GRADS[kind](torch.Generator().manual_seed(2))
    _check(launch, s, t, mask, pos, grad)


@pytest.mark.parametrize("launch", BACKENDS, indirect=True)
def test_transposed_teacher_and_student(launch):
    s, t, mask, pos = _case(3)
    t = t.transpose(1, 2).contiguous().transpose(1, 2)  # feature stride N
    _check(launch, s, t, mask, pos, torch.randn(B, N, generator=torch.Generator().manual_seed(4)))
    s = s.transpose(1, 2).contiguous().transpose(1, 2)
    _check(launch, s, t, mask, pos, torch.randn(B, N, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("launch", BACKENDS, indirect=True)
def test_non_contiguous_positive_index(launch, layout):
    s, t, mask, _ = _case(6, positive=False)
    g = torch.Generator().manual_seed(7)
    if layout == "transposed":
        pos = torch.randint(0, N, (N, B), generator=g).t()  # strides (1, B)
    else:
        pos = torch.randint(0, N, (B, 3 * N), generator=g)[:, 2::3]  # strides (3N, 3)
    assert not pos.is_contiguous()
    _check(launch, s, t, mask, pos, torch.randn(B, N, generator=g))


# ------------------------------------------------------------------------------------------------ sentinels
class Sentinels:
    """torch.empty / torch.empty_like that hand out the front of a larger buffer whose tail holds a sentinel;
    ``check`` asserts every tail is untouched."""

    PAD = 64

    def __init__(self, monkeypatch):
        self.buffers = []
        empty = torch.empty

        def padded(shape, dtype, device):
            n = 1
            for d in shape:
                n *= int(d)
            dtype = dtype or torch.get_default_dtype()
            buf = empty(n + self.PAD, dtype=dtype, device=device)
            if dtype.is_floating_point:
                buf.fill_(float("nan"))
                buf[n:] = SENTINEL
            else:
                buf[n:] = -7 if dtype != torch.bool else True
            self.buffers.append((buf, n))
            return buf[:n].view(*shape)

        def new_empty(*size, dtype=None, device=None, **kw):
            shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
            return padded(shape, dtype, device)

        def new_empty_like(x, *, dtype=None, device=None, **kw):
            return padded(tuple(x.shape), dtype or x.dtype, device or x.device)

        monkeypatch.setattr(torch, "empty", new_empty)
        monkeypatch.setattr(torch, "empty_like", new_empty_like)

    def check(self):
        assert self.buffers, "the launcher allocated nothing through torch.empty"
        for buf, n in self.buffers:
            tail = buf[n:]
            if buf.dtype.is_floating_point:
                assert (tail == SENTINEL).all(), f"a kernel wrote past a [{n}] {buf.dtype} buffer"
            else:
                assert (tail == tail[0]).all(), f"a kernel wrote past a [{n}] {buf.dtype} buffer"


@pytest.mark.parametrize("launch", BACKENDS[1:], indirect=True)
def test_sentinels_after_every_loss_output(launch, monkeypatch):
    s, t, mask, pos = _case(8)
    fwd, bwd = launch
    sentinels = Sentinels(monkeypatch)
    loss, lse = fwd(s, t, mask, pos, 0.1, True)
    ds, dt = bwd(torch.randn(B, N), s, t, mask, pos, lse, 0.1, True, True)
    sentinels.check()
    for x in (loss, lse, ds, dt):
        assert not x.isnan().any(), "an output element was left unwritten"


def _ema(name, monkeypatch):
    if name == "cpu":
        return native.ema_update_cpu_
    if name == "cuda-on-cpu":
        why = build.why_unavailable()
        if why is not None:
            pytest.skip(why)
        from conmim import _ext

        monkeypatch.setattr(_ext, "_C", build.load(build.build()))
        return native.ema_update_cuda_
    if not triton_runs_here():
        pytest.skip("Triton cannot run here (no GPU, no interpreter)")
    from conmim.kernels import ema

    return ema.ema_update_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["cpu", "triton", "cuda-on-cpu"])
def test_sentinels_after_every_ema_teacher(name, dtype, monkeypatch):
    update = _ema(name, monkeypatch)
    g = torch.Generator().manual_seed(9)
    sizes = [1, 7, 4097, 33, 8192]  # a single element, a tail past one 4096 block, an exact multiple
    pad = 16
    buf = torch.full((sum(n + pad for n in sizes),), SENTINEL, dtype=dtype)
    teacher, at = [], 0
    for n in sizes:
        teacher.append(buf[at : at + n])
        teacher[-1].copy_(torch.randn(n, generator=g))
        at += n + pad
    student = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    want = [t.float() + 0.1 * (s.float() - t.float()) for t, s in zip(teacher, student)]
    update(teacher, student, 0.9)
    at = 0
    for n, got, ref in zip(sizes, teacher, want):
        torch.testing.assert_close(got.float(), ref, atol=1e-2 if dtype != torch.float32 else 1e-6, rtol=1e-2)
        assert (buf[at + n : at + n + pad] == SENTINEL).all(), f"an EMA kernel wrote past a [{n}] teacher"
        at += n + pad
