"""Fused patch-contrast loss: every backend that runs here against the reference, forward and gradients."""

import subprocess
import sys
import textwrap

import pytest
import torch

import conmim
from conmim import backends
from conmim.ops import patch_contrast_op
from conmim.reference import patch_contrast_loss_reference
from tests.conftest import TOL, assert_within_rule, triton_runs_here

MASKS = ("empty", "one", "ragged", "full")


def make_mask(kind, B, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "empty":
        return torch.zeros(B, N, dtype=torch.bool)
    if kind == "full":
        return torch.ones(B, N, dtype=torch.bool)
    if kind == "one":
        m = torch.zeros(B, N, dtype=torch.bool)
        m[0, N // 2] = True
        return m
    m = torch.rand(B, N, generator=g) < torch.rand(B, 1, generator=g)  # a different ratio per image
    m[0] = False  # one image with nothing masked
    if B > 2:
        m[-1] = True  # one image fully masked
    if N > 1:  # every other image partly masked, whatever its random ratio (it may draw 0 or N)
        for b in range(1, B - 1 if B > 2 else B):
            m[b, b % N] = True
            m[b, (b + 1) % N] = False
    return m


def make_inputs(B, N, d, dtype, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, d, generator=g)
    t = torch.randn(B, N, d, generator=g)
    if layout == "transposed":  # feature stride != 1
        s = s.transpose(1, 2).contiguous().transpose(1, 2)
        t = t.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "sliced":  # a view into wider storage
        s = torch.randn(B, N, 2 * d + 3, generator=g)[..., 3 : d + 3]
        t = torch.randn(B, N + 4, d, generator=g)[:, 2 : N + 2]
    elif layout == "expanded":  # stride-0 batch dimension
        s = s[:1].expand(B, N, d)
        t = t[:1].expand(B, N, d)
    return s.to(dtype), t.to(dtype)


def loss_and_grads(
    backend, s, t, mask, reduction="none", pos=None, teacher_grad=True, temperature=0.1, normalize=True
):
    # reduction "none" by default: each masked row gets its own random cotangent, so gradients are O(1 / tau)
    # and a wrong or unwritten tile shows; under "mean" over many rows they fall below the bf16 tolerance floor.
    s = s.detach().requires_grad_(True)
    t = t.detach().requires_grad_(teacher_grad)
    if backend == "oracle":
        loss = patch_contrast_loss_reference(
            s.float(), t.float(), mask, temperature, reduction, normalize, positive_index=pos
        )
    else:
        loss = conmim.patch_contrast_loss(
            s, t, mask, temperature, reduction, normalize, positive_index=pos, backend=backend
        )
    g = (
        torch.randn(loss.shape, generator=torch.Generator().manual_seed(9))
        if loss.dim()
        else torch.tensor(1.0)
    )
    inputs = [s, t] if teacher_grad else [s]
    grads = torch.autograd.grad(loss, inputs, g.to(loss.device, loss.dtype), allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads)]
    return loss.detach(), grads


def assert_matches(backend, s, t, mask, dtype, **kw):
    loss, grads = loss_and_grads(backend, s, t, mask, **kw)
    ref_loss, ref_grads = loss_and_grads("oracle", s, t, mask, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(loss).all()
    atol, rtol = TOL[dtype]["loss"]
    torch.testing.assert_close(loss, ref_loss.to(loss.dtype), atol=atol, rtol=rtol)
    gatol, grtol = TOL[dtype]["grad"]
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype and got.shape == want.shape
        err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
        scale = want.double().abs().max().item() if want.numel() else 0.0
        assert err <= gatol + grtol * scale, f"{backend}: gradient error {err:.3g} at scale {scale:.3g}"


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ------------------------------------------------------------------------------------------------- CPU backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [16, 256, 768])
@pytest.mark.parametrize("N", [7, 196, 197, 1000])
def test_cpu_backend_grid(N, d, dtype):
    B = 3 if N < 1000 else 2
    s, t = make_inputs(B, N, d, dtype, seed=N + d)
    for kind in MASKS:
        assert_matches("cpu", s, t, make_mask(kind, B, N, seed=N), dtype)


@pytest.mark.parametrize("d", [300, 1000, 1024])
def test_cpu_backend_large_and_ragged_feature_dims(d):
    # Feature dims that are not a multiple of the packing block (16) or of the vector width, and d = 1024.
    s, t = make_inputs(2, 37, d, torch.float32, seed=d)
    for kind in MASKS:
        assert_matches("cpu", s, t, make_mask(kind, 2, 37, seed=d), torch.float32)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_backend_strided_inputs(layout, dtype):
    s, t = make_inputs(3, 37, 24, dtype, seed=1, layout=layout)
    mask = make_mask("ragged", 3, 37).t().contiguous().t()  # a non-contiguous mask too
    assert not mask.is_contiguous()
    assert_matches("cpu", s, t, mask, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cpu_backend_reductions_positive_index_and_no_teacher_grad(reduction):
    s, t = make_inputs(3, 50, 32, torch.float32, seed=2)
    mask = make_mask("ragged", 3, 50)
    pos = torch.randint(0, 50, (3, 50), generator=torch.Generator().manual_seed(3))
    assert_matches("cpu", s, t, mask, torch.float32, reduction=reduction, pos=pos)
    assert_matches(
        "cpu", s, t, mask, torch.float32, reduction=reduction, teacher_grad=False, temperature=0.07
    )


def test_cpu_backend_gradcheck_float64():
    s, t = make_inputs(3, 9, 5, torch.float64, seed=4)
    mask = make_mask("ragged", 3, 9, seed=3)
    pos = torch.randint(0, 9, (3, 9), generator=torch.Generator().manual_seed(5))
    s.requires_grad_(True)
    t.requires_grad_(True)
    for kw in (dict(), dict(positive_index=pos), dict(normalize=False, reduction="sum")):
        assert torch.autograd.gradcheck(
            lambda a, b, kw=kw: conmim.patch_contrast_loss(a, b, mask, 0.1, backend="cpu", **kw), (s, t)
        )


def test_empty_batch_mask_gives_zero_loss_and_gradients():
    s, t = make_inputs(2, 7, 16, torch.float32)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    for backend in ("cpu", "reference"):
        loss, (gs, gt) = loss_and_grads(backend, s, t, mask, reduction="mean")
        assert loss.item() == 0.0
        assert torch.equal(gs, torch.zeros_like(gs)) and torch.equal(gt, torch.zeros_like(gt))


def test_outputs_fully_written(monkeypatch):
    """Poison every fresh allocation with NaN: any element a kernel forgets to write shows up."""
    s, t = make_inputs(3, 41, 24, torch.float32, seed=6)
    mask = make_mask("ragged", 3, 41)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned_empty(*a, **k):
        return real_empty(*a, **k).fill_(float("nan"))

    def poisoned_empty_like(*a, **k):
        return real_empty_like(*a, **k).fill_(float("nan"))

    want_loss, want_grads = loss_and_grads("reference", s, t, mask, reduction="none")
    backends_here = ["cpu"] + (["triton"] if triton_runs_here() else [])
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", poisoned_empty_like)
    for backend in backends_here:
        rows, lse = patch_contrast_op(s, t, mask, None, 0.1, True, backend)
        assert torch.isfinite(rows).all() and torch.isfinite(lse).all()
        assert (rows[~mask] == 0).all() and (lse[~mask] == 0).all()
        loss, grads = loss_and_grads(backend, s, t, mask, reduction="none")
        torch.testing.assert_close(loss, want_loss, atol=2e-5, rtol=2e-5)
        for g, w in zip(grads, want_grads):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, w, atol=2e-6, rtol=2e-4)


# ---------------------------------------------------------------------------------------------- Triton backend
triton_only = pytest.mark.skipif(
    not triton_runs_here(), reason="Triton cannot run here (no GPU, no interpreter)"
)


@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,d", [(7, 16), (37, 24), (70, 40)])
def test_triton_backend(N, d, dtype):
    s, t = make_inputs(3, N, d, dtype, seed=N)
    for kind in MASKS:
        assert_matches("triton", s, t, make_mask(kind, 3, N, seed=d), dtype)


@triton_only
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_triton_backend_strided_inputs(layout):
    s, t = make_inputs(3, 21, 16, torch.float32, seed=7, layout=layout)
    mask = make_mask("ragged", 3, 21).t().contiguous().t()
    assert_matches("triton", s, t, mask, torch.float32)


@triton_only
def test_triton_backend_positive_index_normalize_off_and_student_only():
    s, t = make_inputs(2, 19, 16, torch.float32, seed=8)
    mask = make_mask("ragged", 2, 19)
    pos = torch.randint(0, 19, (2, 19), generator=torch.Generator().manual_seed(1))
    assert_matches("triton", s, t, mask, torch.float32, pos=pos, reduction="sum")
    assert_matches("triton", s, t, mask, torch.float32, teacher_grad=False)
    sn = torch.nn.functional.normalize(s, dim=-1)
    tn = torch.nn.functional.normalize(t, dim=-1)
    a = conmim.patch_contrast_loss(sn, tn, mask, normalize=False, backend="triton")
    b = patch_contrast_loss_reference(sn, tn, mask)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["plain", "positive_index", "normalize_off"])
