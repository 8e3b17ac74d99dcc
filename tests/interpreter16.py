"""bf16 arithmetic for Triton's interpreter, so the kernels' 16-bit branches (tensor-core operands in the
features' dtype, the gradient's high/low split, fp16's scaling) run on the CPU as a GPU runs them.

The interpreter stores bf16 as raw uint16 bits: its casts to bf16 truncate instead of rounding to nearest even,
and its arithmetic, sums and products on bf16 operate on the bit patterns. ``native_16bit(monkeypatch)`` replaces
those four builder operations with their IEEE meaning (each bf16 operation computed in fp32 and rounded to
nearest even, products of bf16 operands exact with fp32 accumulation, as tensor cores do) and lets the loss
kernels keep their 16-bit operands under the interpreter (``INTERPRET_16BIT_DOTS``). fp16 needs no emulation:
numpy's float16 is IEEE half, and its matmul with ``dtype=float32`` multiplies exactly and accumulates in fp32.
"""

from __future__ import annotations

import numpy as np
import torch


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even (torch's conversion, as the GPU's cvt.rn.bf16.f32), as uint16 bits."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16).reshape(np.shape(x))


def native_16bit(monkeypatch) -> None:
    """Patch Triton's interpreter (undone with ``monkeypatch``) and run the loss kernels' 16-bit branches."""
    import triton.language as tl
    from triton.runtime import interpreter as it

    from conmim.kernels import patch_contrast

    B = it.InterpreterBuilder
    bf16, f32 = tl.bfloat16, tl.float32
    cast, binary, dot, total = B.cast_impl, B.binary_op, B.create_dot, it.ReduceOps.sum

    def as_f32(h):
        return _bf16_to_f32(h.data) if h.dtype.scalar == bf16 else h.data

    def cast_impl(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if s == bf16 and d != bf16:
            return cast(self, it.TensorHandle(_bf16_to_f32(src.data), f32), dst_type)
        if d == bf16 and s != bf16:
            return it.TensorHandle(_f32_to_bf16(src.data.astype(np.float32)), bf16)
        return cast(self, src, dst_type)

    def binary_op(self, lhs, rhs, op):
        if lhs.dtype.scalar != bf16:
            return binary(self, lhs, rhs, op)
        out = op(as_f32(lhs), as_f32(rhs))
        if out.dtype == np.bool_:
            return it.TensorHandle(out, tl.int1)
        return it.TensorHandle(_f32_to_bf16(out), bf16)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == bf16 or b.dtype.scalar == bf16:
            a, b = (it.TensorHandle(as_f32(h), f32) for h in (a, b))
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def reduce_sum(self, input):
        if input.dtype.scalar != bf16:
            return total(self, input)
        data = _bf16_to_f32(input.handle.data).sum(axis=self.axis, keepdims=self.keep_dims)
        return self.to_tensor(_f32_to_bf16(np.asarray(data)), input.dtype)

    monkeypatch.setattr(B, "cast_impl", cast_impl)  # create_fp_trunc and the other casts call it
    monkeypatch.setattr(B, "binary_op", binary_op)
    monkeypatch.setattr(B, "create_dot", create_dot)
    monkeypatch.setattr(it.ReduceOps, "sum", reduce_sum)
    monkeypatch.setattr(patch_contrast, "INTERPRET_16BIT_DOTS", True)
