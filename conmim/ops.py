"""The op layer: torch.library custom ops with fake and autograd registrations, dispatching to a backend.

``conmim::patch_contrast`` returns per-position losses and logsumexps ([B, N], zero where the mask is False) so
that its output shapes never depend on the mask's contents (no host sync, CUDA-graph capturable, compilable);
the user API (conmim.loss) reduces them. ``conmim::ema_update_`` mutates its teacher list in place.
Both validate inputs once and pick a backend by the rules in conmim.backends.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable

import torch

from conmim import _ext, backends, native
from conmim.backends import Kind, Why
from conmim.reference import acc_dtype, ema_update_reference_, masked_rows_loss

_GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TRITON_D = 2048  # bf16/fp16; one [BLOCK, d] tile of each operand stays in shared memory
MAX_TRITON_D_FP32 = 1024  # fp32 at d = 2048 needs ~394 KB of shared memory, above the H200's 227 KB
MAX_GPU_BATCH = (
    65535  # the Triton launchers put images on grid.y, CUDA's limit (the CUDA backend's: conmim._C)
)
GPU_BACKENDS = ("triton", "cuda")  # their launchers take the work order (conmim.order.work_order)


_NO_KERNELS = (
    "conmim.kernels is not importable ({exc}); it is installed from kernels/ by `pip install -e .` or a wheel, "
    "so a source tree on PYTHONPATH alone lacks it"
)


def _triton_module(name: str):
    """conmim.kernels.<name>, once the Triton reasons said it can run."""
    return importlib.import_module(f"conmim.kernels.{name}")


def _triton_whys(device: torch.device) -> list[Why]:
    """Why Triton cannot run on ``device`` here: the kernels package or Triton missing, or not a GPU."""
    try:
        from conmim.kernels import interpreting, triton_status
    except ImportError as exc:
        return [Why(_NO_KERNELS.format(exc=exc))]
    out = []
    if device.type != "cuda" and not interpreting():
        text = (
            f"wrong device: Triton kernels need CUDA tensors, got {device.type} (or set TRITON_INTERPRET=1)"
        )
        out.append(Why(text, Kind.DEVICE))
    why = triton_status()
    if why is not None:
        out.append(Why(why))
    return out


def _extension_whys(needs_cuda: bool) -> list[Why]:
    if not _ext.available():
        return [Why(_ext.why_unavailable(), Kind.EXTENSION)]
    if needs_cuda and not _ext.cuda_compiled():
        return [Why("conmim._C was built without CUDA kernels (nvcc was not found)")]
    return []


def _gpu_dtypes(bad: list[str], kernels: str) -> list[Why]:
    if not bad:
        return []
    return [
        Why(f"dtype {', '.join(bad)} is not supported by the {kernels} kernels (float32, bfloat16, float16)")
    ]


def _on(device: torch.device, kind: str, kernels: str) -> list[Why]:
    if device.type == kind:
        return []
    return [
        Why(
            f"wrong device: the {kernels} kernels need {kind.upper()} tensors, got {device.type}", Kind.DEVICE
        )
    ]


def _on_device(t: torch.device | torch.Tensor):
    """Makes ``t``'s GPU the current one while a kernel launches (the launchers use the current device's stream
    and context, which need not be the tensors' GPU); nothing for CPU tensors."""
    dev = t.device if isinstance(t, torch.Tensor) else t
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def _groups(teacher, student):
    """Split index lists by (teacher dtype, student dtype): one launch each."""
    out: dict[tuple, list[int]] = {}
    for i, (t, s) in enumerate(zip(teacher, student)):
        out.setdefault((t.dtype, s.dtype), []).append(i)
    return out.values()


def _dense(x: torch.Tensor) -> bool:
    """x covers its memory span once, without gaps: contiguous in some order of its dimensions (row-major,
    channels_last, a transpose)."""
    expect = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1):
        if stride != expect:
            return False
        expect *= size
    return True


