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
# The executor's devices (tests/cuda_on_cpu/cuda_on_cpu.h) and the shared memory a block may opt in to on each.
SM90, SM86 = 0, 1
OPTIN_LIMIT = {SM90: 232448, SM86: 101376}


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

    def use(order="forward", module=cuda_cpu_module, device=SM90):
        monkeypatch.setenv("CONMIM_CUDA_ON_CPU_ORDER", order)
        monkeypatch.setenv("CONMIM_CUDA_ON_CPU_DEVICE", str(device))
        monkeypatch.setattr(_ext, "_C", module)

    return use


def check_forward(s, t, mask):
    loss, _ = native.patch_contrast_forward_cuda(s, t, mask, None, 0.1, True)
    want_loss, _, _ = reference(s, t, mask, None, 0.1, True, torch.zeros(mask.shape))
    assert_close_to(loss, want_loss, loss_tol_dtype((s.dtype, t.dtype)), "loss", "loss")


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


# Element offsets of the (teacher, student) views into their buffers. aligned: 16-byte vectors from the start.
# same-offset: both one element in, a scalar head until their common 16-byte boundary (7 elements for bf16/fp16,
# also with an fp32 partner), then vectors. apart: never 16-byte aligned together, scalar throughout.
EMA_LAYOUTS = {"aligned": (0, 0), "same-offset": (1, 1), "apart": (1, 2)}


@pytest.mark.parametrize("layout", EMA_LAYOUTS)
@pytest.mark.parametrize("t_dtype", LOW, ids=str)
@pytest.mark.parametrize("s_dtype", LOW, ids=str)
def test_ema_odd_sizes_dtype_pairs_and_alignments(on_cpu, t_dtype, s_dtype, layout):
    on_cpu("reverse")
    g = torch.Generator().manual_seed(0)
    t_off, s_off = EMA_LAYOUTS[layout]
    sizes = [1, 7, 8193, 105, 0, 20001]  # 8193, 20001: several blocks' chunks with a tail

    def view(n, dtype, off):
        return torch.randn(n + off, generator=g).to(dtype)[off:]

    teacher = [view(n, t_dtype, t_off) for n in sizes]
    student = [view(n, s_dtype, s_off) for n in sizes]
    want = [t.clone() for t in teacher]
    native.ema_update_cuda_(teacher, student, 0.9)
    ema_update_reference_(want, student, 0.9)
    native.ema_update_cuda_(teacher, student, torch.tensor(0.3))  # momentum read through its pointer
    ema_update_reference_(want, student, 0.3)
    tol = 2e-6 if t_dtype == torch.float32 else 1e-2
    for got, ref in zip(teacher, want):
        torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------- shared memory per device
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def plan(module, kernel, D, pair, device):
    tags = [_ext.DTYPE_TAGS[d] for d in pair]
    return module.cuda_smem_plan(getattr(module.LossKernel, kernel), D, *tags, OPTIN_LIMIT[device])


@pytest.mark.parametrize(
    "kernel,D,pair,device,resident,opt_in",
    [
        ("forward", 256, (BF16, BF16), SM90, True, False),  # 12 KB static + 16.5 KB of query rows
        ("forward", 1024, (BF16, BF16), SM86, True, True),  # 12 + 64.5 KB: past 48 KB, within 99 KB
        ("forward", 1024, (F32, F32), SM90, True, True),  # 17 + 129 KB
        ("forward", 1024, (F32, F32), SM86, False, False),  # 146 KB > 99 KB: streamed, 17 + 10 KB
        ("forward", 672, (F32, BF16), SM86, False, False),  # mixed pairs stage fp32: 17 + 85 KB > 99 KB
        ("forward", 640, (F16, BF16), SM86, True, True),  # 17 + 81 KB, just fits
        ("backward", 128, (BF16, BF16), SM90, True, False),  # 31.5 KB static + 16.5 KB accumulator
        ("backward", 480, (F32, F16), SM86, True, True),  # 36.5 + 60.5 KB
    ],
)
def test_smem_plan(cuda_cpu_module, kernel, D, pair, device, resident, opt_in):
    p = plan(cuda_cpu_module, kernel, D, pair, device)
    assert (p.q_resident, p.opt_in) == (resident, opt_in)
    assert p.static_bytes + p.dynamic_bytes <= OPTIN_LIMIT[device]
    assert p.opt_in == (p.static_bytes + p.dynamic_bytes > 48 * 1024)


