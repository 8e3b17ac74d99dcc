"""Launchers for the compiled kernels in conmim._C: allocate outputs, pass pointers, strides and dtype tags.

No autograd and no argument policy here (that is conmim.ops); shapes and dtypes are assumed validated.
"""

from __future__ import annotations

import torch

from conmim import _ext
from conmim.masking import work_order


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _pos_args(positive_index):
    if positive_index is None:
        return 0, [0, 0]
    return positive_index.data_ptr(), list(positive_index.stride())


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _loss_args(student, teacher, mask, positive_index, temperature, normalize) -> list:
    """The leading arguments shared by the forward and backward CPU kernels."""
    B, N, D = student.shape
    pos_ptr, pos_stride = _pos_args(positive_index)
    return [
        student.data_ptr(),
        list(student.stride()),
        teacher.data_ptr(),
        list(teacher.stride()),
        mask.data_ptr(),
        list(mask.stride()),
        pos_ptr,
        pos_stride,
        B,
        N,
        D,
        _ext.DTYPE_TAGS[student.dtype],
        1.0 / float(temperature),
        bool(normalize),
    ]


def patch_contrast_forward_cpu(student, teacher, mask, positive_index, temperature, normalize):
    """student/teacher: [B, N, D] fp32/bf16/fp16/fp64 CPU tensors (any strides); mask: bool [B, N];
    positive_index: int64 [B, N] (values in [0, N)) or None.
    Returns (loss, lse): [B, N] fp32 (fp64 for fp64 inputs), zero on unmasked rows."""
    C = _ext.get()
    B, N, _ = student.shape
    acc = _acc(student.dtype)
    loss = torch.empty(B, N, dtype=acc)
    lse = torch.empty(B, N, dtype=acc)
    args = _loss_args(student, teacher, mask, positive_index, temperature, normalize)
    C.patch_contrast_fwd_cpu(*args, loss.data_ptr(), lse.data_ptr(), _threads())
    return loss, lse


def patch_contrast_backward_cpu(
    grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher
):
    """grad: [B, N] (any strides, expanded allowed); lse: from the forward.
    Returns (d_student, d_teacher or None): contiguous [B, N, D] in the input dtype, every element written."""
    C = _ext.get()
    B, N, D = student.shape
    acc = _acc(student.dtype)
    grad = grad.to(acc)
    lse = lse.to(acc).contiguous()
    ds = torch.empty(B, N, D, dtype=student.dtype)
    dt = torch.empty_like(ds) if need_teacher else None
    args = _loss_args(student, teacher, mask, positive_index, temperature, normalize)
    C.patch_contrast_bwd_cpu(
        *args,
        lse.data_ptr(),
        grad.data_ptr(),
        list(grad.stride()),
        ds.data_ptr(),
        dt.data_ptr() if dt is not None else 0,
        _threads(),
    )
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
    stream = torch.cuda.current_stream(teacher[0].device).cuda_stream
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


def _cuda_loss_args(student, teacher, mask, positive_index, temperature, normalize) -> list:
    B, N, D = student.shape
    order, counts = work_order(mask)
    pos_ptr, pos_stride = _pos_args(positive_index)
    return [
        student.data_ptr(), list(student.stride()), teacher.data_ptr(), list(teacher.stride()),
        order.data_ptr(), counts.data_ptr(), pos_ptr, pos_stride, B, N, D,
        _ext.DTYPE_TAGS[student.dtype], 1.0 / float(temperature), bool(normalize),
    ], (order, counts)  # fmt: skip


def patch_contrast_forward_cuda(student, teacher, mask, positive_index, temperature, normalize):
    """CUDA kernels; inputs as for the CPU launcher but on one GPU (fp32/bf16/fp16, d <= 1024).
    Returns (loss, lse): float32 [B, N], zero on unmasked rows."""
    C = _ext.get()
    B, N, _ = student.shape
    loss = torch.empty(B, N, device=student.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    args, keep = _cuda_loss_args(student, teacher, mask, positive_index, temperature, normalize)
    stream = torch.cuda.current_stream(student.device).cuda_stream
    C.patch_contrast_fwd_cuda(*args, loss.data_ptr(), lse.data_ptr(), stream)
    del keep  # the work order stays alive until the launch is queued; the stream orders its reuse
    return loss, lse


def patch_contrast_backward_cuda(
    grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher
):
    """Returns (d_student, d_teacher or None): contiguous [B, N, D] in the input dtype, every element written."""
    C = _ext.get()
    B, N, D = student.shape
    grad = grad.to(torch.float32)
    lse = lse.to(torch.float32).contiguous()
    ds = torch.empty(B, N, D, device=student.device, dtype=student.dtype)
    dt = torch.empty_like(ds) if need_teacher else None
    args, keep = _cuda_loss_args(student, teacher, mask, positive_index, temperature, normalize)
    stream = torch.cuda.current_stream(student.device).cuda_stream
    C.patch_contrast_bwd_cuda(
        *args, lse.data_ptr(), grad.data_ptr(), list(grad.stride()), ds.data_ptr(),
        dt.data_ptr() if dt is not None else 0, stream,
    )  # fmt: skip
    del keep
    return ds, dt
