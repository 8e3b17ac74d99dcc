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

Rows wider than BLOCK_D are cut into chunks: the products loop over them, and each backward program writes
one chunk of its gradient rows. From four chunks on (on a GPU: d >= 512 in bf16/fp16, 128 with fp32
products) and where w is no larger than a feature tensor (stored_fits), the backward recomputes nothing per chunk: bwd_w computes the logits once
and stores their gradient w (fp32, work-order rows by keys) with the rows' and keys' norms and projections,
then bwd_wq (d(student)) and bwd_wk (d(teacher)) multiply w into each chunk of the features
(backward_kernels picks; see the tiles' table).

Arithmetic is fp32 (logsumexp and accumulators always). bf16/fp16 tiles go to tl.dot in their own dtype on a
GPU (tensor cores, fp32 accumulate; the fp32 gradient tile as a high part plus residual in that dtype); fp32
tiles, and a student and teacher of different dtypes, go to tensor cores as 3xTF32 (fp32-level error, see _dot);
under TRITON_INTERPRET everything is cast to fp32 first (the interpreter's bf16 arithmetic is wrong), except in
the tests that supply IEEE bf16 (INTERPRET_16BIT_DOTS).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from conmim.kernels import interpreting
from conmim.limits import exact_logits
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
def _inverse(nrm, eps):
    """Clamped inverse norms, as x / max(|x|, eps) divides."""
    return 1.0 / tl.maximum(nrm, eps)


@triton.jit
def _norms(sq, eps, NORMALIZE: tl.constexpr):
    """(row L2 norms, clamped inverse norms) from the rows' sums of squares, or ones when not normalising."""
    if NORMALIZE:
        nrm = tl.sqrt(sq)
        return nrm, _inverse(nrm, eps)
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
    EXACT_LOGITS: tl.constexpr,
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
        raw = _dot_logits(q, tl.trans(k), raw, F32_DOTS, EXACT_LOGITS)
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
def _positive_index(pos_ptr, p_sb, p_sn, b, row_idx, valid, HAS_POS: tl.constexpr):
    """positive_index[b, row] or the row itself, unchecked: only for comparing with key indices (an index out of
    range matches no key), never for addressing; see _positives."""
    if HAS_POS:
        return tl.load(pos_ptr + b * p_sb + row_idx * p_sn, mask=valid, other=0)
    else:
        return row_idx


@triton.jit
def _positives(pos_ptr, p_sb, p_sn, b, row_idx, valid, N, HAS_POS: tl.constexpr):
    """(key index of each query's positive: positive_index[b, row] or the row itself; whether that index lies
    outside [0, N)). The host cannot check the indices under torch.compile or graph capture, so an index out of
    range is replaced by 0 (nothing outside the keys is read or written) and its row is flagged: the kernels
    give that row a NaN loss and a NaN gradient instead of another row's values."""
    pos = _positive_index(pos_ptr, p_sb, p_sn, b, row_idx, valid, HAS_POS)
    if HAS_POS:
        bad = valid & ((pos < 0) | (pos >= N))
        return tl.where(bad, 0, pos), bad
    else:
        return pos, pos < 0


@triton.jit
def _dot(a, b, acc, F32_DOTS: tl.constexpr):
    """acc + a b. fp32 operands go to tensor cores as 3xTF32: each operand is split into a TF32 high part and
    the TF32-rounded residual, and hi*hi + hi*lo + lo*hi (the lo*lo term is below 2^-22 of the product) are
    summed in fp32. The operands keep 21-22 of fp32's 24 bits against TF32's 11, so the products' error is
    that of fp32 arithmetic over these short dot products (d <= 1024), far below plain TF32's ~2^-11 relative
    (tests/test_accuracy.py's float64 rule catches the latter on a GPU). The interpreter ignores the
    precision and multiplies in fp32."""
    if F32_DOTS:
        return tl.dot(a, b, acc=acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc=acc)


@triton.jit
def _dot_logits(a, b, acc, F32_DOTS: tl.constexpr, EXACT_LOGITS: tl.constexpr):
    """acc + a b for the logits: as _dot, but in plain fp32 (FMA) where 3xTF32's error, scaled by large logits,
    would break the float64 rule (EXACT_LOGITS, chosen by launch_meta from the temperature and normalize)."""
    if F32_DOTS and EXACT_LOGITS:
        return tl.dot(a, b, acc=acc, input_precision="ieee")
    else:
        return _dot(a, b, acc, F32_DOTS)


@triton.jit
def _dot_grad(acc, g, x, F32_DOTS: tl.constexpr):
    """acc + g x for an fp32 gradient tile g. Its positive entries carry most of the gradient, so g is not
    rounded to the features' dtype: on tensor cores it is split into a high part and the residual, both in that
    dtype (16 bits of mantissa together for bf16, 22 for fp16), two MMAs on the same feature tile."""
    if F32_DOTS:
        return _dot(g, x, acc, F32_DOTS)
    elif x.dtype == tl.float16:
        # fp16 overflows above 65504 (hi = inf, lo = NaN): a tile whose largest entry passes 2^14 is split after
        # scaling (exact: a power of two), and its product scaled back; the accumulator is scaled with it rather
        # than a second one kept, which would cost a tile of registers
        big = tl.max(tl.abs(g), axis=1)
        e = tl.where(big > 16384.0, tl.ceil(tl.log2(tl.maximum(big, 16384.0))) - 14.0, 0.0)[:, None]
        down = tl.exp2(-e)
        gs = g * down
        hi = gs.to(x.dtype)
        lo = (gs - hi.to(tl.float32)).to(x.dtype)
        return tl.dot(lo, x, acc=tl.dot(hi, x, acc=acc * down)) * tl.exp2(e)
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
    EXACT_LOGITS: tl.constexpr,
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
        pos, bad = _positives(pos_ptr, p_sb, p_sn, b, row_idx, valid, N, HAS_POS)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        pos_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            raw, _q_sq, k_sq = _products(
                s_ptr, s_sb, s_sn, s_sd, row_idx, valid, t_ptr, t_sb, t_sn, t_sd, offs_n, col_ok, b, D,
                F32_DOTS, EXACT_LOGITS, BLOCK_D, D_CHUNKS,
            )  # fmt: skip
            _kn, inv_kn = _norms(k_sq, eps, NORMALIZE)
            logits = raw * row_scale[:, None] * inv_kn[None, :]
            logits = tl.where(col_ok[None, :], logits, float("-inf"))
            pos_logit += tl.sum(tl.where(offs_n[None, :] == pos[:, None], logits, 0.0), axis=1)
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
            m_i = m_new
        lse = m_i + tl.log(l_i)
        loss = tl.where(bad, float("nan"), lse - pos_logit)
        tl.store(loss_ptr + out_off, tl.where(valid, loss, 0.0), mask=in_n)
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
    EXACT_LOGITS: tl.constexpr,
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
        pos, bad = _positives(pos_ptr, p_sb, p_sn, b, row_idx, valid, N, HAS_POS)
        lse = tl.load(lse_ptr + b * N + row_idx, mask=valid, other=0.0)
        g = tl.load(g_ptr + b * g_sb + row_idx * g_sn, mask=valid, other=0.0).to(tl.float32)
        g = tl.where(valid, tl.where(bad, float("nan"), g), 0.0) * inv_tau
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
                F32_DOTS, EXACT_LOGITS, BLOCK_D, D_CHUNKS,
            )  # fmt: skip
            _kn, inv_kn = _norms(k_sq, eps, NORMALIZE)
            cos = raw * inv_qn[:, None] * inv_kn[None, :]
            p, onehot = _negatives(cos, inv_tau, lse, pos, offs_n, valid[:, None] & col_ok[None, :])
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
    EXACT_LOGITS: tl.constexpr,
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
            F32_DOTS, EXACT_LOGITS, BLOCK_D, D_CHUNKS,
        )  # fmt: skip
        _qn, inv_qn = _norms(q_sq, eps, NORMALIZE)
        pos, bad = _positives(pos_ptr, p_sb, p_sn, b, row_idx, valid, N, HAS_POS)
        lse = tl.load(lse_ptr + b * N + row_idx, mask=valid, other=0.0)
        g = tl.load(g_ptr + b * g_sb + row_idx * g_sn, mask=valid, other=0.0).to(tl.float32)
        g = tl.where(valid, tl.where(bad, float("nan"), g), 0.0) * inv_tau
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


