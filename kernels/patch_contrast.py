"""Triton kernels for the ConMIM patch-contrast loss, and their launchers.

Work is indexed by ``order`` [B, N] (each image's masked patches first, in index order) and ``counts`` [B]
(masked patches per image), both computed on the device, so no launch depends on a host-side count.
Each program owns BLOCK_M rows of ``order`` of one image and the full feature width (BLOCK_D = next power of two
of d) and streams the image's keys in tiles of BLOCK_N:

- forward: logits = (s . t) / (|s| |t|) / tau tile by tile, an online logsumexp, the positive's logit picked on
  the fly; writes loss and lse for its rows (zeros for rows that are not masked);
- backward (queries): recompute each tile, G = g softmax / tau over the negatives, dq += G t_hat, and sum the
  negatives' probabilities: the positive's term g (p - 1) / tau is -g / tau times that sum (no cancellation
  when p ~ 1), applied with the positive's row after the loop and saved for the keys' kernel; then the L2
  Jacobian; writes every row of d(student) (zeros for unmasked rows);
- backward (keys, only when the teacher needs a gradient): one program per BLOCK_N keys loops over the masked
  query tiles of its image and accumulates dk += G^T s_hat, then the L2 Jacobian.

Arithmetic is fp32 (logsumexp and accumulators always). bf16/fp16 tiles go to tl.dot in their own dtype on a
GPU (tensor cores, fp32 accumulate; the fp32 gradient tile as a high part plus residual in that dtype); fp32 tiles,
and a student and teacher of different dtypes, use IEEE fp32 dots; under TRITON_INTERPRET everything is cast to
fp32 first (the interpreter's low-precision arithmetic is wrong).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from conmim.kernels import interpreting
from conmim.order import work_order

NORM_EPS = 1e-12  # as torch.nn.functional.normalize


@triton.jit
def _load_rows(ptr, row_idx, sb, sn, sd, b, offs_d, row_ok, D, F32_DOTS: tl.constexpr):
    # int64 row offsets: key rows come from tl.arange (int32), and a strided view can put B*N*D past 2^31
    p = ptr + b * sb + row_idx.to(tl.int64)[:, None] * sn + offs_d[None, :] * sd
    x = tl.load(p, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if F32_DOTS:
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
    F32_DOTS: tl.constexpr,
):
    """A tile of rows [rows, BLOCK_D] with its row norms and clamped inverse norms."""
    q = _load_rows(s_ptr, row_idx, s_sb, s_sn, s_sd, b, offs_d, valid, D, F32_DOTS)
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
def _dot(a, b, F32_DOTS: tl.constexpr):
    if F32_DOTS:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_grad(acc, g, x, F32_DOTS: tl.constexpr):
    """acc + g x for an fp32 gradient tile g. Its positive entries carry most of the gradient, so g is not
    rounded to the features' dtype: on tensor cores it is split into a high part and the residual, both in that
    dtype (16 bits of mantissa together for bf16, 22 for fp16), two MMAs on the same feature tile."""
    if F32_DOTS:
        return tl.dot(g, x, acc=acc, input_precision="ieee")
    else:
        hi = g.to(x.dtype)
        lo = (g - hi.to(tl.float32)).to(x.dtype)
        return tl.dot(lo, x, acc=tl.dot(hi, x, acc=acc))


@triton.jit
def _negatives(q, k, row_scale, inv_kn, lse, pos, offs_n, ok, F32_DOTS: tl.constexpr):
    """(softmax of one tile, recomputed from the saved logsumexp, with each row's positive and the tile's
    invalid entries zeroed; where the positive is)."""
    logits = _dot(q, tl.trans(k), F32_DOTS) * row_scale[:, None] * inv_kn[None, :]
    p = tl.exp(logits - lse[:, None])
    onehot = offs_n[None, :] == pos[:, None]
    return tl.where(ok & ~onehot, p, 0.0), onehot


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
    F32_DOTS: tl.constexpr,
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
            s_ptr, s_sb, s_sn, s_sd, b, row_idx, valid, offs_d, D, eps, NORMALIZE, F32_DOTS
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
                t_ptr, t_sb, t_sn, t_sd, b, offs_n, col_ok, offs_d, D, eps, NORMALIZE, F32_DOTS
            )
            raw = _dot(q, tl.trans(k), F32_DOTS)
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
    rest_ptr,
    ds_ptr,
    N,
    D,
    inv_tau,
    eps,
    HAS_POS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    F32_DOTS: tl.constexpr,
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
            s_ptr, s_sb, s_sn, s_sd, b, row_idx, valid, offs_d, D, eps, NORMALIZE, F32_DOTS
        )
        row_scale = inv_qn * inv_tau
        pos = _positives(pos_ptr, p_sb, p_sn, b, row_idx, valid, HAS_POS)
        lse = tl.load(lse_ptr + b * N + row_idx, mask=valid, other=0.0)
        g = tl.load(g_ptr + b * g_sb + row_idx * g_sn, mask=valid, other=0.0).to(tl.float32)
        g = tl.where(valid, g, 0.0) * inv_tau
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        rest = tl.zeros([BLOCK_M], dtype=tl.float32)  # 1 - p_pos, summed over the negatives
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            k, _kn, inv_kn = _rows_with_norms(
                t_ptr, t_sb, t_sn, t_sd, b, offs_n, col_ok, offs_d, D, eps, NORMALIZE, F32_DOTS
            )
            p, _onehot = _negatives(q, k, row_scale, inv_kn, lse, pos, offs_n, col_ok[None, :], F32_DOTS)
            rest += tl.sum(p, axis=1)
            dq = _dot_grad(dq, g[:, None] * p * inv_kn[None, :], k, F32_DOTS)
        # The positive's term g (p_pos - 1) / tau is -g / tau times the sum of the other probabilities: exact
        # where p_pos ~ 1, unlike 1 - exp(logit - lse) with lse rounded to fp32 (issue 13, item 4).
        kp, _kpn, inv_kpn = _rows_with_norms(
            t_ptr, t_sb, t_sn, t_sd, b, pos, valid, offs_d, D, eps, NORMALIZE, F32_DOTS
        )
        dq -= (g * rest * inv_kpn)[:, None] * kp.to(tl.float32)
        tl.store(rest_ptr + b * N + row_idx, rest, mask=valid)
        # dq is the gradient w.r.t. q_hat = q / |q|; apply the Jacobian of the normalisation. The rows are read
        # again (from L2) rather than kept in registers across the key loop.
        if NORMALIZE:
            q, qn, inv_qn = _rows_with_norms(
                s_ptr, s_sb, s_sn, s_sd, b, row_idx, valid, offs_d, D, eps, NORMALIZE, F32_DOTS
            )
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
    rest_ptr,
    dt_ptr,
    N,
    D,
    inv_tau,
    eps,
    HAS_POS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    F32_DOTS: tl.constexpr,
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
        t_ptr, t_sb, t_sn, t_sd, b, offs_n, col_ok, offs_d, D, eps, NORMALIZE, F32_DOTS
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, cnt, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        valid = offs_m < cnt
        row_idx = tl.load(order_ptr + b * N + offs_m, mask=valid, other=0)
        q, _qn, inv_qn = _rows_with_norms(
            s_ptr, s_sb, s_sn, s_sd, b, row_idx, valid, offs_d, D, eps, NORMALIZE, F32_DOTS
        )
        pos = _positives(pos_ptr, p_sb, p_sn, b, row_idx, valid, HAS_POS)
        lse = tl.load(lse_ptr + b * N + row_idx, mask=valid, other=0.0)
        g = tl.load(g_ptr + b * g_sb + row_idx * g_sn, mask=valid, other=0.0).to(tl.float32)
        g = tl.where(valid, g, 0.0) * inv_tau
        rest = tl.load(rest_ptr + b * N + row_idx, mask=valid, other=0.0)  # 1 - p_pos, from bwd_q
        ok = valid[:, None] & col_ok[None, :]
        p, onehot = _negatives(q, k, inv_qn * inv_tau, inv_kn, lse, pos, offs_n, ok, F32_DOTS)
        gl = g[:, None] * tl.where(onehot & ok, -rest[:, None], p) * inv_qn[:, None]
        dk = _dot_grad(dk, tl.trans(gl), q, F32_DOTS)
    if NORMALIZE:  # the key rows are read again (from L2) rather than kept in registers across the loop
        k, kn, inv_kn = _rows_with_norms(
            t_ptr, t_sb, t_sn, t_sd, b, offs_n, col_ok, offs_d, D, eps, NORMALIZE, F32_DOTS
        )
        dk = _normalize_backward(k, dk, kn, inv_kn, eps)
    out_ptrs = dt_ptr + (b * N + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(out_ptrs, dk.to(dt_ptr.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    warps: int


# Tiles per kernel and product precision, by BLOCK_D (the feature width rounded up to a power of two; every
# program holds full-width rows). First row whose bound covers BLOCK_D wins. Chosen from the sm_90 static profile
# (python -m benchmarks static): a [rows, BLOCK_D] fp32 accumulator over 4 warps costs rows * BLOCK_D / 128
# registers per thread, so the backward's accumulating kernels take fewer rows than the forward.
_TILES = {
    "low": (
        (128, dict(fwd=Tiles(64, 64, 4), bwd_q=Tiles(16, 16, 4), bwd_k=Tiles(16, 32, 4))),
        # fwd: 64-row wgmma per warpgroup, 80 registers; bwd_q: a 16 x 256 accumulator (32 registers) leaves
        # room for the positive's row and the query rows in the epilogue (~170 registers, 32 rows spill with
        # fp16); bwd_k: 32 keys x 256 (233 registers), 16 queries per step.
        (256, dict(fwd=Tiles(64, 32, 4), bwd_q=Tiles(16, 16, 4), bwd_k=Tiles(16, 32, 4))),
        # 64-row forward tiles need 131 KB of shared memory here (one block per SM): 32 rows over 8 warps keep
        # 16 warps resident. The backward spills in its epilogue at any tile (issue 13: tile the feature dim).
        (512, dict(fwd=Tiles(32, 32, 8), bwd_q=Tiles(16, 16, 4), bwd_k=Tiles(16, 16, 4))),
        # Full-width rows do not fit the register file: spills and replicated warps until the feature
        # dimension is tiled (issue 13, item 3, open).
        (2048, dict(fwd=Tiles(16, 16, 8), bwd_q=Tiles(16, 16, 8), bwd_k=Tiles(16, 16, 8))),
    ),
    "f32": (
        (128, dict(fwd=Tiles(64, 64, 4), bwd_q=Tiles(64, 64, 4), bwd_k=Tiles(64, 64, 4))),
        # IEEE fp32 products run as FFMA with both operands in registers: small tiles; 8 warps in the backward
        # halve each thread's share of the accumulator (bwd_q spill-free; bwd_k still spills, open).
        (256, dict(fwd=Tiles(32, 32, 4), bwd_q=Tiles(16, 16, 8), bwd_k=Tiles(16, 16, 8))),
        (512, dict(fwd=Tiles(32, 32, 8), bwd_q=Tiles(32, 32, 8), bwd_k=Tiles(32, 32, 8))),
        (2048, dict(fwd=Tiles(16, 16, 8), bwd_q=Tiles(16, 16, 8), bwd_k=Tiles(16, 16, 8))),
    ),
}
KERNELS = {
    "fwd": _patch_contrast_fwd_kernel,
    "bwd_q": _patch_contrast_bwd_q_kernel,
    "bwd_k": _patch_contrast_bwd_k_kernel,
}


def launch_meta(kernel: str, student_dtype, teacher_dtype, D: int, has_pos: bool, normalize: bool):
    """(constexpr arguments, num_warps) of one kernel ("fwd", "bwd_q" or "bwd_k") for these inputs; shared by
    the launchers and the static profile (benchmarks/static.py), so both compile the same binaries.

    Products run in fp32 (IEEE) for fp32 features, for a student and teacher of different dtypes (tl.dot needs
    one operand dtype) and under the interpreter; bf16/fp16 pairs use tensor cores in their own dtype."""
    f32_dots = interpreting() or student_dtype == torch.float32 or student_dtype != teacher_dtype
    block_d = max(16, triton.next_power_of_2(D))
    table = _TILES["f32" if f32_dots else "low"]
    tiles = next(t for bound, t in table if block_d <= bound)[kernel]
    # the interpreter's cost grows with the tile, not with the grid
    bm, bn = (16, 16) if interpreting() else (tiles.block_m, tiles.block_n)
    const = dict(
        HAS_POS=has_pos, NORMALIZE=bool(normalize), F32_DOTS=f32_dots, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d
    )
    return const, tiles.warps if not interpreting() else 1


def _positive_args(student, positive_index):
    if positive_index is None:
        return student.new_empty(0, dtype=torch.int64), 0, 0
    return positive_index, positive_index.stride(0), positive_index.stride(1)


def patch_contrast_forward(student, teacher, mask, positive_index, temperature, normalize, work=None):
    """Launch the forward kernel. student/teacher: [B, N, D] fp32/bf16/fp16 (dtypes may differ) on one GPU (any
    strides); mask: bool [B, N]; positive_index: int64 [B, N] or None; work: (order, counts) from
    work_order(mask), or None to compute it here. Returns (loss, lse): fp32 [B, N], zero on
    unmasked rows."""
    B, N, D = student.shape
    loss = torch.empty(B, N, device=student.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    if B == 0:
        return loss, lse
    order, counts = work if work is not None else work_order(mask)
    pos, p_sb, p_sn = _positive_args(student, positive_index)
    const, warps = launch_meta("fwd", student.dtype, teacher.dtype, D, positive_index is not None, normalize)
    _patch_contrast_fwd_kernel[(triton.cdiv(N, const["BLOCK_M"]), B)](
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
        1.0 / float(temperature),
        NORM_EPS,
        **const,
        num_warps=warps,
    )
    return loss, lse


def patch_contrast_backward(
    grad, student, teacher, mask, positive_index, lse, temperature, normalize, need_teacher, work=None
):
    """Launch the backward kernels. grad: [B, N] float (any strides, expanded allowed); lse and work (or None)
    from the forward.
    Returns (d_student [B, N, D] contiguous in the student's dtype, d_teacher likewise in the teacher's dtype,
    or None)."""
    B, N, D = student.shape
    ds = torch.empty(B, N, D, device=student.device, dtype=student.dtype)
    dt = torch.empty(B, N, D, device=teacher.device, dtype=teacher.dtype) if need_teacher else None
    if B == 0:
        return ds, dt
    order, counts = work if work is not None else work_order(mask)
    pos, p_sb, p_sn = _positive_args(student, positive_index)
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
        torch.empty(B, N, device=student.device, dtype=torch.float32),  # 1 - p_pos: written by bwd_q
    )
    kernels = ("bwd_q", "bwd_k") if need_teacher else ("bwd_q",)
    for kernel, out in zip(kernels, (ds, dt)):
        const, warps = launch_meta(
            kernel, student.dtype, teacher.dtype, D, positive_index is not None, normalize
        )
        rows = const["BLOCK_M"] if kernel == "bwd_q" else const["BLOCK_N"]
        KERNELS[kernel][(triton.cdiv(N, rows), B)](
            *args, out, N, D, 1.0 / float(temperature), NORM_EPS, **const, num_warps=warps
        )
    return ds, dt
