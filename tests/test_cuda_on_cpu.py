"""The CUDA kernels of csrc/cuda executed on the CPU (tests/cuda_on_cpu: blocks in turn, the threads of a block as
fibers with real barriers, warp shuffles among 32 lanes, exact WMMA tile products, checked subscripts), reached
through the same launchers as on a GPU (conmim.native -> conmim._C bindings -> csrc/cuda host code), against the
float64 reference. What this proves and what it cannot: README, "The CUDA kernels on the CPU"."""

import shutil

import pytest
import torch

from conmim import _ext, native
from conmim.reference import ema_update_reference_
from tests.cuda_on_cpu import build
from tests.native_cases import (
    LOW,
    SATURATION,
    assert_case_within_rule,
    assert_close_to,
    inputs,
    loss_tol_dtype,
    pair_id,
    reference,
    saturation_case,
)
from tests.test_patch_contrast import MASKS, make_mask

pytestmark = pytest.mark.skipif(build.why_unavailable() is not None, reason=str(build.why_unavailable()))

ORDERS = ["forward", "reverse", "shuffle:7", "warps"]
LOW_PAIRS = [(s, t) for s in LOW for t in LOW]


@pytest.fixture(scope="session")
def cuda_cpu_module():
    return build.load(build.build())


def _poisoned(factory):
    def make(*args, **kw):
        out = factory(*args, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    return make


@pytest.fixture
def on_cpu(cuda_cpu_module, monkeypatch):
    """conmim.native's launchers reach the CPU execution of the CUDA kernels; every float output they allocate
    starts as NaN, so an element a kernel leaves unwritten fails the comparison."""
    monkeypatch.setattr(_ext, "_C", cuda_cpu_module)
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))

    def use(order="forward", module=cuda_cpu_module):
        monkeypatch.setenv("CONMIM_CUDA_ON_CPU_ORDER", order)
        monkeypatch.setattr(_ext, "_C", module)

    return use


def check_loss(s, t, mask, pos=None, temperature=0.1, normalize=True, need_teacher=True, seed=0):
    """The CUDA launchers' forward and backward against the float64 reference; each output in its dtype."""
    grad = torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed))
    loss, lse = native.patch_contrast_forward_cuda(s, t, mask, pos, temperature, normalize)
    ds, dt = native.patch_contrast_backward_cuda(
        grad, s, t, mask, pos, lse, temperature, normalize, need_teacher
    )
    want_loss, want_ds, want_dt = reference(s, t, mask, pos, temperature, normalize, grad)
    pair = (s.dtype, t.dtype)
    assert loss.dtype == lse.dtype == torch.float32 and ds.dtype == s.dtype
    assert_close_to(loss, want_loss, loss_tol_dtype(pair), "loss", "loss")
    assert_close_to(ds, want_ds, s.dtype, "grad", "d_student")
    if need_teacher:
        assert dt.dtype == t.dtype
        assert_close_to(dt, want_dt, t.dtype, "grad", "d_teacher")
    else:
        assert dt is None


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("pair", LOW_PAIRS, ids=pair_id)
def test_loss_every_dtype_pair_and_mask(on_cpu, pair, kind):
    # N = 37: a full key tile and a tail of 5; d = 24: not a multiple of 16 or of the 32-wide feature chunk.
    on_cpu(ORDERS[(LOW_PAIRS.index(pair) + MASKS.index(kind)) % len(ORDERS)])
    s, t, _, _ = inputs(3, 37, 24, pair, seed=LOW_PAIRS.index(pair))
    check_loss(s, t, make_mask(kind, 3, 37, seed=1))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    "B,N,D",
    [(2, 7, 5), (2, 32, 32), (1, 64, 16), (2, 70, 100)],
    ids=lambda v: str(v),
)
def test_loss_shapes_and_orders(on_cpu, order, B, N, D):
    # Exactly one tile, two full tiles, and three tiles with a tail over a 4-chunk feature dim with a tail.
    on_cpu(order)
    s, t, _, _ = inputs(B, N, D, (torch.bfloat16, torch.bfloat16), seed=N)
    check_loss(s, t, make_mask("ragged", B, N, seed=D))


@pytest.mark.parametrize(
    "pair", [(torch.float32, torch.float32), (torch.float16, torch.bfloat16)], ids=pair_id
)
@pytest.mark.parametrize("need_teacher", [True, False], ids=["teacher-grad", "student-only"])
def test_loss_positive_index_strides_unnormalized(on_cpu, pair, need_teacher):
    on_cpu("shuffle:3")
    s, t, _, pos = inputs(3, 41, 20, pair, seed=2, positive=True)
    s = s.transpose(1, 2).contiguous().transpose(1, 2)  # feature stride != 1
    t = t[:1].expand(3, 41, 20)  # stride-0 batch dimension
    check_loss(s, t, make_mask("ragged", 3, 41, seed=4), pos=pos, need_teacher=need_teacher)
    check_loss(
        s, t, make_mask("full", 3, 41), pos=pos, temperature=0.5, normalize=False, need_teacher=need_teacher
    )


