// CUDA patch-contrast loss: host launcher declarations (no CUDA headers needed by callers).
#pragma once

#include "loss_call.h"

namespace conmim {
namespace cuda {

// Reads student, teacher (float32/bfloat16/float16, any pair), order, counts, positive_index, B/N/D, inv_tau,
// normalize, stream (all pointers device addresses); writes loss and lse (float32 [B, N], 0 where not masked).
void patch_contrast_forward(const LossCall& a);

// Reads the forward's inputs plus lse and grad (float32); writes d_student (and d_teacher unless 0), every
// element (0 on unmasked rows).
void patch_contrast_backward(const LossCall& a);

}  // namespace cuda
}  // namespace conmim