def test_triton_backend_feature_chunks(dtype, variant):
    """d = 100 under the interpreter is four chunks of 32 columns, the last one 4 wide: the products sum over
    the chunks, the norms and the normalisation's projection cover the full rows, and each backward program
    writes one chunk of the gradient."""
    from conmim.kernels import interpreting
    from conmim.kernels.patch_contrast import launch_meta

    if interpreting():  # a GPU takes d = 100 in one chunk of 128
        for kernel in ("fwd", "bwd_q", "bwd_k"):
            assert launch_meta(kernel, dtype, dtype, 100, False, True, temperature=0.1)[0]["D_CHUNKS"] == 4
    N = 23
    s, t = make_inputs(2, N, 100, dtype, seed=11)
    if variant == "normalize_off":  # unit rows keep the logits O(1 / tau)
        s, t = (torch.nn.functional.normalize(x.float(), dim=-1).to(dtype) for x in (s, t))
    pos = torch.randint(0, N, (2, N), generator=torch.Generator().manual_seed(3))
    kw = dict(pos=pos if variant == "positive_index" else None, normalize=variant != "normalize_off")
    for kind in ("ragged", "full"):
        assert_matches("triton", s, t, make_mask(kind, 2, N, seed=5), dtype, **kw)


@pytest.mark.parametrize(
    ("dtypes", "N", "d", "first"),
    [
        ((torch.bfloat16, torch.bfloat16), 196, 256, "bwd_q"),  # two chunks: recomputing is cheaper
        ((torch.bfloat16, torch.bfloat16), 196, 768, "bwd_w"),
        ((torch.bfloat16, torch.bfloat16), 784, 768, "bwd_q"),  # w (4 N per row) would outgrow the features
        ((torch.bfloat16, torch.bfloat16), 784, 2048, "bwd_w"),
        ((torch.float32, torch.float32), 196, 256, "bwd_w"),
        ((torch.float32, torch.float32), 784, 256, "bwd_q"),
        ((torch.bfloat16, torch.float32), 400, 768, "bwd_q"),  # the narrower input's item size counts
        ((torch.bfloat16, torch.float32), 384, 768, "bwd_w"),
    ],
)
def test_stored_backward_only_where_it_is_no_larger_than_the_features(dtypes, N, d, first):
    from conmim.kernels import patch_contrast as kpc

    kernels = kpc.backward_kernels(*dtypes, N, d, True, interpret=False)
    assert kernels[0] == first
    assert kernels[1:] == (("bwd_wq", "bwd_wk") if first == "bwd_w" else ("bwd_k",))


