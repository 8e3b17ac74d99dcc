"""Triton EMA update over a list of tensors in one launch.

The launcher builds (and caches, keyed by the tensors' addresses) a small device table: the teacher and student
base addresses and sizes of every tensor, and for every BLOCK-element chunk the tensor it belongs to and its
offset. Each program reads its row of the table, turns the addresses into typed pointers and lerps its chunk:
one launch whatever the number of parameters, nothing copied per call once the table is cached, and the
momentum can be a device scalar (no host sync; CUDA-graph capturable). A table used while a CUDA graph is
captured is never evicted (the graph's replays read it); one that would have to be built during capture is an
error asking for a warm-up update first.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from conmim.kernels import interpreting

# 4096 elements over 8 warps: 16 per thread, four 16-byte vectors of fp32 per operand, few registers, so many
# programs stay resident to keep loads in flight.
BLOCK = 4096
NUM_WARPS = 8
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_tables: OrderedDict = OrderedDict()
_MAX_TABLES = 16
# Tables that a CUDA graph captured: its replays read them, so they are never evicted.
_pinned: set = set()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@triton.jit
def _momentum(momentum, momentum_ptr, HAS_MPTR: tl.constexpr):
    if HAS_MPTR:
        return tl.load(momentum_ptr).to(tl.float32)
    else:
        return momentum


@triton.jit
def _lerp(t_ptrs, s_ptrs, w, ok, T_DTYPE: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        t = tl.load(t_ptrs, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(s_ptrs, mask=ok, other=0.0).to(tl.float32)
    else:  # a mask that varies along the chunk would split every access into scalars
        t = tl.load(t_ptrs).to(tl.float32)
        s = tl.load(s_ptrs).to(tl.float32)
    # torch.lerp's formula, so results match torch._foreach_lerp_.
    new = tl.where(w < 0.5, t + w * (s - t), s - (s - t) * (1.0 - w))
    if MASKED:
        tl.store(t_ptrs, new.to(T_DTYPE), mask=ok)
    else:
        tl.store(t_ptrs, new.to(T_DTYPE))


@triton.jit
def _ema_update_kernel(
    t_addr_ptr,
    s_addr_ptr,
    numel_ptr,
    chunk_tensor_ptr,
    chunk_offset_ptr,
    momentum,
    momentum_ptr,
    T_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    HAS_MPTR: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    ti = tl.load(chunk_tensor_ptr + pid)
    start = tl.load(chunk_offset_ptr + pid)
    n = tl.load(numel_ptr + ti)
    t_base = tl.load(t_addr_ptr + ti).to(tl.pointer_type(T_DTYPE))
    s_base = tl.load(s_addr_ptr + ti).to(tl.pointer_type(S_DTYPE))
    if ALIGNED:
        # Pointers made from integers carry no alignment; every base address is 16-byte aligned (checked by the
        # launcher) and chunks start at multiples of BLOCK, so the accesses can be 16-byte vectors.
        t_base = tl.multiple_of(t_base, 16)
        s_base = tl.multiple_of(s_base, 16)
        start = tl.multiple_of(start, BLOCK)
    w = 1.0 - _momentum(momentum, momentum_ptr, HAS_MPTR)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _lerp(t_base + offs, s_base + offs, w, offs < n, T_DTYPE, False)
    else:
        _lerp(t_base + offs, s_base + offs, w, offs < n, T_DTYPE, True)


def _table(teacher, student, device):
    key = (
        device,
        tuple(t.data_ptr() for t in teacher),
        tuple(s.data_ptr() for s in student),
        tuple(t.numel() for t in teacher),
    )
    capturing = _capturing(device)
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        if capturing:
            _pinned.add(key)
        return hit
    if capturing:
        raise RuntimeError(
            "conmim ema_update_ (triton): these tensor lists have no address table yet, and building one "
            "copies it to the GPU, which CUDA-graph capture does not allow; run the same update once before "
            "capturing (a warm-up step), with the same (contiguous) tensors"
        )
    numel = [t.numel() for t in teacher]
    chunk_tensor, chunk_offset = [], []
    for i, n in enumerate(numel):
        for off in range(0, n, BLOCK):
            chunk_tensor.append(i)
            chunk_offset.append(off)

    def dev(values):
        return torch.tensor(values, dtype=torch.int64).to(device)

    table = (
        dev([t.data_ptr() for t in teacher]),
        dev([s.data_ptr() for s in student]),
        dev(numel),
        dev(chunk_tensor),
        dev(chunk_offset),
        all(x.data_ptr() % 16 == 0 for x in (*teacher, *student)),  # the kernel may use 16-byte vectors
    )
    _tables[key] = table
    evictable = [k for k in _tables if k not in _pinned]
    for k in evictable[: max(0, len(_tables) - _MAX_TABLES)]:
        del _tables[k]
    return table


def ema_update_(teacher, student, momentum) -> None:
    """teacher: list of contiguous tensors (one dtype) updated in place; student: same shapes, contiguous, one
    dtype; both on one GPU (or CPU under TRITON_INTERPRET). momentum: float or 0-d tensor on that device.

    The student tensors must stay alive and unmoved while the cached table refers to them; the cache key is
    their addresses, so reallocated tensors get a new table.
    """
    if not teacher:
        return
    device = teacher[0].device
    t_addr, s_addr, numel, chunk_tensor, chunk_offset, aligned = _table(teacher, student, device)
    if chunk_tensor.numel() == 0:
        return
    has_mptr = isinstance(momentum, torch.Tensor)
    if has_mptr and momentum.device != device and _capturing(device):
        raise ValueError(
            f"momentum: a tensor on {momentum.device} would be copied to {device} during CUDA-graph capture; "
            f"pass it on {device}"
        )
    mptr = momentum.to(device=device, dtype=torch.float32) if has_mptr else t_addr
    _ema_update_kernel[(chunk_tensor.numel(),)](
        t_addr,
        s_addr,
        numel,
        chunk_tensor,
        chunk_offset,
        0.0 if has_mptr else float(momentum),
        mptr,
        T_DTYPE=_TL[teacher[0].dtype],
        S_DTYPE=_TL[student[0].dtype],
        HAS_MPTR=has_mptr,
        ALIGNED=aligned,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS if not interpreting() else 1,
    )
