// CUDA patch-contrast loss: host launcher declarations (no CUDA headers needed by callers).
#pragma once

#include <cstdint>

#include "loss_call.h"

namespace conmim {
namespace cuda {

// Limits of the launchers, exported by the bindings (conmim._C.cuda_max_dim, cuda_max_batch) so the Python
// dispatch reads them instead of keeping copies.
constexpr int kMaxDim = 1024;         // feature dim: the backward's fp32 accumulator rows live in shared memory
constexpr int64_t kMaxGridY = 65535;  // images per call: one grid row each

// Reads student, teacher (float32/bfloat16/float16, any pair), order, counts, positive_index, B/N/D, inv_tau,
// normalize, stream (all pointers device addresses); writes loss and lse (float32 [B, N], 0 where not masked).
void patch_contrast_forward(const LossCall& a);

// Shared memory of one block of a loss kernel on a device that gives at most `optin_limit` bytes per block (its
// cudaDevAttrMaxSharedMemoryPerBlockOptin): the forward keeps the block's query rows resident when they fit, else
// streams them chunk by chunk with the keys; the backward's fp32 accumulator [32][d] has no smaller form.
struct SmemPlan {
  bool q_resident = true;     // forward: the query rows loaded once per block (else once per key tile)
  int64_t static_bytes = 0;   // the kernel's static shared memory, with the 1 KB the device reserves per block
  int64_t dynamic_bytes = 0;  // the launch's
  bool opt_in = false;        // static + dynamic over the default 48 KB: the kernel must opt in to more
};

enum class LossKernel { kForward, kBackward };  // kBackward: bwd_q and bwd_k (the same shared memory)

// The plan of `kernel` for feature dim D and the (student, teacher) dtype tags; throws std::runtime_error naming
// the limit when no configuration fits. The launchers follow it; exposed for the tests.
SmemPlan smem_plan(LossKernel kernel, int64_t D, int student_dtype, int teacher_dtype, int64_t optin_limit);

// Reads the forward's inputs plus lse and grad (float32); writes d_student (and d_teacher unless 0), every
// element (0 on unmasked rows).
void patch_contrast_backward(const LossCall& a);

}  // namespace cuda
}  // namespace conmim
