// Fused CPU patch-contrast loss: declarations shared by the kernel and the bindings.
#pragma once

#include "loss_call.h"

namespace conmim {
namespace cpu {

// Reads student, teacher, mask, positive_index, B/N/D, inv_tau, normalize, nthreads; writes loss and lse (0 on rows
// that are not masked).
void patch_contrast_forward(const LossCall& a);

// Reads the forward's inputs plus lse and grad; writes d_student (and d_teacher unless 0), zeros on unmasked rows.
void patch_contrast_backward(const LossCall& a);

}  // namespace cpu
}  // namespace conmim
