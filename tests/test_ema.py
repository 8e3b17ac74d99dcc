"""Fused EMA update and MomentumTeacher against the reference, over several consecutive updates."""

import itertools

import pytest
import torch
from torch import nn

import conmim
from conmim.reference import ema_update_reference_, momentum_schedule
from tests.conftest import triton_runs_here

SIZES = [(1,), (7,), (4097,), (3, 5), (384, 1536), (2, 3, 5, 7), (0,)]
BACKENDS_HERE = ["cpu", "reference"] + (["triton"] if triton_runs_here() else [])
DT = [torch.float32, torch.bfloat16, torch.float16]


def _lists(t_dtype, s_dtype, seed=0, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(s, generator=g).to(t_dtype) for s in sizes]
    student = [torch.randn(s, generator=g).to(s_dtype) for s in sizes]
    return teacher, student


def _tol(dtype):
    return {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("t_dtype,s_dtype", list(itertools.product(DT, DT)), ids=str)
def test_ema_matches_reference_over_several_updates(backend, t_dtype, s_dtype):
    sizes = SIZES if backend != "triton" else [(1,), (7,), (4097,), (3, 5)]
    teacher, student = _lists(t_dtype, s_dtype, sizes=sizes)
    want = [t.clone() for t in teacher]
    for step, m in enumerate([0.996, 0.5, 0.9, 0.2, 1.0]):
        student = [s + 0.1 * step for s in student]
        conmim.ema_update_(teacher, student, m, backend=backend)
        ema_update_reference_(want, student, m)
    for got, ref in zip(teacher, want):
        assert got.dtype == t_dtype
        torch.testing.assert_close(got.float(), ref.float(), atol=_tol(t_dtype), rtol=_tol(t_dtype))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_ema_non_contiguous_student_and_tensor_momentum(backend):
    teacher, student = _lists(torch.float32, torch.float32, seed=1, sizes=[(6, 10), (33,)])
    student = [student[0].t().contiguous().t(), torch.randn(66)[::2]]
    assert not student[0].is_contiguous() and not student[1].is_contiguous()
    want = [t.clone() for t in teacher]
    conmim.ema_update_(teacher, student, torch.tensor(0.75), backend=backend)
    ema_update_reference_(want, student, 0.75)
    for got, ref in zip(teacher, want):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_ema_float64_and_momentum_edges():
    teacher, student = _lists(torch.float64, torch.float64, seed=2, sizes=[(5,), (9,)])
    before = [t.clone() for t in teacher]
    conmim.ema_update_(teacher, student, 1.0, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(teacher, before))  # m = 1 leaves the teacher unchanged
    conmim.ema_update_(teacher, student, 0.0, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(teacher, student))  # m = 0 copies the student


# (teacher, student) layouts: channels_last and transposed pairs (what a deepcopy of such a parameter gives),
# and a transposed teacher with a row-major student and a strided one (copied into the teacher's layout)
LAYOUTS = {
    "channels-last": (
        lambda x: x.to(memory_format=torch.channels_last),
        lambda x: x.to(memory_format=torch.channels_last),
    ),
    "transposed": (lambda x: x.transpose(1, 3).contiguous().transpose(1, 3),) * 2,
    "transposed-teacher": (lambda x: x.transpose(1, 3).contiguous().transpose(1, 3), lambda x: x),
    "strided-student": (lambda x: x, lambda x: torch.cat([x, x], 3)[..., ::2]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_ema_dense_teachers_in_any_layout(backend, layout):
    to_t, to_s = LAYOUTS[layout]
    g = torch.Generator().manual_seed(5)
    teacher = [to_t(torch.randn(2, 3, 4, 5, generator=g)), torch.randn(7, generator=g)]
    student = [to_s(torch.randn(2, 3, 4, 5, generator=g)), torch.randn(7, generator=g)]
    strides = [t.stride() for t in teacher]
    want = [t.clone() for t in teacher]
    for m in (0.9, 0.5):
        conmim.ema_update_(teacher, student, m, backend=backend)
        ema_update_reference_(want, student, m)
    assert [t.stride() for t in teacher] == strides
    for got, ref in zip(teacher, want):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_ema_reads_a_student_in_its_teachers_layout_in_place():
    """No copy per call where the layouts match: the kernels get views of the tensors' own memory (the Triton
    launcher's address table, keyed by addresses, is found again on the next call)."""
    from conmim import ops

    t = torch.randn(8, 3, 4, 4).to(memory_format=torch.channels_last)
    s = torch.randn(8, 3, 4, 4).to(memory_format=torch.channels_last)
    (ft,), (fs,) = ops._flat_operands([t], [s])
    assert (ft.data_ptr(), fs.data_ptr()) == (t.data_ptr(), s.data_ptr())
    assert ft.is_contiguous() and fs.is_contiguous()
    (_,), (fs,) = ops._flat_operands([t], [s.contiguous()])
    assert fs.data_ptr() != s.data_ptr()  # another layout: copied into the teacher's


def test_ema_teacher_with_gaps_falls_back_with_a_reason():
    t = torch.randn(6, 8)[:, ::2]
    s = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="gaps or overlaps"):
        conmim.ema_update_([t], [s], 0.5, backend="cpu")
    want = t.clone()
    ema_update_reference_([want], [s], 0.5)
    with pytest.warns(RuntimeWarning, match="falling back to the PyTorch reference"):
        conmim.ema_update_([t], [s], 0.5)
    torch.testing.assert_close(t, want)


@pytest.mark.parametrize(
    "args,exc,words",
    [
        (([torch.zeros(3)], [torch.zeros(4)], 0.5), ValueError, "student[0] must have teacher[0]'s shape"),
        (([torch.zeros(3)], [], 0.5), ValueError, "as many tensors"),
        (([torch.zeros(3)], [torch.zeros(3)], 1.5), ValueError, "momentum must lie in [0, 1]"),
        (([torch.zeros(3)], [torch.zeros(3)], "0.9"), TypeError, "momentum must be a float"),
        ((torch.zeros(3), [torch.zeros(3)], 0.5), TypeError, "teacher must be a list or tuple"),
        (
            ([torch.zeros(3, dtype=torch.long)], [torch.zeros(3, dtype=torch.long)], 0.5),
            TypeError,
            "floating",
        ),
    ],
)
def test_ema_bad_input(args, exc, words):
    with pytest.raises(exc) as info:
        conmim.ema_update_(*args)
    assert words in str(info.value)


def test_opcheck_ema():
    teacher, student = _lists(torch.float32, torch.float32, seed=3, sizes=[(5,), (3, 4)])
    for backend in ("cpu", "reference"):
        torch.library.opcheck(
            torch.ops.conmim.ema_update_.default, ([t.clone() for t in teacher], student, 0.9, None, backend)
        )


# ------------------------------------------------------------------------------------------- MomentumTeacher
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(7, 5)
        self.bn = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.head(self.bn(self.lin(x)))


@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
def test_momentum_teacher_tracks_reference(student_dtype):
    torch.manual_seed(0)
    student = Net().to(student_dtype)
    teacher = conmim.MomentumTeacher(student, total_steps=10)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in teacher.module.parameters())
    assert teacher.module.training
    ref = [p.detach().float().clone() for p in student.parameters()]
    for step in range(4):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        teacher.update(student, step)
        ema_update_reference_(ref, list(student.parameters()), momentum_schedule(step, 10))
    for got, want in zip(teacher.module.parameters(), ref):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_momentum_teacher_buffers_and_state_dict_round_trip():
    torch.manual_seed(1)
    student = Net()
    student.train()
    student(torch.randn(8, 7))  # moves BN running stats
    teacher = conmim.MomentumTeacher(student, total_steps=5)
    student(torch.randn(8, 7))
    teacher.update(student, 0)
    assert not torch.equal(teacher.module.bn.running_mean, student.bn.running_mean)  # buffers left alone
    copier = conmim.MomentumTeacher(student, total_steps=5, copy_buffers=True)
    copier.update(student, 0)
    assert torch.equal(copier.module.bn.running_mean, student.bn.running_mean)

    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    other = conmim.MomentumTeacher(Net(), total_steps=5)
    other.load_state_dict(state)
    for (k, v), p in zip(state.items(), other.state_dict().values()):
        assert torch.equal(v, p), k
    other.update(student, 1)
    teacher.update(student, 1)
    for a, b in zip(other.module.parameters(), teacher.module.parameters()):
        torch.testing.assert_close(a, b)


def test_momentum_teacher_errors():
    with pytest.raises(TypeError, match=r"student must be a torch\.nn\.Module"):
        conmim.MomentumTeacher("net")
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        conmim.MomentumTeacher(Net(), total_steps=0)
    teacher = conmim.MomentumTeacher(Net(), total_steps=3)
    with pytest.raises(ValueError, match="student has 2 parameters but the teacher has"):
        teacher.update(nn.Linear(7, 5), 0)
    with pytest.raises(ValueError, match="exactly one of step"):
        teacher.update(Net())


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here (no GPU, no interpreter)")
def test_triton_ema_address_tables_under_graph_capture(monkeypatch):
    from collections import OrderedDict

    from conmim.kernels import ema as kema

    monkeypatch.setattr(kema, "_tables", OrderedDict())
    monkeypatch.setattr(kema, "_pinned", set())
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t = [torch.zeros(5, device=dev), torch.zeros(4097, device=dev)]
    s = [torch.ones(5, device=dev), torch.ones(4097, device=dev)]
    capture = {"on": True}
    monkeypatch.setattr(kema, "_capturing", lambda device: capture["on"])
    with pytest.raises(RuntimeError, match="warm-up"):  # no table yet: building one inside capture is refused
        kema.ema_update_(t, s, 0.5)
    capture["on"] = False
    kema.ema_update_(t, s, 0.5)  # warm-up
    capture["on"] = True
    kema.ema_update_(t, s, 0.5)  # "captured": the table is pinned
    (key,) = kema._pinned
    capture["on"] = False
    keep = [([torch.zeros(3, device=dev)], [torch.ones(3, device=dev)]) for _ in range(kema._MAX_TABLES + 4)]
    for tt, ss in keep:
        kema.ema_update_(tt, ss, 0.5)
    assert key in kema._tables, "a table a captured graph reads was evicted"
    assert len(kema._tables) == kema._MAX_TABLES
    for x in t:
        torch.testing.assert_close(x, torch.full_like(x, 0.75))
    for tt, _ in keep:
        torch.testing.assert_close(tt[0], torch.full_like(tt[0], 0.5))


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here (no GPU, no interpreter)")
@pytest.mark.parametrize("offset", [0, 1, 3], ids=lambda o: f"offset{o}")
@pytest.mark.parametrize(
    "t_dtype,s_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)]
)
def test_triton_ema_full_and_partial_chunks_aligned_or_not(offset, t_dtype, s_dtype):
    """Base addresses off 16 bytes (offset elements into a buffer) take the unhinted path; numel past a chunk
    boundary exercises the full (unmasked) and the tail (masked) chunk."""
    from conmim.kernels import ema as kema

    g = torch.Generator().manual_seed(offset)
    n = kema.BLOCK + 37
    t_buf, s_buf = torch.randn(n + offset, generator=g), torch.randn(n + offset, generator=g)
    teacher, student = [t_buf.to(t_dtype)[offset:]], [s_buf.to(s_dtype)[offset:]]
    want = [teacher[0].clone()]
    kema.ema_update_(teacher, student, 0.9)
    ema_update_reference_(want, student, 0.9)
    assert kema._tables[next(reversed(kema._tables))][-1] == (offset == 0)
    torch.testing.assert_close(teacher[0].float(), want[0].float(), atol=_tol(t_dtype), rtol=_tol(t_dtype))