@triton_only
@pytest.mark.parametrize("kernels", ["recompute", "stored"])
@pytest.mark.parametrize("variant", ["plain", "positive_index", "normalize_off", "student_only"])
@pytest.mark.parametrize("kind", MASKS)
def test_triton_backward_recomputed_or_stored(kernels, variant, kind):
    """Both backwards, forced on the same inputs, against float64 autograd: bwd_q / bwd_k recompute the logits
    for each gradient chunk; bwd_w stores their gradient (work-order rows, the positive's entry from the sum of
    the negatives), bwd_wq / bwd_wk multiply it into each chunk and finish the normalisation from bwd_w's norms
    and projections (the keys' from per-program column sums and the positives' terms). backward_kernels picks
    the stored one at d = 100 under the interpreter (four chunks of 32), so the loss tests cover it too."""
    from conmim.kernels import interpreting
    from conmim.kernels import patch_contrast as kpc

    B, N, d, tau = 3, 23, 100, 0.1
    if interpreting():
        assert kpc.backward_kernels(torch.float32, torch.float32, N, d, True)[0] == "bwd_w"
    s, t = make_inputs(B, N, d, torch.float32, seed=13)
    normalize = variant != "normalize_off"
    if not normalize:  # unit rows keep the logits O(1 / tau)
        s, t = torch.nn.functional.normalize(s, dim=-1), torch.nn.functional.normalize(t, dim=-1)
    mask = make_mask(kind, B, N, seed=6)
    pos = torch.randint(0, N, (B, N), generator=torch.Generator().manual_seed(2))
    pos = pos if variant == "positive_index" else None
    need_teacher = variant != "student_only"
    grad = torch.randn(B, N, generator=torch.Generator().manual_seed(5))
    _, lse = kpc.patch_contrast_forward(s, t, mask, pos, tau, normalize)
    plan = ("bwd_q", "bwd_k") if kernels == "recompute" else ("bwd_w", "bwd_wq", "bwd_wk")
    ds, dt = kpc.patch_contrast_backward(
        grad, s, t, mask, pos, lse, tau, normalize, need_teacher, kernels=plan if need_teacher else plan[:-1]
    )
    s64, t64 = s.double().requires_grad_(True), t.double().requires_grad_(True)
    ref = patch_contrast_loss_reference(s64, t64, mask, tau, "none", normalize, positive_index=pos)
    want = torch.autograd.grad(ref, [s64, t64], grad.double()[mask], allow_unused=True)
    want = [torch.zeros_like(x) if w is None else w for x, w in zip((s64, t64), want)]
    gatol, grtol = TOL[torch.float32]["grad"]
    for got, ref_grad in zip((ds, dt) if need_teacher else (ds,), want):
        err = (got.double() - ref_grad).abs().max().item()
        assert err <= gatol + grtol * ref_grad.abs().max().item(), f"gradient error {err:.3g}"
    assert (dt is None) == (not need_teacher)


