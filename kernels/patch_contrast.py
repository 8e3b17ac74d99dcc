"""Triton kernels for the ConMIM patch-contrast loss, and their launchers.

Work is indexed by ``order`` [B, N] (each image's masked patches first, in index order) and ``counts`` [B]
(masked patches per image), both computed on the device, so no launch depends on a host-side count.
Each program owns BLOCK_M rows of ``order`` of one image and the full feature width (BLOCK_D = next power of two
of d) and streams the image's keys in tiles of BLOCK_N:

- forward: logits = (s . t) / (|s| |t|) / tau tile by tile, an online logsumexp, the positive's logit picked on
  the fly; writes loss and lse for its rows (zeros for rows that are not masked);
- backward (queries): recompute each tile, G = g (softmax - onehot) / tau, dq += G t_hat, then the L2
  Jacobian; writes every row of d(student) (zeros for unmasked rows);
- backward (keys, only when the teacher needs a gradient): one program per BLOCK_N keys loops over the masked
  query tiles of its image and accumulates dk += G^T s_hat, then the L2 Jacobian.

Arithmetic is fp32 (logsumexp and accumulators always). bf16/fp16 tiles go to tl.dot in their own dtype on a
GPU (tensor cores, fp32 accumulate); fp32 tiles use IEEE fp32 dots; under TRITON_INTERPRET everything is cast
to fp32 first (the interpreter's low-precision arithmetic is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from conmim.kernels import interpreting
from conmim.masking import work_order

NORM_EPS = 1e-12  # as torch.nn.functional.normalize


@triton.jit
def _load_rows(ptr, row_idx, sb, sn, sd, b, offs_d, row_ok, D, DOT_FP32: tl.constexpr):
    # int64 row offsets: key rows come from tl.arange (int32), and a strided view can put B*N*D past 2^31
    p = ptr + b * sb + row_idx.to(tl.int64)[:, None] * sn + offs_d[None, :] * sd
    x = tl.load(p, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _row_norm(x, NORMALIZE: tl.constexpr):
    """Row L2 norms (fp32) of a tile, or ones when not normalising."""
    xf = x.to(tl.float32)
    if NORMALIZE:
        return tl.sqrt(tl.sum(xf * xf, axis=1))
    else:
        return tl.sum(xf * 0.0, axis=1) + 1.0


@triton.jit
def _query_block(order_ptr, counts_ptr, N, BLOCK_M: tl.constexpr):
    """This program's slice of its image's work order: (image, whether no row of it is masked, rows inside N,
    patch index of each row, rows that are masked)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cnt = tl.load(counts_ptr + b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_n = offs_m < N
    row_idx = tl.load(order_ptr + b * N + offs_m, mask=in_n, other=0)
    return b, pid_m * BLOCK_M >= cnt, in_n, row_idx, offs_m < cnt


@triton.jit
def _rows_with_norms(
    s_ptr,
    s_sb,
    s_sn,
    s_sd,
    b,
    row_idx,
    valid,
    offs_d,
    D,
    eps,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """A tile of rows [rows, BLOCK_D] with its row norms and clamped inverse norms."""
    q = _load_rows(s_ptr, row_idx, s_sb, s_sn, s_sd, b, offs_d, valid, D, DOT_FP32)
    qn = _row_norm(q, NORMALIZE)
    return q, qn, 1.0 / tl.maximum(qn, eps)


@triton.jit
def _positives(pos_ptr, p_sb, p_sn, b, row_idx, valid, HAS_POS: tl.constexpr):
    """Key index of each query's positive: positive_index[b, row] or the row itself."""
    if HAS_POS:
        return tl.load(pos_ptr + b * p_sb + row_idx * p_sn, mask=valid, other=0)
    else:
        return row_idx


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_grad(g, x, IEEE: tl.constexpr):
    # The gradient tile stays fp32 (its positive entry, g (p - 1), must not be rounded to bf16); on the
    # low-precision path the features are widened and the product runs as TF32 (10-bit mantissa).
    if IEEE:
        return tl.dot(g, x, input_precision="ieee")
    else:
        return tl.dot(g, x.to(tl.float32), input_precision="tf32")


@triton.jit
def _softmax_grad(q, k, row_scale, inv_kn, lse, g, pos, offs_n, IEEE: tl.constexpr):
    """G = g / tau (softmax - onehot) for one tile, recomputed from the saved logsumexp (g carries 1 / tau)."""
    logits = _dot(q, tl.trans(k), IEEE) * row_scale[:, None] * inv_kn[None, :]
    p = tl.exp(logits - lse[:, None])
    onehot = offs_n[None, :] == pos[:, None]
    return g[:, None] * (p - tl.where(onehot, 1.0, 0.0))


@triton.jit
def _normalize_backward(x, dxh, nrm, inv, eps):
    """Gradient w.r.t. x of x / max(|x|, eps), given the gradient dxh w.r.t. the normalised rows."""
    xh = x.to(tl.float32) * inv[:, None]
    proj = tl.sum(xh * dxh, axis=1)
    keep = tl.where(nrm >= eps, 1.0, 0.0)
    return (dxh - xh * (proj * keep)[:, None]) * inv[:, None]


@triton.jit
def _patch_contrast_fwd_kernel(
    s_ptr,
    s_sb,
    s_sn,
    s_sd,
    t_ptr,
    t_sb,
    t_sn,
    t_sd,
    order_ptr,
    counts_ptr,
    pos_ptr,
    p_sb,
    p_sn,
    loss_ptr,
    lse_ptr,
    N,
    D,
    inv_tau,
    eps,
    HAS_POS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b, idle, in_n, row_idx, valid = _query_block(order_ptr, counts_ptr, N, BLOCK_M)
    out_off = b * N + row_idx
    if idle:
        zero = tl.zeros([BLOCK_M], dtype=tl.float32)
        tl.store(loss_ptr + out_off, zero, mask=in_n)
        tl.store(lse_ptr + out_off, zero, mask=in_n)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        q, _qn, inv_qn = _rows_with_norms(
            s_ptr, s_sb, s_sn, s_sd, b, row_idx, valid, offs_d, D, eps, NORMALIZE, DOT_FP32
        )
        row_scale = inv_qn * inv_tau
        pos = _positives(pos_ptr, p_sb, p_sn, b, row_idx, valid, HAS_POS)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        pos_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            k, _kn, inv_kn = _rows_with_norms(
                t_ptr, t_sb, t_sn, t_sd, b, offs_n, col_ok, offs_d, D, eps, NORMALIZE, DOT_FP32
            )
            raw = _dot(q, tl.trans(k), IEEE)
            logits = raw * row_scale[:, None] * inv_kn[None, :]
            logits = tl.where(col_ok[None, :], logits, float("-inf"))
            pos_logit += tl.sum(tl.where(offs_n[None, :] == pos[:, None], logits, 0.0), axis=1)
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
            m_i = m_new
        lse = m_i + tl.log(l_i)
        tl.store(loss_ptr + out_off, tl.where(valid, lse - pos_logit, 0.0), mask=in_n)
        tl.store(lse_ptr + out_off, tl.where(valid, lse, 0.0), mask=in_n)


@triton.jit
def _patch_contrast_bwd_q_kernel(
    s_ptr,
    s_sb,
    s_sn,
    s_sd,
    t_ptr,
    t_sb,
    t_sn,
    t_sd,
    order_ptr,
    counts_ptr,
    pos_ptr,
    p_sb,
    p_sn,
    lse_ptr,
    g_ptr,
    g_sb,
    g_sn,
    ds_ptr,
    N,
    D,
    inv_tau,
    eps,
    HAS_POS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b, idle, in_n, row_idx, valid = _query_block(order_ptr, counts_ptr, N, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    out_ptrs = ds_ptr + (b * N + row_idx[:, None]) * D + offs_d[None, :]
    out_mask = in_n[:, None] & (offs_d[None, :] < D)
    if idle:
        tl.store(
            out_ptrs,
            tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32).to(ds_ptr.dtype.element_ty),
            mask=out_mask,
        )
    else:
        q, qn, inv_qn = _rows_with_norms(
            s_ptr, s_sb, s_sn, s_sd, b, row_idx, valid, offs_d, D, eps, NORMALIZE, DOT_FP32
        )
        row_scale = inv_qn * inv_tau
        pos = _positives(pos_ptr, p_sb, p_sn, b, row_idx, valid, HAS_POS)
        lse = tl.load(lse_ptr + b * N + row_idx, mask=valid, other=0.0)
        g = tl.load(g_ptr + b * g_sb + row_idx * g_sn, mask=valid, other=0.0).to(tl.float32)
        g = tl.where(valid, g, 0.0) * inv_tau
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            k, _kn, inv_kn = _rows_with_norms(
                t_ptr, t_sb, t_sn, t_sd, b, offs_n, col_ok, offs_d, D, eps, NORMALIZE, DOT_FP32
            )
            gl = _softmax_grad(q, k, row_scale, inv_kn, lse, g, pos, offs_n, IEEE)
            gl = tl.where(col_ok[None, :], gl, 0.0) * inv_kn[None, :]
            dq += _dot_grad(gl, k, IEEE)
        # dq is the gradient w.r.t. q_hat = q / |q|; apply the Jacobian of the normalisation.
        if NORMALIZE:
            dq = _normalize_backward(q, dq, qn, inv_qn, eps)
        dq = tl.where(valid[:, None], dq, 0.0)
        tl.store(out_ptrs, dq.to(ds_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _patch_contrast_bwd_k_kernel(
    s_ptr,
    s_sb,
    s_sn,
    s_sd,
    t_ptr,
    t_sb,
    t_sn,
    t_sd,
    order_ptr,
    counts_ptr,
    pos_ptr,
    p_sb,
    p_sn,
    lse_ptr,
    g_ptr,
    g_sb,
    g_sn,
    dt_ptr,
    N,
    D,
    inv_tau,
    eps,
    HAS_POS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cnt = tl.load(counts_ptr + b)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    k, kn, inv_kn = _rows_with_norms(
        t_ptr, t_sb, t_sn, t_sd, b, offs_n, col_ok, offs_d, D, eps, NORMALIZE, DOT_FP32
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, cnt, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        valid = offs_m < cnt
        row_idx = tl.load(order_ptr + b * N + offs_m, mask=valid, other=0)
        q, _qn, inv_qn = _rows_with_norms(
            s_ptr, s_sb, s_sn, s_sd, b, row_idx, valid, offs_d, D, eps, NORMALIZE, DOT_FP32
        )
        pos = _positives(pos_ptr, p_sb, p_sn, b, row_idx, valid, HAS_POS)
        lse = tl.load(lse_ptr + b * N + row_idx, mask=valid, other=0.0)
        g = tl.load(g_ptr + b * g_sb + row_idx * g_sn, mask=valid, other=0.0).to(tl.float32)
        g = tl.where(valid, g, 0.0) * inv_tau
        gl = _softmax_grad(q, k, inv_qn * inv_tau, inv_kn, lse, g, pos, offs_n, IEEE)
        gl = tl.where(valid[:, None] & col_ok[None, :], gl, 0.0) * inv_qn[:, None]
        dk += _dot_grad(tl.trans(gl), q, IEEE)
    if NORMALIZE:
        dk = _normalize_backward(k, dk, kn, inv_kn, eps)
    out_ptrs = dt_ptr + (b * N + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(out_ptrs, dk.to(dt_ptr.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))


def _blocks(D: int, N: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for a feature width D: full-width tiles, fewer rows as D grows."""
    block_d = max(16, triton.next_power_of_2(D))
    if block_d <= 128:
        bm, bn, warps = 64, 64, 4
    elif block_d <= 256:
        bm, bn, warps = 64, 32, 4
    elif block_d <= 512:
        bm, bn, warps = 32, 32, 8
    else:
        bm, bn, warps = 16, 16, 8
    if interpreting():
        bm, bn = 16, 16  # the interpreter's cost grows with the tile, not with the grid
    return bm, bn, block_d, warps


def _common(student, teacher, positive_index, temperature, normalize):
    dot_fp32 = interpreting() or student.dtype == torch.float32
    ieee = student.dtype == torch.float32 or interpreting()
    pos = positive_index if positive_index is not None else student.new_empty(0, dtype=torch.int64)
    p_sb, p_sn = (pos.stride(0), pos.stride(1)) if positive_index is not None else (0, 0)
    flags = dict(
        HAS_POS=positive_index is not None,
        NORMALIZE=bool(normalize),
        DOT_FP32=dot_fp32,
        IEEE=ieee,
    )
    return pos, p_sb, p_sn, 1.0 / float(temperature), flags


def patch_contrast_forward(student, teacher, mask, positive_index, temperature, normalize, work=None):
    """Launch the forward kernel. student/teacher: [B, N, D] fp32/bf16/fp16 on one GPU (any strides); mask: bool
    [B, N]; positive_index: int64 [B, N] or None; work: (order, counts) from work_order(mask), or None to compute
    it here. Returns (loss, lse): fp32 [B, N], zero on unmasked rows."""
    B, N, D = student.shape
    loss = torch.empty(B, N, device=student.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    if B == 0:
        return loss, lse
    order, counts = work if work is not None else work_order(mask)
    pos, p_sb, p_sn, inv_tau, flags = _common(student, teacher, positive_index, temperature, normalize)
    bm, bn, bd, warps = _blocks(D, N)
    grid = (triton.cdiv(N, bm), B)
    _patch_contrast_fwd_kernel[grid](
        student,
        *student.stride(),
        teacher,
        *teacher.stride(),
        order,
        counts,
        pos,
        p_sb,
        p_sn,
        loss,
        lse,
        N,
        D,
        inv_tau,
        NORM_EPS,
        **flags,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        num_warps=warps,
    )
    return loss, lse


def patch_contrast_backward(
    grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher, work=None
):
    """Launch the backward kernels. grad: [B, N] float (any strides, expanded allowed); lse and work (or None)
    from the forward.
    Returns (d_student [B, N, D] contiguous in the input dtype, d_teacher likewise or None)."""
    B, N, D = student.shape
    ds = torch.empty(B, N, D, device=student.device, dtype=student.dtype)
    dt = torch.empty_like(ds) if need_teacher else None
    if B == 0:
        return ds, dt
    order, counts = work if work is not None else work_order(mask)
    pos, p_sb, p_sn, inv_tau, flags = _common(student, teacher, positive_index, temperature, normalize)
    bm, bn, bd, warps = _blocks(D, N)
    args = (
        student,
        *student.stride(),
        teacher,
        *teacher.stride(),
        order,
        counts,
        pos,
        p_sb,
        p_sn,
        lse,
        grad,
        *grad.stride(),
    )
    _patch_contrast_bwd_q_kernel[(triton.cdiv(N, bm), B)](
        *args,
        ds,
        N,
        D,
        inv_tau,
        NORM_EPS,
        **flags,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        num_warps=warps,
    )
    if need_teacher:
        _patch_contrast_bwd_k_kernel[(triton.cdiv(N, bn), B)](
            *args,
            dt,
            N,
            D,
            inv_tau,
            NORM_EPS,
            **flags,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_D=bd,
            num_warps=warps,
        )
    return ds, dt