@pytest.mark.parametrize("layout", ["row-padded", "misaligned"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_loss_feature_slices(on_cpu, dtype, layout):
    # Features sliced out of wider rows. row-padded: rows start 16-byte aligned, so the forward stages them with
    # cp.async, and d = 22 ends inside a 16-byte copy (zero-filled past d). misaligned: rows start one element
    # past a 16-byte boundary, so the forward falls back to plain loads.
    on_cpu("shuffle:11")
    s, t, _, _ = inputs(2, 45, 24, (dtype, dtype), seed=6)
    cut = slice(0, 22) if layout == "row-padded" else slice(1, 24)
    check_loss(s[..., cut], t[..., cut], make_mask("ragged", 2, 45, seed=8))


@pytest.mark.parametrize("t_dtype", LOW, ids=str)
@pytest.mark.parametrize("s_dtype", LOW, ids=str)
def test_ema_odd_sizes_and_dtype_pairs(on_cpu, t_dtype, s_dtype):
    on_cpu("reverse")
    g = torch.Generator().manual_seed(0)
    sizes = [(1,), (7,), (8193,), (3, 5, 7), (0,), (20001,)]
    teacher = [torch.randn(n, generator=g).to(t_dtype) for n in sizes]
    student = [torch.randn(n, generator=g).to(s_dtype) for n in sizes]
    teacher.append(torch.randn(1001, generator=g).to(t_dtype)[1:])  # misaligned: the scalar path
    student.append(torch.randn(1000, generator=g).to(s_dtype))
    want = [t.clone() for t in teacher]
    native.ema_update_cuda_(teacher, student, 0.9)
    ema_update_reference_(want, student, 0.9)
    native.ema_update_cuda_(teacher, student, torch.tensor(0.3))  # momentum read through its pointer
    ema_update_reference_(want, student, 0.3)
    tol = 2e-6 if t_dtype == torch.float32 else 1e-2
    for got, ref in zip(teacher, want):
        torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------- the executor catches bugs
MUTANTS = {
    # logits_tile (backward): the barrier between loading a feature chunk and reading it
    "missing-barrier": (
        "    __syncthreads();\n    chunk_product<T>(sh, &sh.q[0][0]",
        "    chunk_product<T>(sh, &sh.q[0][0]",
    ),
    # fwd_kernel: the wait for the cp.async copies of the chunk about to be read
    "missing-wait": (
        "        __pipeline_wait_prior(1);  ",
        "        // __pipeline_wait_prior(1);  ",
    ),
    # fwd_kernel: the barrier after every thread's wait, before reading chunks other threads copied
    "missing-barrier-after-wait": (
        "        __syncthreads();                             // and every thread's",
        "        // and every thread's",
    ),
    # copy16_ok: cp.async allowed whatever the alignment
    "copy16-unchecked": (
        "  return stride[2] == 1 && ptr % kCopyBytes == 0 && stride[0] % kVec == 0 && stride[1] % kVec == 0;",
        "  return true;",
    ),
    # query_rows: one row past the block's kTile rows of shared memory
    "bound-off-by-one": (
        "  if (threadIdx.x < kTile) {\n    const int m = m0 + threadIdx.x;",
        "  if (threadIdx.x <= kTile) {\n    const int m = m0 + threadIdx.x;",
    ),
}


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    built = {}
    for name, (old, new) in MUTANTS.items():
        src = tmp_path_factory.mktemp(name) / "csrc"
        shutil.copytree(build.ROOT / "csrc", src)
        cu = src / "cuda" / "patch_contrast.cu"
        text = cu.read_text()
        assert text.count(old) == 1, f"mutation {name} no longer matches csrc/cuda/patch_contrast.cu"
        cu.write_text(text.replace(old, new))
        built[name] = build.load(build.build(src))
    return built


@pytest.mark.parametrize("mutant", ["missing-barrier", "missing-wait", "missing-barrier-after-wait"])
def test_executor_catches_a_missing_barrier_or_wait(on_cpu, mutants, mutant):
    # bf16 with d = 24, contiguous: the forward stages its chunks with cp.async (16-byte aligned rows)
    s, t, _, _ = inputs(2, 37, 24, (torch.bfloat16, torch.bfloat16), seed=5)
    mask = make_mask("full", 2, 37)
    caught = []
    for order in ORDERS:
        on_cpu(order, mutants[mutant])
        try:
            check_loss(s, t, mask)
        except AssertionError:
            caught.append(order)
    assert caught, f"a kernel with {mutant} passed under every order"
    on_cpu("forward")
    check_loss(s, t, mask)  # the unmodified kernels pass the same check


def test_executor_catches_an_index_off_by_one(on_cpu, mutants):
    on_cpu("forward", mutants["bound-off-by-one"])
    s, t, _, _ = inputs(2, 37, 24, (torch.bfloat16, torch.bfloat16), seed=5)
    with pytest.raises(RuntimeError, match=r"out-of-bounds subscript 32 at .*patch_contrast.cu"):
        native.patch_contrast_forward_cuda(s, t, make_mask("ragged", 2, 37), None, 0.1, True)


def test_executor_catches_a_misaligned_copy(on_cpu, mutants):
    on_cpu("forward", mutants["copy16-unchecked"])
    s, t, _, _ = inputs(2, 37, 25, (torch.bfloat16, torch.bfloat16), seed=5)
    s, t = s[..., 1:], t[..., 1:]  # rows start 2 bytes past a 16-byte boundary
    with pytest.raises(RuntimeError, match=r"cp.async of 16 bytes .* aligned"):
        native.patch_contrast_forward_cuda(s, t, make_mask("ragged", 2, 37), None, 0.1, True)


@pytest.mark.parametrize("kind", SATURATION)
def test_loss_accuracy_with_large_logits_and_saturated_softmax(on_cpu, kind):
    on_cpu("forward")
    s, t, tau, normalize = saturation_case(kind)
    mask = make_mask("ragged", 2, 40, seed=2)
    grad = torch.randn(2, 40, generator=torch.Generator().manual_seed(3))
    loss, lse = native.patch_contrast_forward_cuda(s, t, mask, None, tau, normalize)
    ds, dt = native.patch_contrast_backward_cuda(grad, s, t, mask, None, lse, tau, normalize, True)
    assert_case_within_rule(s, t, mask, tau, normalize, grad, loss, ds, dt)