def _layout(x: torch.Tensor) -> tuple:
    return tuple((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1)


def _flat_operands(teacher, student):
    """1-D views of each (dense) teacher tensor's memory, and of its student's values in the same order: an
    update is elementwise, so a channels_last or transposed parameter and its teacher are read and written where
    they lie, without a copy. Only a student in another layout than its teacher's is copied into that layout."""
    ts, ss = [], []
    for t, s in zip(teacher, student):
        s = s.detach()
        if _layout(s) != _layout(t) or not _dense(s):
            s = torch.empty_like(t, dtype=s.dtype).copy_(s)  # empty_like keeps a dense tensor's strides
        ts.append(t.as_strided((t.numel(),), (1,)))
        ss.append(s.as_strided((s.numel(),), (1,)))
    return ts, ss


class Backend:
    """One way to run the ops. ``why_not`` lists every reason it cannot run on ``device`` with tensors of
    ``dtypes`` (device, build, dtype; an empty list: it can), ``loss_limits`` the loss's own (sizes); the run
    methods take inputs already validated by the op and a backend already chosen. ``work`` is the GPU launchers'
    (order, counts) from conmim.order.work_order, or None to compute it there."""

    name = ""

    def why_not(self, device: torch.device, dtypes: set[torch.dtype]) -> list[Why]:
        return []

    def loss_limits(self, B: int, D: int, dtypes: set[torch.dtype]) -> list[Why]:
        return []

    def forward(self, student, teacher, mask, positive_index, temperature, normalize, work):
        """(loss, lse): [B, N] float32 (float64 for float64 inputs), 0 where not masked."""
        raise NotImplementedError

    def backward(
        self, grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher, work
    ):
        """(d_student in student.dtype, d_teacher in teacher.dtype or None): contiguous [B, N, D]."""
        raise NotImplementedError

    def ema_update(self, teacher: list[torch.Tensor], student: list[torch.Tensor], momentum) -> None:
        """teacher[i] <- lerp(teacher[i], student[i], 1 - momentum); momentum a float or a 0-d tensor."""
        raise NotImplementedError


class Reference(Backend):
    name = "reference"

    def forward(self, student, teacher, mask, positive_index, temperature, normalize, work):
        return _reference_rows(student, teacher, mask, positive_index, temperature, normalize)

    def backward(
        self, grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher, work
    ):
        return _reference_backward(
            grad, student, teacher, mask, positive_index, temperature, normalize, need_teacher
        )

    def ema_update(self, teacher, student, momentum):
        ema_update_reference_(teacher, student, momentum)


class Cpu(Backend):
    """The C++ kernels of conmim._C (OpenMP)."""

    name = "cpu"

    def why_not(self, device, dtypes):
        return [*_on(device, "cpu", "C++"), *_extension_whys(False)]

    def forward(self, student, teacher, mask, positive_index, temperature, normalize, work):
        return native.patch_contrast_forward_cpu(
            student, teacher, mask, positive_index, temperature, normalize
        )

    def backward(
        self, grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher, work
    ):
        args = (grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher)
        return native.patch_contrast_backward_cpu(*args)

    def ema_update(self, teacher, student, momentum):
        native.ema_update_cpu_(*_flat_operands(teacher, student), float(momentum))


class Triton(Backend):
    """The Triton kernels (conmim.kernels): on a GPU, or on the CPU under TRITON_INTERPRET=1."""

    name = "triton"

    def why_not(self, device, dtypes):
        return [
            *_triton_whys(device),
            *_gpu_dtypes(sorted(str(d) for d in dtypes - set(_GPU_DTYPES)), "Triton"),
        ]

    def loss_limits(self, B, D, dtypes):
        out = []
        max_d = MAX_TRITON_D_FP32 if torch.float32 in dtypes else MAX_TRITON_D
        fp32 = " with a float32 operand" if torch.float32 in dtypes else ""
        if max_d < D:
            out.append(Why(f"feature dim d = {D} is above the Triton kernels' limit of {max_d}{fp32}"))
        if B > MAX_GPU_BATCH:
            out.append(
                Why(f"batch B = {B} is above the GPU kernels' limit of {MAX_GPU_BATCH} images per call")
            )
        return out

    def forward(self, student, teacher, mask, positive_index, temperature, normalize, work):
        mod = _triton_module("patch_contrast")
        return mod.patch_contrast_forward(
            student, teacher, mask, positive_index, temperature, normalize, work=work
        )

    def backward(
        self, grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher, work
    ):
        args = (grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher)
        return _triton_module("patch_contrast").patch_contrast_backward(*args, work=work)

    def ema_update(self, teacher, student, momentum):
        # flat views keep the tensors' addresses, so the launcher's cached address table is found again; only a
        # student whose layout differs from its teacher's is copied (a new table each call, an error under
        # graph capture)
        teacher, student = _flat_operands(teacher, student)
        mod = _triton_module("ema")
        for idx in _groups(teacher, student):
            mod.ema_update_([teacher[i] for i in idx], [student[i] for i in idx], momentum)


class Cuda(Backend):
    """The CUDA kernels of conmim._C; their size limits come from the extension (conmim._C.cuda_max_dim and
    cuda_max_batch), where the kernels define them."""

    name = "cuda"

    def why_not(self, device, dtypes):
        bad = sorted(str(d) for d in dtypes - set(_GPU_DTYPES))
        return [*_on(device, "cuda", "CUDA"), *_extension_whys(True), *_gpu_dtypes(bad, "CUDA")]

    def loss_limits(self, B, D, dtypes):
        if not _ext.cuda_compiled():
            return []  # why_not already says the kernels are missing
        max_d, max_b, out = _ext.get().cuda_max_dim, _ext.get().cuda_max_batch, []
        if max_d < D:
            out.append(Why(f"feature dim d = {D} is above the CUDA kernels' limit of {max_d}"))
        if max_b < B:
            out.append(Why(f"batch B = {B} is above the GPU kernels' limit of {max_b} images per call"))
        return out

    def forward(self, student, teacher, mask, positive_index, temperature, normalize, work):
        args = (student, teacher, mask, positive_index, temperature, normalize)
        return native.patch_contrast_forward_cuda(*args, work=work)

    def backward(
        self, grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher, work
    ):
        args = (grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher)
        return native.patch_contrast_backward_cuda(*args, work=work)

    def ema_update(self, teacher, student, momentum):
        teacher, student = _flat_operands(teacher, student)
        if isinstance(momentum, torch.Tensor):
            momentum = momentum.to(device=teacher[0].device, dtype=torch.float32)
        for idx in _groups(teacher, student):
            native.ema_update_cuda_([teacher[i] for i in idx], [student[i] for i in idx], momentum)


BACKEND_OBJECTS: dict[str, Backend] = {b.name: b for b in (Triton(), Cuda(), Cpu(), Reference())}


def _fused_reasons(
    device: torch.device,
    dtypes: set[torch.dtype],
    limits: Callable[[Backend], list[Why]],
) -> backends.Reasons:
    """backend -> thunk listing every reason it cannot run an op on ``device`` with tensors of ``dtypes``
    (the backend's why_not, then the op's ``limits(backend)``), in auto priority order for the device
    (Triton, then CUDA, on a GPU; the C++ kernels first on the CPU); the reference last."""

    def thunk(b: Backend):
        return lambda: (*b.why_not(device, dtypes), *limits(b))

    names = ("triton", "cuda", "cpu") if device.type == "cuda" else ("cpu", "triton", "cuda")
    return {**{n: thunk(BACKEND_OBJECTS[n]) for n in names}, "reference": lambda: ()}


# --------------------------------------------------------------------------------------------- patch contrast
def patch_contrast_reasons(student: torch.Tensor, teacher: torch.Tensor | None = None) -> backends.Reasons:
    """backend -> thunk listing every reason it cannot run the loss on inputs like ``student`` and ``teacher``
    (default: a teacher like the student); in auto priority order."""
    teacher = student if teacher is None else teacher
    B, _, D = student.shape
    dtypes = {student.dtype, teacher.dtype}
    return _fused_reasons(student.device, dtypes, lambda b: b.loss_limits(B, D, dtypes))


@torch.compiler.assume_constant_result
def patch_contrast_backend(student: torch.Tensor, teacher: torch.Tensor, backend: str) -> str:
    """The backend that runs the loss on these inputs for a request ``backend`` (after
    :func:`conmim.backends.requested_backend`). It depends on devices, dtypes and shapes only, so a compiled
    graph takes it as a constant; the forward's choice is saved for the backward, which never dispatches again."""
    return backends.choose(
        "conmim::patch_contrast",
        backend,
        patch_contrast_reasons(student, teacher),
        {"student": student, "teacher": teacher},
    )


def _no_autocast(t: torch.Tensor):
    """The reference backend's arithmetic is fp32 (fp64) by contract: an enclosing autocast region would run its
    matmuls in bf16/fp16 (and hand masked_scatter a source of another dtype)."""
    return torch.autocast(t.device.type, enabled=False)


def _reference_rows(student, teacher, mask, positive_index, temperature, normalize):
    """Dense [B, N] loss and logsumexp from the reference (rows that are not masked hold 0)."""
    with _no_autocast(student):
        return _reference_rows_fp32(student, teacher, mask, positive_index, temperature, normalize)


def _reference_rows_fp32(student, teacher, mask, positive_index, temperature, normalize):
    B, N, _ = student.shape
    acc = acc_dtype(student.dtype)
    per_row = masked_rows_loss(student, teacher, mask, temperature, normalize, positive_index)
    loss = torch.zeros(B, N, dtype=acc, device=student.device)
    loss = loss.masked_scatter(mask, per_row)
    q = student.to(acc)
    k = teacher.to(acc)
    if normalize:
        q = torch.nn.functional.normalize(q, dim=-1)
        k = torch.nn.functional.normalize(k, dim=-1)
    b_idx, i_idx = mask.nonzero(as_tuple=True)
    rows = torch.einsum("md,mnd->mn", q[b_idx, i_idx], k[b_idx]) / temperature
    lse = torch.zeros(B, N, dtype=acc, device=student.device).masked_scatter(mask, torch.logsumexp(rows, -1))
    return loss, lse


def _normalize_backward(x: torch.Tensor, dq: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Vector-Jacobian product of x -> x / max(|x|, eps) along the last dim."""
    nrm = x.norm(dim=-1, keepdim=True)
    q = x / nrm.clamp_min(eps)
    proj = (q * dq).sum(-1, keepdim=True) * (nrm >= eps)
    return (dq - q * proj) / nrm.clamp_min(eps)


def _reference_backward(grad, student, teacher, mask, positive_index, temperature, normalize, need_teacher):
    """Analytic gradients of the dense per-position loss (the reference backend's backward; O(B N^2) memory).

    dlogit_ij = g_i (softmax_ij - [j == pos_i]) / tau on masked rows, with the positive's p - 1 computed as minus
    the sum of the other probabilities (no cancellation when p is near 1); dq = G k_hat, dk = G^T q_hat, then
    the L2-normalisation Jacobian. Returns (d_student in student.dtype, d_teacher in teacher.dtype or None),
    contiguous.
    """
    with _no_autocast(student):
        return _reference_backward_fp32(
            grad, student, teacher, mask, positive_index, temperature, normalize, need_teacher
        )


def _reference_backward_fp32(
    grad, student, teacher, mask, positive_index, temperature, normalize, need_teacher
):
    B, N, _ = student.shape
    acc = acc_dtype(student.dtype)
    x, y = student.to(acc), teacher.to(acc)
    q = torch.nn.functional.normalize(x, dim=-1) if normalize else x
    k = torch.nn.functional.normalize(y, dim=-1) if normalize else y
    logits = torch.bmm(q, k.transpose(1, 2)) / temperature
    pos = (
        positive_index if positive_index is not None else torch.arange(N, device=student.device).expand(B, N)
    )
    onehot = torch.nn.functional.one_hot(pos.clamp(0, N - 1), N).bool()
    others = torch.softmax(logits, dim=-1).masked_fill(onehot, 0.0)
    g = grad.to(acc) * mask.to(acc)
    if positive_index is not None:  # an index the host could not check: NaN gradients, as the fused kernels
        g = g.masked_fill(mask & ((positive_index < 0) | (positive_index >= N)), float("nan"))
    g = g.unsqueeze(-1)
    G = g * (others - onehot * others.sum(-1, keepdim=True)) / temperature
    dq = torch.bmm(G, k)
    ds = _normalize_backward(x, dq) if normalize else dq
    dt = None
    if need_teacher:
        dk = torch.bmm(G.transpose(1, 2), q)
        dt = (_normalize_backward(y, dk) if normalize else dk).to(teacher.dtype).contiguous()
    return ds.to(student.dtype).contiguous(), dt


def _work(order, counts):
    """The GPU launchers' ``work`` argument: (order, counts) from the forward, or None to compute it there."""
    return None if order is None else (order, counts)


@torch.library.custom_op("conmim::patch_contrast", mutates_args=())
def patch_contrast_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    positive_index: torch.Tensor | None,
    temperature: float,
    normalize: bool,
    backend: str,
    order: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position loss and logsumexp, each [B, N] float32 (float64 for float64 inputs), 0 where not masked.
    student and teacher may differ in dtype (float32 / bfloat16 / float16); each is read in its own.
    ``order``, ``counts``: conmim.order.work_order(mask) for the GPU backends, computed once by the caller and
    reused by the backward (None: the launcher computes them)."""
    name = patch_contrast_backend(student, teacher, backend)
    with _on_device(student):
        return BACKEND_OBJECTS[name].forward(
            student, teacher, mask, positive_index, temperature, normalize, _work(order, counts)
        )


@patch_contrast_op.register_fake
def _(student, teacher, mask, positive_index, temperature, normalize, backend, order=None, counts=None):
    B, N, _ = student.shape
    acc = acc_dtype(student.dtype)
    return student.new_empty(B, N, dtype=acc), student.new_empty(B, N, dtype=acc)


@torch.library.custom_op("conmim::patch_contrast_backward", mutates_args=())
def patch_contrast_backward_op(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    positive_index: torch.Tensor | None,
    lse: torch.Tensor,
    temperature: float,
    normalize: bool,
    need_teacher: bool,
    backend: str,
    order: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_student [B, N, d] in student.dtype, d_teacher [B, N, d] in teacher.dtype or an empty tensor when
    ``need_teacher`` is False). ``backend``, ``order`` and ``counts`` are the forward's (autograd passes them;
    "auto" is resolved the same way as there)."""
    # autograd passes the backend the forward ran, whose reasons were checked there: no second dispatch
    name = backend if backend != "auto" else patch_contrast_backend(student, teacher, backend)
    args = (grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher)
    with _on_device(student):
        ds, dt = BACKEND_OBJECTS[name].backward(*args, _work(order, counts))
    return ds, (dt if dt is not None else teacher.new_empty(0))


@patch_contrast_backward_op.register_fake
def _(
    grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher, backend, *work
):
    B, N, D = student.shape
    ds = student.new_empty(B, N, D)
    dt = teacher.new_empty(B, N, D) if need_teacher else teacher.new_empty(0)
    return ds, dt


def _pc_setup_context(ctx, inputs, output):
    student, teacher, mask, positive_index, temperature, normalize, backend, order, counts = inputs
    _, lse = output
    ctx.save_for_backward(student, teacher, mask, positive_index, lse, order, counts)
    ctx.temperature, ctx.normalize = temperature, normalize
    # the forward's backend: already concrete when called through conmim.patch_contrast_loss
    ctx.backend = backend if backend != "auto" else patch_contrast_backend(student, teacher, backend)


def _pc_backward(ctx, grad_loss, grad_lse):
    student, teacher, mask, positive_index, lse, order, counts = ctx.saved_tensors
    need_teacher = ctx.needs_input_grad[1]
    ds, dt = patch_contrast_backward_op(
        grad_loss,
        student,
        teacher,
        mask,
        positive_index,
        lse,
        ctx.temperature,
        ctx.normalize,
        need_teacher,
        ctx.backend,
        order,
        counts,
    )
    return (ds if ctx.needs_input_grad[0] else None), (dt if need_teacher else None), *([None] * 7)


patch_contrast_op.register_autograd(_pc_backward, setup_context=_pc_setup_context)


def _no_double_backward(ctx, grad_ds, grad_dt):
    raise RuntimeError(
        "conmim::patch_contrast: double backward (a gradient of the gradient, e.g. torch.autograd.grad with "
        "create_graph=True followed by a second backward) is not supported by the fused op; for higher-order "
        "gradients use conmim.patch_contrast_loss_reference (plain torch ops) or backend='reference' under "
        "torch.func (e.g. torch.func.grad)"
    )


patch_contrast_backward_op.register_autograd(_no_double_backward)


# -------------------------------------------------------------------------------------------------------- EMA
def ema_reasons(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> backends.Reasons:
    """backend -> thunk listing every reason it cannot run this EMA update; in auto priority order."""
    dev = teacher[0].device if teacher else torch.device("cpu")
    devices = {t.device for t in teacher} | {s.device for s in student}
    dtypes = {t.dtype for t in teacher} | {s.dtype for s in student}
    common = []
    if len(devices) > 1:
        common.append(Why(f"tensors are on several devices {sorted(str(d) for d in devices)}"))
    bad = [i for i, t in enumerate(teacher) if not _dense(t)]
    if bad:
        common.append(
            Why(f"teacher tensors {bad[:5]} have gaps or overlaps (fused kernels update dense memory)")
        )
    return _fused_reasons(dev, dtypes, lambda b: common)


@torch.library.custom_op("conmim::ema_update_", mutates_args=("teacher",))
def ema_update_op(
    teacher: list[torch.Tensor],
    student: list[torch.Tensor],
    momentum: float,
    momentum_tensor: torch.Tensor | None,
    backend: str,
) -> None:
    """teacher[i] <- lerp(teacher[i], student[i], 1 - m); m = momentum_tensor if given (0-d) else momentum."""
    if not teacher:
        return
    reasons = ema_reasons(teacher, student)
    name = backends.choose("conmim::ema_update_", backend, reasons, {"teacher": teacher, "student": student})
    m = momentum_tensor if momentum_tensor is not None else momentum
    with _on_device(teacher[0]):
        BACKEND_OBJECTS[name].ema_update(teacher, student, m)


@ema_update_op.register_fake
def _(teacher, student, momentum, momentum_tensor, backend):
    return None