def _grads(fn, s, t, mask, tau, cast):
    """Gradients of sum(w * per-row loss) w.r.t. (student, teacher) for inputs cast by ``cast``."""
    s_, t_ = cast(s).detach().requires_grad_(True), cast(t).detach().requires_grad_(True)
    loss = fn(s_, t_, mask, tau, "none")
    w = torch.rand(loss.shape, generator=torch.Generator().manual_seed(4)).to(loss.dtype)
    return [x.double() for x in torch.autograd.grad(loss, [s_, t_], w)]


def _triton_loss(s, t, mask, tau, reduction):
    return conmim.patch_contrast_loss(s, t, mask, tau, reduction, backend="triton")


@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tau", [0.05, 0.1])
def test_triton_gradients_stay_accurate_when_the_softmax_saturates(dtype, tau):
    """A teacher correlated with the student puts p_pos within ~1e-5 of 1. DESIGN.md's rule: the fused error
    against float64 is at most 2x the plain torch computation's (same inputs, same dtype) plus a small floor.
    Plain fp32 torch loses digits here too (p - 1 from a p rounded near 1: ~5e-4 relative at tau = 0.05), so
    the fused result must also stay within 1e-5 of the gradient's scale (1 - p_pos from the negatives)."""
    g = torch.Generator().manual_seed(21)
    s = torch.randn(3, 41, 24, generator=g)
    t = (s + 0.05 * torch.randn(s.shape, generator=g)).to(dtype)
    s = s.to(dtype)
    mask = make_mask("ragged", 3, 41, seed=2)
    exact = _grads(patch_contrast_loss_reference, s, t, mask, tau, torch.Tensor.double)
    plain = _grads(patch_contrast_loss_reference, s, t, mask, tau, lambda x: x)
    fused = _grads(_triton_loss, s, t, mask, tau, lambda x: x)
    for name, e, p, f in zip(("student", "teacher"), exact, plain, fused):
        scale = e.abs().max().item()
        assert_within_rule(f"d({name})", f, p, e, floor=4 * torch.finfo(dtype).eps * scale, cap=1e-5 * scale)


MIXED = [(a, b) for a in DTYPES for b in DTYPES if a != b]