@triton.jit
def _patch_contrast_bwd_w_kernel(
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
    w_ptr,
    qnorm_ptr,
    qproj_ptr,
    knorm_ptr,
    vpos_ptr,
    parts_ptr,
    N,
    D,
    inv_tau,
    eps,
    HAS_POS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    F32_DOTS: tl.constexpr,
    EXACT_LOGITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
):
    """The stored backward, first kernel: the logits once over the full rows, and the gradient w.r.t. the
    cosines, w[b, m, j] = g / tau (p - [j = positive]) for work-order row m and key j, written in fp32 (the
    positive's entry -g / tau times the sum of the negatives' probabilities, as in bwd_q). With it, per row m
    (work order): the query's norm and its projection q_hat . dq_hat; per key: its norm (the first program of the
    image writes them); per program, the column sums of w cos over its rows, and per row the positive's w cos
    (the keys' projections, summed by bwd_wk without a race)."""
    b, idle, _in_n, row_idx, valid = _query_block(order_ptr, counts_ptr, N, BLOCK_M)
    if not idle:
        pid_m = tl.program_id(0)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = b * N + offs_m  # work-order rows of the per-row outputs
        qn, inv_qn = _row_norms(
            s_ptr, s_sb, s_sn, s_sd, b, row_idx, valid, D, eps, NORMALIZE, F32_DOTS, BLOCK_D, D_CHUNKS
        )
        pos, bad = _positives(pos_ptr, p_sb, p_sn, b, row_idx, valid, N, HAS_POS)
        lse = tl.load(lse_ptr + b * N + row_idx, mask=valid, other=0.0)
        g = tl.load(g_ptr + b * g_sb + row_idx * g_sn, mask=valid, other=0.0).to(tl.float32)
        g = tl.where(valid, tl.where(bad, float("nan"), g), 0.0) * inv_tau
        rest = tl.zeros([BLOCK_M], dtype=tl.float32)  # 1 - p_pos, summed over the negatives
        proj = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum of p cos over the negatives
        pos_cos = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            raw, _q_sq, k_sq = _products(
                s_ptr, s_sb, s_sn, s_sd, row_idx, valid, t_ptr, t_sb, t_sn, t_sd, offs_n, col_ok, b, D,
                F32_DOTS, EXACT_LOGITS, BLOCK_D, D_CHUNKS,
            )  # fmt: skip
            kn, inv_kn = _norms(k_sq, eps, NORMALIZE)
            cos = raw * inv_qn[:, None] * inv_kn[None, :]
            p, onehot = _negatives(cos, inv_tau, lse, pos, offs_n, valid[:, None] & col_ok[None, :])
            rest += tl.sum(p, axis=1)
            proj += tl.sum(p * cos, axis=1)
            pos_cos += tl.sum(tl.where(onehot, cos, 0.0), axis=1)
            w = g[:, None] * p
            tile_ok = valid[:, None] & col_ok[None, :]
            # the positive's entry is written after the loop: no two threads store one address
            tl.store(w_ptr + rows[:, None] * N + offs_n[None, :], w, mask=tile_ok & ~onehot)
            if NORMALIZE:
                tl.store(parts_ptr + (b * tl.cdiv(N, BLOCK_M) + pid_m) * N + offs_n, tl.sum(w * cos, axis=0),
                         mask=col_ok)  # fmt: skip
                if pid_m == 0:
                    tl.store(knorm_ptr + b * N + offs_n, kn, mask=col_ok)
        w_pos = -g * rest
        tl.store(w_ptr + rows * N + pos, w_pos, mask=valid)
        if NORMALIZE:
            tl.store(vpos_ptr + rows, w_pos * pos_cos, mask=valid)
            tl.store(qnorm_ptr + rows, qn, mask=valid)
            tl.store(qproj_ptr + rows, g * (proj - rest * pos_cos), mask=valid)


