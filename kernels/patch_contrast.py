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
def _squares(x):
    """Row sums of squares (fp32) of a tile."""
    xf = x.to(tl.float32)
    return tl.sum(xf * xf, axis=1)


@triton.jit
def _norms(sq, eps, NORMALIZE: tl.constexpr):
    """(row L2 norms, clamped inverse norms) from the rows' sums of squares, or ones when not normalising."""
    if NORMALIZE:
        nrm = tl.sqrt(sq)
        return nrm, 1.0 / tl.maximum(nrm, eps)
    else:
        one = sq * 0.0 + 1.0
        return one, one


@triton.jit
def _row_norms(
    ptr,
    sb,
    sn,
    sd,
    b,
    row_idx,
    ok,
    D,
    eps,
    NORMALIZE: tl.constexpr,
    F32_DOTS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
):
    """(norms, clamped inverse norms) of full-width rows, read chunk by chunk."""
    offs_d = tl.arange(0, BLOCK_D)
    sq = tl.zeros(ok.shape, dtype=tl.float32)
    if NORMALIZE:
        for c in range(D_CHUNKS):
            sq += _squares(_load_rows(ptr, row_idx, sb, sn, sd, b, c * BLOCK_D + offs_d, ok, D, F32_DOTS))
    return _norms(sq, eps, NORMALIZE)


@triton.jit
def _products(
    s_ptr,
    s_sb,
    s_sn,
    s_sd,
    q_rows,
    q_ok,
    t_ptr,
    t_sb,
    t_sn,
    t_sd,
    k_rows,
    k_ok,
    b,
    D,
    F32_DOTS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
):
    """(q k^T [queries, keys] over full-width rows, the queries' and the keys' sums of squares), accumulated
    over D_CHUNKS feature chunks of BLOCK_D, so no program holds more than one chunk of a row. The caller uses
    one of the two sums of squares (the other side's norms are known before the loop); the compiler drops the
    other."""
    offs_d = tl.arange(0, BLOCK_D)
    raw = tl.zeros([q_ok.shape[0], k_ok.shape[0]], dtype=tl.float32)
    q_sq = tl.zeros(q_ok.shape, dtype=tl.float32)
    k_sq = tl.zeros(k_ok.shape, dtype=tl.float32)
    for c in range(D_CHUNKS):  # a loop, not unrolled: the pipeliner stages one chunk at a time
        q = _load_rows(s_ptr, q_rows, s_sb, s_sn, s_sd, b, c * BLOCK_D + offs_d, q_ok, D, F32_DOTS)
        k = _load_rows(t_ptr, k_rows, t_sb, t_sn, t_sd, b, c * BLOCK_D + offs_d, k_ok, D, F32_DOTS)
        raw = _dot(q, tl.trans(k), raw, F32_DOTS)
        q_sq += _squares(q)
        k_sq += _squares(k)
    return raw, q_sq, k_sq


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
def _positives(pos_ptr, p_sb, p_sn, b, row_idx, valid, HAS_POS: tl.constexpr):
    """Key index of each query's positive: positive_index[b, row] or the row itself."""
    if HAS_POS:
        return tl.load(pos_ptr + b * p_sb + row_idx * p_sn, mask=valid, other=0)
    else:
        return row_idx


@triton.jit
def _dot(a, b, acc, F32_DOTS: tl.constexpr):
    if F32_DOTS:
        return tl.dot(a, b, acc=acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc=acc)


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
def _negatives(cos, inv_tau, lse, pos, offs_n, ok):
    """(softmax of one tile, recomputed from the saved logsumexp, with each row's positive and the tile's
    invalid entries zeroed; where the positive is)."""
    p = tl.exp(cos * inv_tau - lse[:, None])
    onehot = offs_n[None, :] == pos[:, None]
    return tl.where(ok & ~onehot, p, 0.0), onehot