@triton_only
@pytest.mark.parametrize("s_dtype,t_dtype", MIXED, ids=str)
def test_triton_entry_points_accept_mixed_dtypes(s_dtype, t_dtype):
    """The backend reads student and teacher each in its own dtype and writes each gradient in its input's
    dtype; values match the float64 reference within the tolerance of the lower-precision input."""
    from conmim.kernels import patch_contrast as kpc

    B, N, d, tau = 3, 37, 24, 0.1
    s, _ = make_inputs(B, N, d, s_dtype, seed=11)
    _, t = make_inputs(B, N, d, t_dtype, seed=12)
    mask = make_mask("ragged", B, N, seed=3)
    grad = torch.randn(B, N, generator=torch.Generator().manual_seed(5))
    loss, lse = kpc.patch_contrast_forward(s, t, mask, None, tau, True)
    ds, dt = kpc.patch_contrast_backward(grad, s, t, mask, None, lse, tau, True, True)
    s64, t64 = s.double().requires_grad_(True), t.double().requires_grad_(True)
    ref = patch_contrast_loss_reference(s64, t64, mask, tau, "none")
    ref_ds, ref_dt = torch.autograd.grad(ref, [s64, t64], grad.double()[mask])
    worst = max((s_dtype, t_dtype), key=lambda dt_: TOL[dt_]["grad"][1])
    atol, rtol = TOL[worst]["loss"]
    assert loss.dtype == torch.float32 and bool((loss[~mask] == 0).all())
    torch.testing.assert_close(loss[mask].double(), ref, atol=atol, rtol=rtol)
    gatol, grtol = TOL[worst]["grad"]
    for got, want, dtype in ((ds, ref_ds, s_dtype), (dt, ref_dt, t_dtype)):
        assert got.dtype == dtype
        err = (got.double() - want).abs().max().item()
        assert err <= gatol + grtol * want.abs().max().item(), f"gradient error {err:.3g}"


# ------------------------------------------------------------------------------- op registration and dispatch
def test_opcheck_patch_contrast():
    s, t = make_inputs(2, 11, 16, torch.float32, seed=3)
    mask = make_mask("ragged", 2, 11, seed=1)
    mask[1, 2] = True
    for backend in ("cpu", "reference"):
        args = (s.requires_grad_(True), t.requires_grad_(True), mask, None, 0.1, True, backend)
        torch.library.opcheck(torch.ops.conmim.patch_contrast.default, args)
        s2, t2 = s.detach(), t.detach()
        _, lse = patch_contrast_op(s2, t2, mask, None, 0.1, True, backend)
        bargs = (torch.randn(2, 11), s2, t2, mask, None, lse, 0.1, True, True, backend)
        torch.library.opcheck(torch.ops.conmim.patch_contrast_backward.default, bargs)


def test_torch_compile_fullgraph_no_graph_break():
    s, t = make_inputs(2, 23, 16, torch.float32, seed=2)
    mask = make_mask("ragged", 2, 23)
    loss_fn = conmim.FusedPatchContrastLoss(backend="cpu")

    def step(a, b, m):
        return loss_fn(a * 2.0, b, m)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = s.clone().requires_grad_(True)
    out = compiled(a, t, mask)
    out.backward()
    a_ref = s.clone().requires_grad_(True)
    ref = step(a_ref, t, mask)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(a.grad, a_ref.grad)


def test_auto_picks_cpu_kernel_and_env_override(monkeypatch):
    s, t = make_inputs(2, 9, 16, torch.float32)
    mask = make_mask("full", 2, 9)
    from conmim.ops import patch_contrast_reasons

    assert backends.choose("x", "auto", patch_contrast_reasons(s), {"student": s}) == "cpu"
    monkeypatch.setenv("CONMIM_BACKEND", "reference")
    assert backends.requested_backend("auto") == "reference"
    monkeypatch.setenv("CONMIM_BACKEND", "fastest")
    with pytest.raises(ValueError, match="CONMIM_BACKEND must be one of"):
        conmim.patch_contrast_loss(s, t, mask)


@pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here (no GPU, no interpreter)")
def test_gpu_size_limits_are_reasons_not_launch_failures():
    from conmim.ops import MAX_GPU_BATCH, patch_contrast_reasons

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    big = torch.empty(MAX_GPU_BATCH + 1, 2, 4, device=dev)
    assert str(MAX_GPU_BATCH) in patch_contrast_reasons(big)["triton"]()[0].text
    assert patch_contrast_reasons(big[:MAX_GPU_BATCH])["triton"]() == ()
    wide = torch.empty(1, 2, 2048, device=dev)
    # fp32 tiles at d = 2048 overflow shared memory, also when only one operand is fp32
    assert "1024" in patch_contrast_reasons(wide)["triton"]()[0].text
    assert "1024" in patch_contrast_reasons(wide.bfloat16(), wide)["triton"]()[0].text
    assert patch_contrast_reasons(wide.bfloat16())["triton"]() == ()
    assert patch_contrast_reasons(wide.bfloat16(), wide.half())["triton"]() == ()


