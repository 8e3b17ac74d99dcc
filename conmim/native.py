"""Launchers for the compiled kernels in conmim._C: allocate outputs, pass pointers, strides and dtype tags.

No autograd and no argument policy here (that is conmim.ops); shapes and dtypes are assumed validated.
"""

from __future__ import annotations

import torch

from conmim import _ext
from conmim.limits import exact_logits
from conmim.order import work_order


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _loss_call(student, teacher, positive_index, temperature, normalize, **fields):
    """The one builder of conmim._C.LossCall (csrc/loss_call.h): the inputs every loss entry point reads, plus
    ``fields`` (mask or work order, outputs, grad, threads or stream) set by name."""
    call = _ext.get().LossCall()
    call.student, call.student_stride = student.data_ptr(), list(student.stride())
    call.teacher, call.teacher_stride = teacher.data_ptr(), list(teacher.stride())
    call.student_dtype = _ext.DTYPE_TAGS[student.dtype]
    call.teacher_dtype = _ext.DTYPE_TAGS[teacher.dtype]
    call.B, call.N, call.D = student.shape
    if positive_index is not None:
        call.positive_index, call.positive_stride = positive_index.data_ptr(), list(positive_index.stride())
    call.inv_tau = 1.0 / float(temperature)
    call.normalize = bool(normalize)
    call.exact_logits = exact_logits(normalize, temperature)
    for name, value in fields.items():
        setattr(call, name, value)
    return call


def _stream(t) -> int:
    """The current CUDA stream of t's device (0 for a CPU tensor: the tests' CPU execution of the CUDA kernels)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def patch_contrast_forward_cpu(student, teacher, mask, positive_index, temperature, normalize):
    """student/teacher: [B, N, D] CPU tensors (any strides), each float32/bfloat16/float16 (any pair) or both
    float64; mask: bool [B, N]; positive_index: int64 [B, N] (values in [0, N)) or None.
    Returns (loss, lse): [B, N] fp32 (fp64 for fp64 inputs), zero on unmasked rows."""
    B, N, _ = student.shape
    loss = torch.empty(B, N, dtype=_acc(student.dtype))
    lse = torch.empty_like(loss)
    call = _loss_call(
        student, teacher, positive_index, temperature, normalize,
        mask=mask.data_ptr(), mask_stride=list(mask.stride()), loss=loss.data_ptr(), lse=lse.data_ptr(),
        nthreads=_threads(),
    )  # fmt: skip
    _ext.get().patch_contrast_fwd_cpu(call)
    return loss, lse


def patch_contrast_backward_cpu(
    grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher
):
    """grad: [B, N] (any strides, expanded allowed); lse: from the forward, unused (the kernel recomputes each row's
    softmax exactly). Returns (d_student, d_teacher or None): contiguous [B, N, D] in each input's dtype, every
    element written."""
    grad = grad.to(_acc(student.dtype))
    ds = torch.empty(student.shape, dtype=student.dtype)
    dt = torch.empty(teacher.shape, dtype=teacher.dtype) if need_teacher else None
    call = _loss_call(
        student, teacher, positive_index, temperature, normalize,
        mask=mask.data_ptr(), mask_stride=list(mask.stride()), grad=grad.data_ptr(),
        grad_stride=list(grad.stride()), d_student=ds.data_ptr(), d_teacher=_ptr(dt), nthreads=_threads(),
    )  # fmt: skip
    _ext.get().patch_contrast_bwd_cpu(call)
    return ds, dt


def ema_update_cpu_(teacher, student, momentum: float) -> None:
    """teacher: list of contiguous CPU tensors (updated in place); student: same shapes, contiguous."""
    C = _ext.get()
    C.ema_update_cpu(
        [t.data_ptr() for t in teacher],
        [_ext.DTYPE_TAGS[t.dtype] for t in teacher],
        [s.data_ptr() for s in student],
        [_ext.DTYPE_TAGS[s.dtype] for s in student],
        [t.numel() for t in teacher],
        float(momentum),
        _threads(),
    )


def ema_update_cuda_(teacher, student, momentum) -> None:
    """teacher/student: lists of contiguous tensors on one GPU, one (teacher dtype, student dtype) pair per call;
    momentum: float or a 0-d float32 tensor on that GPU (read on the device)."""
    C = _ext.get()
    if not teacher:
        return
    m_ptr, m_val = (momentum.data_ptr(), 0.0) if isinstance(momentum, torch.Tensor) else (0, float(momentum))
    stream = _stream(teacher[0])
    C.ema_update_cuda(
        [t.data_ptr() for t in teacher],
        _ext.DTYPE_TAGS[teacher[0].dtype],
        [s.data_ptr() for s in student],
        _ext.DTYPE_TAGS[student[0].dtype],
        [t.numel() for t in teacher],
        m_val,
        m_ptr,
        stream,
    )


def _cuda_loss_args(student, teacher, mask, positive_index, temperature, normalize, work=None):
    """(LossCall with the work order of ``mask`` (``work`` = (order, counts) from the forward, or None to compute
    it) and the current stream, (order, counts)): the caller keeps the order alive until the launch is queued."""
    order, counts = work if work is not None else work_order(mask)
    call = _loss_call(
        student, teacher, positive_index, temperature, normalize,
        order=order.data_ptr(), counts=counts.data_ptr(), stream=_stream(student),
    )  # fmt: skip
    return call, (order, counts)


def patch_contrast_forward_cuda(student, teacher, mask, positive_index, temperature, normalize, work=None):
    """CUDA kernels; inputs as for the CPU launcher but on one GPU (float32/bfloat16/float16, any pair, d <= 1024).
    Returns (loss, lse): float32 [B, N], zero on unmasked rows."""
    B, N, _ = student.shape
    loss = torch.empty(B, N, device=student.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    call, keep = _cuda_loss_args(student, teacher, mask, positive_index, temperature, normalize, work)
    call.loss, call.lse = loss.data_ptr(), lse.data_ptr()
    _ext.get().patch_contrast_fwd_cuda(call)
    del keep  # the work order stays alive until the launch is queued; the stream orders its reuse
    return loss, lse


def patch_contrast_backward_cuda(
    grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher, work=None
):
    """Returns (d_student, d_teacher or None): contiguous [B, N, D] in each input's dtype, every element written."""
    grad = grad.to(torch.float32)  # lse is unused, as for the CPU kernel
    ds = torch.empty(student.shape, device=student.device, dtype=student.dtype)
    dt = torch.empty(teacher.shape, device=teacher.device, dtype=teacher.dtype) if need_teacher else None
    call, keep = _cuda_loss_args(student, teacher, mask, positive_index, temperature, normalize, work)
    call.grad, call.grad_stride = grad.data_ptr(), list(grad.stride())
    call.d_student, call.d_teacher = ds.data_ptr(), _ptr(dt)
    stats = torch.empty(*student.shape[:2], 3, device=student.device, dtype=torch.float32)
    call.row_stats = stats.data_ptr()
    _ext.get().patch_contrast_bwd_cuda(call)
    del keep, stats  # the stream orders the scratch's reuse after both kernels
    return ds, dt