@triton.jit
def _normalize_backward(x, dxh, proj, nrm, inv, eps):
    """Gradient w.r.t. x of x / max(|x|, eps), given the gradient dxh w.r.t. the normalised rows (one chunk of
    them) and proj = x_hat . dxh over the full rows."""
    xh = x.to(tl.float32) * inv[:, None]
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
    D_CHUNKS: tl.constexpr,
):
    b, idle, in_n, row_idx, valid = _query_block(order_ptr, counts_ptr, N, BLOCK_M)
    out_off = b * N + row_idx
    if idle:
        zero = tl.zeros([BLOCK_M], dtype=tl.float32)
        tl.store(loss_ptr + out_off, zero, mask=in_n)
        tl.store(lse_ptr + out_off, zero, mask=in_n)
    else:
        _qn, inv_qn = _row_norms(
            s_ptr, s_sb, s_sn, s_sd, b, row_idx, valid, D, eps, NORMALIZE, F32_DOTS, BLOCK_D, D_CHUNKS
        )
        row_scale = inv_qn * inv_tau
        pos = _positives(pos_ptr, p_sb, p_sn, b, row_idx, valid, HAS_POS)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        pos_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            raw, _q_sq, k_sq = _products(
                s_ptr, s_sb, s_sn, s_sd, row_idx, valid, t_ptr, t_sb, t_sn, t_sd, offs_n, col_ok, b, D,
                F32_DOTS, BLOCK_D, D_CHUNKS,
            )  # fmt: skip
            _kn, inv_kn = _norms(k_sq, eps, NORMALIZE)
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
    D_CHUNKS: tl.constexpr,
):
    b, idle, in_n, row_idx, valid = _query_block(order_ptr, counts_ptr, N, BLOCK_M)
    chunk = tl.program_id(2)  # this program writes feature columns [chunk * BLOCK_D, (chunk + 1) * BLOCK_D)
    offs_d = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    out_ptrs = ds_ptr + (b * N + row_idx[:, None]) * D + offs_d[None, :]
    out_mask = in_n[:, None] & (offs_d[None, :] < D)
    if idle:
        tl.store(
            out_ptrs,
            tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32).to(ds_ptr.dtype.element_ty),
            mask=out_mask,
        )
    else:
        qn, inv_qn = _row_norms(
            s_ptr, s_sb, s_sn, s_sd, b, row_idx, valid, D, eps, NORMALIZE, F32_DOTS, BLOCK_D, D_CHUNKS
        )
        pos = _positives(pos_ptr, p_sb, p_sn, b, row_idx, valid, HAS_POS)
        lse = tl.load(lse_ptr + b * N + row_idx, mask=valid, other=0.0)
        g = tl.load(g_ptr + b * g_sb + row_idx * g_sn, mask=valid, other=0.0).to(tl.float32)
        g = tl.where(valid, g, 0.0) * inv_tau
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        rest = tl.zeros([BLOCK_M], dtype=tl.float32)  # 1 - p_pos, summed over the negatives
        proj = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum of p cos over the negatives
        pos_cos = tl.zeros([BLOCK_M], dtype=tl.float32)
        pos_inv_kn = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            raw, _q_sq, k_sq = _products(
                s_ptr, s_sb, s_sn, s_sd, row_idx, valid, t_ptr, t_sb, t_sn, t_sd, offs_n, col_ok, b, D,
                F32_DOTS, BLOCK_D, D_CHUNKS,
            )  # fmt: skip
            _kn, inv_kn = _norms(k_sq, eps, NORMALIZE)
            cos = raw * inv_qn[:, None] * inv_kn[None, :]
            p, onehot = _negatives(cos, inv_tau, lse, pos, offs_n, col_ok[None, :])
            rest += tl.sum(p, axis=1)
            proj += tl.sum(p * cos, axis=1)
            pos_cos += tl.sum(tl.where(onehot, cos, 0.0), axis=1)
            pos_inv_kn += tl.sum(tl.where(onehot, inv_kn[None, :], 0.0), axis=1)
            k = _load_rows(t_ptr, offs_n, t_sb, t_sn, t_sd, b, offs_d, col_ok, D, F32_DOTS)  # from L1
            dq = _dot_grad(dq, g[:, None] * p * inv_kn[None, :], k, F32_DOTS)
        # The positive's term g (p_pos - 1) / tau is -g / tau times the sum of the other probabilities: exact
        # where p_pos ~ 1, unlike 1 - exp(logit - lse) with lse rounded to fp32 (issue 13, item 4).
        kp = _load_rows(t_ptr, pos, t_sb, t_sn, t_sd, b, offs_d, valid, D, F32_DOTS)
        dq -= (g * rest * pos_inv_kn)[:, None] * kp.to(tl.float32)
        tl.store(rest_ptr + b * N + row_idx, rest, mask=valid & (chunk == 0))
        # dq is this chunk of the gradient w.r.t. q_hat = q / |q|; apply the Jacobian of the normalisation,
        # whose projection q_hat . dq_hat over the full row is g (sum of p cos over the negatives - rest cos_pos)
        if NORMALIZE:
            q = _load_rows(s_ptr, row_idx, s_sb, s_sn, s_sd, b, offs_d, valid, D, F32_DOTS)
            dq = _normalize_backward(q, dq, g * (proj - rest * pos_cos), qn, inv_qn, eps)
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
    D_CHUNKS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)  # this program writes feature columns [chunk * BLOCK_D, (chunk + 1) * BLOCK_D)
    cnt = tl.load(counts_ptr + b)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    offs_d = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    kn, inv_kn = _row_norms(
        t_ptr, t_sb, t_sn, t_sd, b, offs_n, col_ok, D, eps, NORMALIZE, F32_DOTS, BLOCK_D, D_CHUNKS
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    proj = tl.zeros([BLOCK_N], dtype=tl.float32)  # k_hat . dk_hat: sum over queries of the weights times cos
    for m0 in range(0, cnt, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        valid = offs_m < cnt
        row_idx = tl.load(order_ptr + b * N + offs_m, mask=valid, other=0)
        raw, q_sq, _k_sq = _products(
            s_ptr, s_sb, s_sn, s_sd, row_idx, valid, t_ptr, t_sb, t_sn, t_sd, offs_n, col_ok, b, D,
            F32_DOTS, BLOCK_D, D_CHUNKS,
        )  # fmt: skip
        _qn, inv_qn = _norms(q_sq, eps, NORMALIZE)
        pos = _positives(pos_ptr, p_sb, p_sn, b, row_idx, valid, HAS_POS)
        lse = tl.load(lse_ptr + b * N + row_idx, mask=valid, other=0.0)
        g = tl.load(g_ptr + b * g_sb + row_idx * g_sn, mask=valid, other=0.0).to(tl.float32)
        g = tl.where(valid, g, 0.0) * inv_tau
        rest = tl.load(rest_ptr + b * N + row_idx, mask=valid, other=0.0)  # 1 - p_pos, from bwd_q
        ok = valid[:, None] & col_ok[None, :]
        cos = raw * inv_qn[:, None] * inv_kn[None, :]
        p, onehot = _negatives(cos, inv_tau, lse, pos, offs_n, ok)
        w = g[:, None] * tl.where(onehot & ok, -rest[:, None], p)
        proj += tl.sum(w * cos, axis=0)
        q = _load_rows(s_ptr, row_idx, s_sb, s_sn, s_sd, b, offs_d, valid, D, F32_DOTS)  # from L1
        dk = _dot_grad(dk, tl.trans(w * inv_qn[:, None]), q, F32_DOTS)
    if NORMALIZE:  # the key rows are read again (from L2) rather than kept in registers across the loop
        k = _load_rows(t_ptr, offs_n, t_sb, t_sn, t_sd, b, offs_d, col_ok, D, F32_DOTS)
        dk = _normalize_backward(k, dk, proj, kn, inv_kn, eps)
    out_ptrs = dt_ptr + (b * N + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(out_ptrs, dk.to(dt_ptr.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_d: int  # feature chunk: a program holds at most this many columns of any row
    warps: int


# Tiles per kernel and product precision, by the feature width d: first row whose bound covers d wins. Chosen
# from the sm_90 static profile (python -m benchmarks static). A [rows, BLOCK_D] fp32 accumulator over 4 warps
# costs rows * BLOCK_D / 128 registers per thread, so the backward's accumulating kernels take fewer rows than
# the forward, and rows wider than 256 are cut into chunks of BLOCK_D: the products loop over them (a loop, so
# the pipeliner stages one chunk: unrolled, it staged all of them, 214-524 KB of shared memory at d = 2048), and
# each backward program writes one chunk of its gradient rows, recomputing the logits over every chunk (d / 128
# times the logits' work: compute-bound by the estimate at d >= 768, issue 13 item 3, open).
_TILES = {
    "low": (
        (128, dict(fwd=Tiles(64, 64, 128, 4), bwd_q=Tiles(16, 16, 128, 4), bwd_k=Tiles(16, 32, 128, 4))),
        # fwd: 64-row wgmma per warpgroup, ~90 registers; bwd_q: a 16 x 256 accumulator (32 registers) leaves
        # room for the positive's row and the query rows in the epilogue (~180 registers); bwd_k: 32 keys x 256
        # (~180 registers), 16 queries per step.
        (256, dict(fwd=Tiles(64, 32, 256, 4), bwd_q=Tiles(16, 16, 256, 4), bwd_k=Tiles(16, 32, 256, 4))),
        # d = 384: three chunks of 128, no padded columns; 32-wide logits tiles give each of the 4 warps its
        # own 16 x 8 MMA (16 x 16 over 4 warps computes each product twice) and keep bwd_q memory-bound.
        (512, dict(fwd=Tiles(64, 32, 128, 4), bwd_q=Tiles(16, 32, 128, 4), bwd_k=Tiles(16, 32, 128, 4))),
        # d = 768-2048, chunks of 128: bwd_q at 16 x 32 spilled (3 stores at d = 2048), so 16 x 16; bwd_k takes
        # 32 queries x 16 keys (16 x 32 spilled 1 store), no replicated MMA.
        (1 << 31, dict(fwd=Tiles(64, 32, 128, 4), bwd_q=Tiles(16, 16, 128, 4), bwd_k=Tiles(32, 16, 128, 4))),
    ),
    "f32": (
        (128, dict(fwd=Tiles(64, 64, 128, 4), bwd_q=Tiles(64, 64, 128, 4), bwd_k=Tiles(64, 64, 128, 4))),
        # IEEE fp32 products run as FFMA with both operands in registers: small tiles; 8 warps in the backward
        # halve each thread's share of the accumulator (spill-free on Triton 3.6 and 3.8 at d = 256).
        (256, dict(fwd=Tiles(32, 32, 256, 4), bwd_q=Tiles(16, 16, 256, 8), bwd_k=Tiles(16, 16, 256, 8))),
        # chunks of 128; bwd_k on 8 warps spilled 5 stores at d = 768 (80 registers), on 4 none
        (1 << 31, dict(fwd=Tiles(32, 32, 128, 8), bwd_q=Tiles(16, 16, 128, 8), bwd_k=Tiles(16, 16, 128, 4))),
    ),
}
# Under the interpreter: 16 x 16 tiles (its cost grows with the tile, not with the grid) and chunks of 32
# columns, so the tests' d = 40 and 100 take the chunked path.
_INTERPRETER_TILES = Tiles(16, 16, 32, 1)
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
    if interpreting():
        tiles = _INTERPRETER_TILES
    else:
        tiles = next(t for bound, t in _TILES["f32" if f32_dots else "low"] if bound >= D)[kernel]
    block_d = min(tiles.block_d, max(16, triton.next_power_of_2(D)))
    const = dict(
        HAS_POS=has_pos,
        NORMALIZE=bool(normalize),
        F32_DOTS=f32_dots,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_D=block_d,
        D_CHUNKS=max(1, triton.cdiv(D, block_d)),
    )
    return const, tiles.warps


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
        KERNELS[kernel][(triton.cdiv(N, rows), B, const["D_CHUNKS"])](
            *args, out, N, D, 1.0 / float(temperature), NORM_EPS, **const, num_warps=warps
        )
    return ds, dt