def test_cuda_launcher_needs_no_triton():
    # The CUDA backend is auto's choice exactly when Triton is missing, so its launcher must not import Triton.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        import torch
        from conmim import native, ops
        mask = torch.tensor([[True, False, True, False, False], [False] * 5])
        s = torch.randn(2, 5, 8)
        args, (order, counts) = native._cuda_loss_args(s, s, mask, None, 0.1, True)
        assert counts.tolist() == [2, 0] and order[0, :2].tolist() == [0, 2], (order, counts)
        assert "cpu" in ops.patch_contrast_reasons(s)["cuda"]()[0].text
        assert "not" in ops.patch_contrast_reasons(s)["triton"]()[0].text
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_missing_kernels_package_is_a_reason():
    # A source tree on PYTHONPATH has conmim/ but not conmim.kernels (installed from kernels/): Triton must then
    # be a backend that cannot run, with the reason, not an ImportError from the dispatcher.
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.startswith("conmim.kernels"):
                    raise ModuleNotFoundError("No module named 'conmim.kernels'")
        sys.meta_path.insert(0, Block())
        import torch, conmim
        from conmim import ops
        (why,) = ops.patch_contrast_reasons(torch.empty(2, 3, 4))["triton"]()
        assert "conmim.kernels is not importable" in why.text, why
        loss = conmim.patch_contrast_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
        assert torch.isfinite(loss)
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_module_api_and_errors():
    loss_fn = conmim.FusedPatchContrastLoss(temperature=0.2, reduction="sum")
    assert "temperature=0.2" in repr(loss_fn)
    s, t = make_inputs(2, 9, 16, torch.float32)
    mask = make_mask("ragged", 2, 9)
    torch.testing.assert_close(loss_fn(s, t, mask), patch_contrast_loss_reference(s, t, mask, 0.2, "sum"))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        conmim.FusedPatchContrastLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        conmim.FusedPatchContrastLoss(reduction="max")
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        loss_fn(s, t, mask.long())
    with pytest.raises(ValueError, match="positive_index must lie in"):
        loss_fn(s, t, mask, torch.full((2, 9), -1))


@pytest.mark.parametrize(
    ("dtypes", "normalize", "tau", "exact"),
    [
        ((torch.float32, torch.float32), True, 0.1, False),  # ConMIM: |logit| <= 10, 3xTF32
        ((torch.float32, torch.float32), True, 0.05, False),
        ((torch.float32, torch.float32), True, 1e-3, True),  # 3xTF32's error times 1000 breaks the rule
        ((torch.float32, torch.float32), False, 0.1, True),  # unnormalised rows: logits unbounded
        ((torch.bfloat16, torch.float32), True, 1e-3, True),  # mixed pairs take fp32 products too
        ((torch.bfloat16, torch.bfloat16), True, 1e-3, False),  # bf16 products are exact in fp32 already
    ],
)
@pytest.mark.parametrize("kernel", ["fwd", "bwd_q", "bwd_k", "bwd_w"])
def test_fp32_logits_are_exact_where_they_can_be_large(kernel, dtypes, normalize, tau, exact):
    from conmim.kernels.patch_contrast import launch_meta

    const, _ = launch_meta(kernel, *dtypes, 768, False, normalize, temperature=tau, interpret=False)
    assert const["EXACT_LOGITS"] is exact


@pytest.mark.parametrize("normalize,temperature", [(True, 0.1), (True, 0.01), (False, 0.1)])
def test_cuda_launchers_pass_the_shared_split_tf32_gate(normalize, temperature):
    # one definition (conmim.limits): the Triton launchers read it, the CUDA launchers pass its decision in
    from conmim import _ext, native
    from conmim.kernels import patch_contrast as kpc
    from conmim.limits import exact_logits

    if not _ext.available():
        pytest.skip(_ext.why_unavailable())
    s = torch.randn(1, 3, 4)
    call = native._loss_call(s, s, None, temperature, normalize)
    assert (
        call.exact_logits == exact_logits(normalize, temperature) == kpc.exact_logits(normalize, temperature)
    )
    assert call.exact_logits == (not normalize or temperature < 0.05)
