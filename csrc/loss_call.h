// One call of the patch-contrast loss, as the bindings receive it: a named struct that conmim/native.py
// (_loss_call) fills in one place and every backend (CPU and CUDA, forward and backward) reads. Adding an argument
// means one field here, one line in the binding's field list (bindings.cpp) and one in _loss_call.
// No torch and no CUDA headers: pointers are integers, strides are in elements.
#pragma once

#include <array>
#include <cstdint>

namespace conmim {

struct LossCall {
  // Inputs [B, N, D], any strides, each read in its own dtype (tags of common.h).
  int64_t student = 0, teacher = 0;
  int student_dtype = 0, teacher_dtype = 0;
  std::array<int64_t, 3> student_stride{}, teacher_stride{};
  int64_t B = 0, N = 0, D = 0;
  // Which rows count. CPU: mask, bool [B, N] (1 byte each), any strides. CUDA: the work order of
  // conmim work_order(mask): order int64 [B, N] (each image's masked patches first), counts int32 [B].
  int64_t mask = 0;
  std::array<int64_t, 2> mask_stride{};
  int64_t order = 0, counts = 0;
  // int64 [B, N] key index of each query's positive, or 0 for "the same index".
  int64_t positive_index = 0;
  std::array<int64_t, 2> positive_stride{};
  double inv_tau = 10.0;
  bool normalize = true;
  // CUDA: the logits of a pair with an fp32 side on fp32 FMA rather than 3xTF32 tensor cores. The caller decides
  // (conmim/limits.py exact_logits, the one gate the Triton kernels use too); the CPU kernels ignore it.
  bool exact_logits = true;
  // loss, lse: contiguous [B, N] of the accumulation dtype (float64 for float64 inputs, else float32), outputs of
  // the forward. The backward kernels recompute each row's softmax exactly instead of reading lse (its fp32
  // rounding would cost eps * |lse| relative accuracy in every probability).
  int64_t loss = 0, lse = 0;
  // Backward: grad [B, N] accumulation dtype, any strides (0 allowed); d_student (student dtype) and d_teacher
  // (teacher dtype, 0 when not wanted): contiguous [B, N, D], every element written.
  int64_t grad = 0;
  std::array<int64_t, 2> grad_stride{};
  int64_t d_student = 0, d_teacher = 0;
  // CUDA backward scratch, float32 [B, N, 3]: per masked row the softmax statistics (running max, sum, sum over
  // the keys other than the positive) the student-gradient kernel leaves for the teacher-gradient kernel.
  int64_t row_stats = 0;
  // Execution: CPU threads; CUDA stream handle.
  int nthreads = 1;
  int64_t stream = 0;
};

}  // namespace conmim