@pytest.mark.parametrize("pair", [(BF16, BF16), (F32, F32), (F16, F32)], ids=pair_id)
def test_backward_that_does_not_fit_names_the_limit(cuda_cpu_module, on_cpu, pair):
    on_cpu("forward", device=SM86)
    with pytest.raises(
        RuntimeError, match=r"at most 101376 bytes of shared memory per block; the backward at d = 1024"
    ):
        plan(cuda_cpu_module, "backward", 1024, pair, SM86)
    s, t, _, _ = inputs(1, 9, 1024, pair, seed=1)
    mask = make_mask("full", 1, 9)
    _, lse = native.patch_contrast_forward_cuda(s, t, mask, None, 0.1, True)
    with pytest.raises(RuntimeError, match=r"at most 101376 bytes .* the backward at d = 1024 needs"):
        native.patch_contrast_backward_cuda(torch.ones(1, 9), s, t, mask, None, lse, 0.1, True, True)


# docs/usage.md's d limits of the CUDA backward on a 99 KB device: the 32 x (d + 4) fp32 accumulator beside the
# static tiles (staged chunks, the split G of the gradient products and two feature chunks of its other operand,
# as float for a pair with an fp32 side).
BACKWARD_LARGEST_D_SM86 = {
    (BF16, BF16): 512,
    (F16, F16): 512,
    (F32, F32): 480,
    (F32, BF16): 480,
    (F16, F32): 480,
}


@pytest.mark.parametrize("pair", BACKWARD_LARGEST_D_SM86, ids=pair_id)
def test_backward_largest_d_on_a_99kb_device(cuda_cpu_module, pair):
    largest = BACKWARD_LARGEST_D_SM86[pair]
    assert plan(cuda_cpu_module, "backward", largest, pair, SM86).opt_in
    with pytest.raises(
        RuntimeError, match=rf"at most 101376 bytes .* the backward at d = {largest + 1} needs"
    ):
        plan(cuda_cpu_module, "backward", largest + 1, pair, SM86)


@pytest.mark.parametrize("pair", [(F32, F32), (F32, BF16), (F16, F32), (F16, BF16)], ids=pair_id)
def test_forward_streams_the_query_rows_on_a_99kb_device(cuda_cpu_module, on_cpu, pair):
    # d = 672 (21 chunks): on the sm_86 model the fp32-staged query rows do not fit beside the static tiles, so
    # the forward streams them with the keys (cp.async for the fp32 operand, plain loads for a converted one).
    assert not plan(cuda_cpu_module, "forward", 672, pair, SM86).q_resident
    on_cpu("shuffle:5", device=SM86)
    s, t, _, _ = inputs(2, 37, 672, pair, seed=3)
    check_forward(s, t, make_mask("ragged", 2, 37, seed=2))


@pytest.mark.parametrize("device", [SM90, SM86], ids=["sm90", "sm86"])
def test_forward_opts_in_past_48kb(cuda_cpu_module, on_cpu, device):
    # bf16 at d = 1024: the resident query rows (64.5 KB) need the opt-in on both devices; the executor fails a
    # launch past 48 KB of dynamic shared memory without it.
    assert plan(cuda_cpu_module, "forward", 1024, (BF16, BF16), device).opt_in
    on_cpu("warps", device=device)
    s, t, _, _ = inputs(1, 33, 1024, (BF16, BF16), seed=4)
    check_forward(s, t, make_mask("ragged", 1, 33, seed=3))


# ------------------------------------------------------------------------------------- the executor catches bugs
PC, EMA = "patch_contrast.cu", "ema.cu"
MUTANTS = {
    # logits_tile (backward): the barrier between loading a feature chunk and reading it
    "missing-barrier": (
        PC,
        "    __syncthreads();\n    chunk_product<TS, TT>(sh, &sh.q[0][0]",
        "    chunk_product<TS, TT>(sh, &sh.q[0][0]",
    ),
    # fwd_kernel: the wait for the cp.async copies of the chunk about to be read
    "missing-wait": (
        PC,
        "        __pipeline_wait_prior(1);  ",
        "        // __pipeline_wait_prior(1);  ",
    ),
    # fwd_kernel: the barrier after every thread's wait, before reading chunks other threads copied
    "missing-barrier-after-wait": (
        PC,
        "        __syncthreads();                             // and every thread's",
        "        // and every thread's",
    ),
    # copy16_ok: cp.async allowed whatever the alignment
    "copy16-unchecked": (
        PC,
        "  return stride[2] == 1 && ptr % kCopyBytes == 0 && stride[0] % kVec == 0 && stride[1] % kVec == 0;",
        "  return true;",
    ),
    # query_rows: one row past the block's kTile rows of shared memory
    "bound-off-by-one": (
        PC,
        "  if (threadIdx.x < kTile) {\n    const int m = m0 + threadIdx.x;",
        "  if (threadIdx.x <= kTile) {\n    const int m = m0 + threadIdx.x;",
    ),
    # make: a pair with an fp32 side keeps its split (TF32) logits at large logits too
    "exact-logits-ungated": (
        PC,
        "  a.exact_logits = p.exact_logits;",
        "  a.exact_logits = false;",
    ),
    # ema_kernel: 16-byte vectors whatever the alignment
    "vector-alignment-unchecked": (
        EMA,
        "  const bool vec = head < n && (at + head * sizeof(TT)) % 16 == 0 && (as + head * sizeof(TS)) % 16 == 0;",
        "  const bool vec = head < n;",
    ),
}


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    built = {}
    for name, (file, old, new) in MUTANTS.items():
        src = tmp_path_factory.mktemp(name) / "csrc"
        shutil.copytree(build.ROOT / "csrc", src)
        cu = src / "cuda" / file
        text = cu.read_text()
        assert text.count(old) == 1, f"mutation {name} no longer matches csrc/cuda/{file}"
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