@triton.jit
def _patch_contrast_bwd_wq_kernel(
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
    w_ptr,
    qnorm_ptr,
    qproj_ptr,
    knorm_ptr,
    ds_ptr,
    N,
    D,
    eps,
    NORMALIZE: tl.constexpr,
    F32_DOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The stored backward, d(student): one chunk of BLOCK_D columns of BLOCK_M rows per program,
    dq_hat = sum over keys of w k_hat (one product per key tile, no logits), then the normalisation's
    Jacobian with bwd_w's norm and projection of each row."""
    b, idle, in_n, row_idx, valid = _query_block(order_ptr, counts_ptr, N, BLOCK_M)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    out_ptrs = ds_ptr + (b * N + row_idx[:, None]) * D + offs_d[None, :]
    out_mask = in_n[:, None] & (offs_d[None, :] < D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if not idle:
        rows = b * N + offs_m
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            w = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=valid[:, None] & col_ok[None, :],
                        other=0.0)  # fmt: skip
            if NORMALIZE:
                w = w * _inverse(tl.load(knorm_ptr + b * N + offs_n, mask=col_ok, other=1.0), eps)[None, :]
            k = _load_rows(t_ptr, offs_n, t_sb, t_sn, t_sd, b, offs_d, col_ok, D, F32_DOTS)
            dq = _dot_grad(dq, w, k, F32_DOTS)
        if NORMALIZE:
            qn = tl.load(qnorm_ptr + rows, mask=valid, other=1.0)
            q = _load_rows(s_ptr, row_idx, s_sb, s_sn, s_sd, b, offs_d, valid, D, F32_DOTS)
            proj = tl.load(qproj_ptr + rows, mask=valid, other=0.0)
            dq = _normalize_backward(q, dq, proj, qn, _inverse(qn, eps), eps)
        dq = tl.where(valid[:, None], dq, 0.0)
    tl.store(out_ptrs, dq.to(ds_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _patch_contrast_bwd_wk_kernel(
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
    w_ptr,
    qnorm_ptr,
    knorm_ptr,
    vpos_ptr,
    parts_ptr,
    dt_ptr,
    N,
    D,
    eps,
    HAS_POS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    F32_DOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The stored backward, d(teacher): one chunk of BLOCK_D columns of BLOCK_N keys per program,
    dk_hat = sum over the masked queries of w q_hat, BLOCK_M of them per step (bwd_w's BLOCK_M, so each step
    also adds one row of bwd_w's column sums to the keys' projections), then the normalisation's Jacobian."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cnt = tl.load(counts_ptr + b)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if cnt > 0:  # else no query reaches these keys, and bwd_w wrote no key norms for the image
        proj = tl.zeros([BLOCK_N], dtype=tl.float32)  # k_hat . dk_hat
        for m0 in range(0, cnt, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            valid = offs_m < cnt
            rows = b * N + offs_m
            row_idx = tl.load(order_ptr + rows, mask=valid, other=0)
            w = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=valid[:, None] & col_ok[None, :],
                        other=0.0)  # fmt: skip
            if NORMALIZE:
                proj += tl.load(parts_ptr + (b * tl.cdiv(N, BLOCK_M) + m0 // BLOCK_M) * N + offs_n,
                                mask=col_ok, other=0.0)  # fmt: skip
                pos = _positive_index(pos_ptr, p_sb, p_sn, b, row_idx, valid, HAS_POS)
                v = tl.load(vpos_ptr + rows, mask=valid, other=0.0)
                proj += tl.sum(tl.where(offs_n[None, :] == pos[:, None], v[:, None], 0.0), axis=0)
                w = w * _inverse(tl.load(qnorm_ptr + rows, mask=valid, other=1.0), eps)[:, None]
            q = _load_rows(s_ptr, row_idx, s_sb, s_sn, s_sd, b, offs_d, valid, D, F32_DOTS)
            dk = _dot_grad(dk, tl.trans(w), q, F32_DOTS)
        if NORMALIZE:
            kn = tl.load(knorm_ptr + b * N + offs_n, mask=col_ok, other=1.0)
            k = _load_rows(t_ptr, offs_n, t_sb, t_sn, t_sd, b, offs_d, col_ok, D, F32_DOTS)
            dk = _normalize_backward(k, dk, proj, kn, _inverse(kn, eps), eps)
    out_ptrs = dt_ptr + (b * N + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(out_ptrs, dk.to(dt_ptr.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_d: int  # feature chunk: a program holds at most this many columns of any row
    warps: int


_STORED_LOW = dict(bwd_w=Tiles(64, 32, 128, 8), bwd_wq=Tiles(64, 32, 128, 4), bwd_wk=Tiles(64, 32, 128, 4))
# Tiles per kernel and product precision, by the feature width d: first row whose bound covers d wins. Chosen
# from the sm_90 static profile (python -m benchmarks static). A [rows, BLOCK_D] fp32 accumulator over 4 warps
# costs rows * BLOCK_D / 128 registers per thread, so the backward's accumulating kernels take fewer rows than
# the forward, and rows wider than 256 are cut into chunks of BLOCK_D: the products loop over them (a loop, so
# the pipeliner stages one chunk: unrolled, it staged all of them, 214-524 KB of shared memory at d = 2048).
# Each backward program writes one chunk of its gradient rows: bwd_q / bwd_k recompute the logits over every
# chunk for it, so from 4 chunks on the backward stores their gradient once instead (bwd_w, bwd_wq, bwd_wk;
# see backward_kernels).
_TILES = {
    "low": (
        (128, dict(fwd=Tiles(64, 64, 128, 4), bwd_q=Tiles(16, 16, 128, 4), bwd_k=Tiles(16, 32, 128, 4))),
        # fwd: 64-row wgmma per warpgroup, ~90 registers; bwd_q: a 16 x 256 accumulator (32 registers) leaves
        # room for the positive's row and the query rows in the epilogue (~180 registers); bwd_k: 32 keys x 256
        # (~180 registers), 16 queries per step.
        (256, dict(fwd=Tiles(64, 32, 256, 4), bwd_q=Tiles(16, 16, 256, 4), bwd_k=Tiles(16, 32, 256, 4))),
        # d = 384: three chunks of 128, no padded columns; 32-wide logits tiles give each of the 4 warps its
        # own 16 x 8 MMA (16 x 16 over 4 warps computes each product twice) and keep bwd_q memory-bound.
        # d = 512 (four chunks) and up, where stored_fits: the stored backward (_STORED_LOW), memory-bound by
        # the estimate. bwd_w: the forward's tiles on 8 warps (on 4, 255 registers and 1 spill store with
        # Triton 3.6); bwd_wq: a 64-row wgmma over a [64, 128] fp32 accumulator; bwd_wk: 32 keys (64 spilled
        # 10 stores with 3.6) by bwd_w's 64 query rows per step.
        (
            512,
            dict(
                fwd=Tiles(64, 32, 128, 4),
                bwd_q=Tiles(16, 32, 128, 4),
                bwd_k=Tiles(16, 32, 128, 4),
                **_STORED_LOW,
            ),
        ),
        (
            1 << 31,
            dict(
                fwd=Tiles(64, 32, 128, 4),
                bwd_q=Tiles(16, 16, 128, 4),
                bwd_k=Tiles(32, 16, 128, 4),
                **_STORED_LOW,
            ),
        ),
    ),
    "f32": (
        # 3xTF32 products keep both operands' high and low parts in registers: 16-row tiles (mma.sync; a
        # 64-row wgmma pads the 75 masked rows to 128, compute-bound at three MMAs per product) and chunks of
        # 32 columns (64 spilled in the forward at ~168 registers); the stored backward from d = 128 on.
        (
            1 << 31,
            dict(
                fwd=Tiles(16, 32, 32, 4),
                bwd_q=Tiles(16, 32, 32, 4),
                bwd_k=Tiles(16, 32, 32, 4),
                bwd_w=Tiles(16, 32, 32, 4),
                bwd_wq=Tiles(16, 32, 64, 4),
                bwd_wk=Tiles(16, 32, 64, 4),
            ),
        ),
    ),
}


# The stored backward keeps w (fp32, B x N x N: the masked count per image lives on the device, so every row
# is allocated) only where it is no larger than one feature tensor (4 N <= d times the narrower input's item
# size), so the loss's memory stays linear in its inputs: at N = 196 every four-chunk d qualifies (w: 39 MB at
# B = 256); at N = 784 (448 px) only d >= 1568 in bf16/fp16, d >= 784 in fp32; at N = 3136, where the official
# formulation's logits take 10 GB, none. The others recompute the logits per chunk.
def stored_fits(N: int, D: int, itemsize: int) -> bool:
    return D * itemsize >= 4 * N  # w holds 4 N bytes per row, a feature row D * itemsize


STORED_MIN_CHUNKS = 4  # 3 recomputations of the logits cost less than writing and reading w back twice
# Under the interpreter: 16 x 16 tiles (its cost grows with the tile, not with the grid) and chunks of 32
# columns, so the tests' d = 40 and 100 take the chunked path, d = 100 (four chunks) the stored backward.
_INTERPRETER_TILES = Tiles(16, 16, 32, 1)
KERNELS = {
    "fwd": _patch_contrast_fwd_kernel,
    "bwd_q": _patch_contrast_bwd_q_kernel,
    "bwd_k": _patch_contrast_bwd_k_kernel,
    "bwd_w": _patch_contrast_bwd_w_kernel,
    "bwd_wq": _patch_contrast_bwd_wq_kernel,
    "bwd_wk": _patch_contrast_bwd_wk_kernel,
}


# Under the interpreter, products run in fp32: its bf16 arithmetic is not IEEE's. tests/interpreter16.py supplies
# IEEE bf16 and sets this, so the 16-bit branches (tensor-core operands in the features' dtype, the gradient's
# high/low split, fp16's scaling) run on the CPU too.
INTERPRET_16BIT_DOTS = False


def _f32_dots(student_dtype, teacher_dtype, interpret: bool) -> bool:
    if interpret and not INTERPRET_16BIT_DOTS:
        return True
    return student_dtype == torch.float32 or student_dtype != teacher_dtype


def launch_meta(
    kernel: str,
    student_dtype,
    teacher_dtype,
    D: int,
    has_pos: bool,
    normalize: bool,
    *,
    temperature: float,
    interpret=None,
):
    """(constexpr arguments, num_warps) of one kernel (a key of KERNELS) for these inputs; shared by the
    launchers and the static profile (benchmarks/static.py), so both compile the same binaries. interpret:
    the interpreter's tiles (default: whether TRITON_INTERPRET is set).

    Products run in fp32 for fp32 features, for a student and teacher of different dtypes (tl.dot needs one
    operand dtype) and under the interpreter; bf16/fp16 pairs use tensor cores in their own dtype. fp32 products
    are 3xTF32, except the logits' where they can be large (exact_logits)."""
    interpret = interpreting() if interpret is None else interpret
    f32_dots = _f32_dots(student_dtype, teacher_dtype, interpret)
    if interpret:
        tiles = _INTERPRETER_TILES
    else:
        tiles = next(t for bound, t in _TILES["f32" if f32_dots else "low"] if bound >= D)[kernel]
    block_d = min(tiles.block_d, max(16, triton.next_power_of_2(D)))
    const = dict(
        HAS_POS=has_pos,
        NORMALIZE=bool(normalize),
        F32_DOTS=f32_dots,
        EXACT_LOGITS=f32_dots and exact_logits(normalize, temperature),
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_D=block_d,
        D_CHUNKS=max(1, triton.cdiv(D, block_d)),
    )
    names = KERNELS[kernel].arg_names
    return {k: v for k, v in const.items() if k in names}, tiles.warps


def backward_kernels(student_dtype, teacher_dtype, N: int, D: int, need_teacher: bool, interpret=None):
    """The backward's kernels for these inputs, in launch order: ("bwd_q", "bwd_k"), recomputing the logits for
    each chunk of the gradient, or ("bwd_w", "bwd_wq", "bwd_wk"), the logits once and their gradient stored;
    the keys' kernel only when the teacher needs a gradient."""
    const, _ = launch_meta(
        "bwd_q", student_dtype, teacher_dtype, D, False, True, temperature=1.0, interpret=interpret
    )
    itemsize = min(student_dtype.itemsize, teacher_dtype.itemsize)
    if stored_fits(N, D, itemsize) and const["D_CHUNKS"] >= STORED_MIN_CHUNKS:
        return ("bwd_w", "bwd_wq", "bwd_wk") if need_teacher else ("bwd_w", "bwd_wq")
    return ("bwd_q", "bwd_k") if need_teacher else ("bwd_q",)


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
    const, warps = launch_meta(
        "fwd", student.dtype, teacher.dtype, D, positive_index is not None, normalize, temperature=temperature
    )
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
    grad,
    student,
    teacher,
    mask,
    positive_index,
    lse,
    temperature,
    normalize,
    need_teacher,
    work=None,
    kernels=None,
):
    """Launch the backward kernels. grad: [B, N] float (any strides, expanded allowed); lse and work (or None)
    from the forward; kernels: backward_kernels' choice (the default) or the other one (tests run both).
    Returns (d_student [B, N, D] contiguous in the student's dtype, d_teacher likewise in the teacher's dtype,
    or None)."""
    B, N, D = student.shape
    ds = torch.empty(B, N, D, device=student.device, dtype=student.dtype)
    dt = torch.empty(B, N, D, device=teacher.device, dtype=teacher.dtype) if need_teacher else None
    if B == 0:
        return ds, dt
    order, counts = work if work is not None else work_order(mask)
    pos, p_sb, p_sn = _positive_args(student, positive_index)
    kernels = kernels or backward_kernels(student.dtype, teacher.dtype, N, D, need_teacher)
    meta = {
        k: launch_meta(
            k, student.dtype, teacher.dtype, D, positive_index is not None, normalize, temperature=temperature
        )
        for k in kernels
    }
    feats = (student, *student.stride(), teacher, *teacher.stride(), order, counts)
    inv_tau = 1.0 / float(temperature)

    def launch(kernel, rows, chunks, *args):
        const, warps = meta[kernel]
        grid = (triton.cdiv(N, const[rows]), B, triton.cdiv(D, const["BLOCK_D"]) if chunks else 1)
        KERNELS[kernel][grid](*args, **const, num_warps=warps)

    f32 = dict(device=student.device, dtype=torch.float32)
    if kernels[0] == "bwd_q":
        rest = torch.empty(B, N, **f32)  # 1 - p_pos: written by bwd_q
        args = (*feats, pos, p_sb, p_sn, lse, grad, *grad.stride(), rest)
        launch("bwd_q", "BLOCK_M", True, *args, ds, N, D, inv_tau, NORM_EPS)
        if need_teacher:
            launch("bwd_k", "BLOCK_N", True, *args, dt, N, D, inv_tau, NORM_EPS)
        return ds, dt
    w = torch.empty(B, N, N, **f32)  # rows in work order
    qnorm, qproj, knorm, vpos = torch.empty(4, B, N, **f32)
    parts = torch.empty(B, triton.cdiv(N, meta["bwd_w"][0]["BLOCK_M"]), N, **f32)
    launch(
        "bwd_w", "BLOCK_M", False, *feats, pos, p_sb, p_sn, lse, grad, *grad.stride(), w, qnorm, qproj,
        knorm, vpos, parts, N, D, inv_tau, NORM_EPS,
    )  # fmt: skip
    launch("bwd_wq", "BLOCK_M", True, *feats, w, qnorm, qproj, knorm, ds, N, D, NORM_EPS)
    if need_teacher:
        assert meta["bwd_wk"][0]["BLOCK_M"] == meta["bwd_w"][0]["BLOCK_M"], "bwd_wk steps over bwd_w's rows"
        launch("bwd_wk", "BLOCK_N", True, *feats, pos, p_sb, p_sn, w, qnorm, knorm, vpos, parts, dt, N, D,
               NORM_EPS)  # fmt: skip
    return ds, dt
