"""GPU checks (run by benchmarks/gpu_check.sh on an H200): Triton and CUDA kernels against the reference,
a CUDA-graph capture of loss + EMA, and torch.compile(fullgraph=True) of a step using the loss."""

import pytest
import torch

import conmim
from conmim import _ext, native
from conmim.reference import ema_update_reference_, patch_contrast_loss_reference
from tests.conftest import requires_gpu
from tests.native_cases import assert_close_to, inputs, loss_tol_dtype, pair_id, reference
from tests.test_patch_contrast import MASKS, assert_matches, make_inputs, make_mask

pytestmark = [pytest.mark.cuda, requires_gpu]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _cuda(*ts):
    return [t.cuda() for t in ts]


def _loss_backend(backend):
    if backend == "cuda" and not _ext.cuda_compiled():
        pytest.skip("conmim._C was built without CUDA kernels")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,d", [(7, 16), (196, 256), (197, 256), (1000, 768), (3136, 256), (196, 1024)])
def test_loss_grid(backend, N, d, dtype):
    _loss_backend(backend)
    B = 4 if N <= 1000 else 2
    s, t = _cuda(*make_inputs(B, N, d, dtype, seed=N))
    for kind in MASKS:
        mask = make_mask(kind, B, N, seed=d).cuda()
        assert_matches(backend, s, t, mask, dtype)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_loss_strided_positive_index_and_student_only(backend, layout):
    _loss_backend(backend)
    s, t = _cuda(*make_inputs(3, 197, 64, torch.bfloat16, seed=3, layout=layout))
    mask = make_mask("ragged", 3, 197).cuda()
    assert_matches(backend, s, t, mask, torch.bfloat16)
    pos = torch.randint(0, 197, (3, 197), generator=torch.Generator().manual_seed(0)).cuda()
    assert_matches(backend, s, t, mask, torch.bfloat16, pos=pos, reduction="sum", teacher_grad=False)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize(
    "t_dtype,s_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
    ],
)
def test_ema_gpu(backend, t_dtype, s_dtype):
    if backend == "cuda" and not _ext.cuda_compiled():
        pytest.skip("conmim._C was built without CUDA kernels")
    g = torch.Generator().manual_seed(0)
    sizes = [(1,), (7,), (8193,), (384, 1536), (3, 5, 7), (0,), (1000003,)]
    teacher = [torch.randn(s, generator=g).to(t_dtype).cuda() for s in sizes]
    student = [torch.randn(s, generator=g).to(s_dtype).cuda() for s in sizes]
    student[3] = student[3].t().contiguous().t()
    want = [t.clone() for t in teacher]
    for step, m in enumerate([0.996, 0.3, 0.9]):
        student = [s + step for s in student]
        conmim.ema_update_(teacher, student, m if step else torch.tensor(m, device="cuda"), backend=backend)
        ema_update_reference_(want, student, m)
    tol = 2e-6 if t_dtype == torch.float32 else 1e-2
    for a, b in zip(teacher, want):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_cuda_graph_capture_of_loss_and_ema():
    torch.manual_seed(0)
    B, N, d = 8, 196, 256
    student = torch.nn.Linear(d, d).cuda()
    teacher = conmim.MomentumTeacher(student, total_steps=100)
    x = torch.randn(B, N, d, device="cuda")
    mask = make_mask("ragged", B, N).cuda()
    momentum = torch.tensor(0.99, device="cuda")
    opt = torch.optim.SGD(student.parameters(), lr=0.1)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = conmim.patch_contrast_loss(student(x), teacher(x).detach(), mask)
        loss.backward()
        opt.step()
        teacher.update(student, momentum=momentum)
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    before = [p.clone() for p in teacher.module.parameters()]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(static_loss).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.module.parameters()))
    eager = patch_contrast_loss_reference(student(x), teacher(x), mask)
    assert abs(float(eager) - float(static_loss)) < 1.0  # one SGD step apart, same magnitude


def test_torch_compile_fullgraph_step():
    torch.manual_seed(0)
    proj = torch.nn.Linear(64, 64).cuda()
    x = torch.randn(4, 196, 64, device="cuda")
    mask = make_mask("ragged", 4, 196).cuda()

    def step(inp, m):
        return conmim.patch_contrast_loss(proj(inp), proj(inp).detach() * 0.5, m)

    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x, mask)
    out.backward()
    ref = step(x, mask)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pair", [(s, t) for s in DTYPES for t in DTYPES], ids=pair_id)
def test_cuda_launchers_every_dtype_pair(pair):
    # Each input read in its own dtype, each gradient in its input's dtype, against the float64 reference.
    _loss_backend("cuda")
    s, t, grad, pos = inputs(3, 197, 96, pair, seed=1, positive=True)
    mask = make_mask("ragged", 3, 197)
    loss, lse = native.patch_contrast_forward_cuda(*_cuda(s, t, mask, pos), 0.1, True)
    ds, dt = native.patch_contrast_backward_cuda(*_cuda(grad, s, t, mask, pos, lse), 0.1, True, True)
    want_loss, want_ds, want_dt = reference(s, t, mask, pos, 0.1, True, grad)
    assert_close_to(loss.cpu(), want_loss, loss_tol_dtype(pair), "loss", "loss")
    assert_close_to(ds.cpu(), want_ds, pair[0], "grad", "d_student")
    assert_close_to(dt.cpu(), want_dt, pair[1], "grad", "d_teacher")