def test_executor_catches_a_misaligned_vector(on_cpu, mutants):
    on_cpu("forward", mutants["vector-alignment-unchecked"])
    g = torch.Generator().manual_seed(0)
    teacher, student = [torch.randn(101, generator=g)[1:]], [torch.randn(102, generator=g)[2:]]
    with pytest.raises(RuntimeError, match=r"16-byte vector access .* not 16-byte aligned"):
        native.ema_update_cuda_(teacher, student, 0.9)


FP32_SIDES = [(F32, F32), (F32, BF16), (BF16, F32), (F32, F16), (F16, F32)]


@pytest.mark.parametrize("pair", FP32_SIDES, ids=pair_id)
@pytest.mark.parametrize("kind", SATURATION)
def test_loss_accuracy_with_large_logits_and_saturated_softmax(on_cpu, kind, pair):
    """Every pair with an fp32 side (its logits on 3xTF32 or 2xTF32 MMA where tau >= 0.05 with normalized rows,
    else on fp32 FMA): the loss and each fp32 side's gradient within DESIGN.md's rule."""
    on_cpu("forward")
    check_saturation_case(kind, pair)


def check_saturation_case(kind, pair):
    s, t, tau, normalize = saturation_case(kind, pair)
    mask = make_mask("ragged", 2, 40, seed=2)
    grad = torch.randn(2, 40, generator=torch.Generator().manual_seed(3))
    loss, lse = native.patch_contrast_forward_cuda(s, t, mask, None, tau, normalize)
    ds, dt = native.patch_contrast_backward_cuda(grad, s, t, mask, None, lse, tau, normalize, True)
    assert_case_within_rule(s, t, mask, tau, normalize, grad, loss, ds, dt)


def test_large_logits_need_fp32_fma_logits(on_cpu, mutants):
    """The gate at csrc/cuda's Mma matters: with split logits at tau = 1e-3, an fp32 pair's d(student) breaks
    DESIGN.md's rule (the same case passes above with the gate)."""
    on_cpu("forward", mutants["exact-logits-ungated"])
    with pytest.raises(AssertionError, match="d_student: error"):
        check_saturation_case("tau=1e-3", (F32, F32))


@pytest.mark.parametrize("pair", FP32_SIDES, ids=pair_id)
def test_fp32_sides_keep_fp32_precision(on_cpu, pair):
    """A 16-bit value is exact in TF32 and each fp32 side is split into TF32 high and low parts (3xTF32 in an fp32
    pair: A_hi B_hi + A_lo B_hi + A_hi B_lo, its logits too at tau = 0.1), so the loss and every
    fp32 side's gradient carry fp32-level error (a TF32-only product, without the low parts, is ~1e-4 off and fails
    here): tolerances of float32, not of a 16-bit side."""
    on_cpu()
    s, t, _, _ = inputs(2, 37, 40, pair, seed=5)
    mask = make_mask("ragged", 2, 37, seed=2)
    grad = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3))
    loss, lse = native.patch_contrast_forward_cuda(s, t, mask, None, 0.1, True)
    ds, dt = native.patch_contrast_backward_cuda(grad, s, t, mask, None, lse, 0.1, True, True)
    want_loss, want_ds, want_dt = reference(s, t, mask, None, 0.1, True, grad)
    assert_close_to(loss, want_loss, F32, "loss", "loss")
    for what, got, want in [("d_student", ds, want_ds), ("d_teacher", dt, want_dt)]:
        if got.dtype == F32:  # the gradient of an fp32 side
            assert_close_to(got, want, F32, "grad", what)
