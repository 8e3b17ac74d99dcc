// Fused CPU patch-contrast loss: declarations shared by the kernel and the bindings.
#pragma once

#include <cstdint>

namespace conmim {
namespace cpu {

// Inputs of one call. student/teacher: [B, N, D] of `dtype`, any strides (in elements). mask: bool [B, N]
// (1 byte each), any strides. pos: int64 [B, N] key index of each query's positive, or 0 for "same index".
struct PatchContrastArgs {
  int64_t student = 0, teacher = 0, mask = 0, pos = 0;
  int64_t s_stride[3] = {0, 0, 0}, t_stride[3] = {0, 0, 0};
  int64_t mask_sb = 0, mask_sn = 0, pos_sb = 0, pos_sn = 0;
  int64_t B = 0, N = 0, D = 0;
  int dtype = 0;
  double inv_tau = 10.0;
  bool normalize = true;
};

// loss, lse: contiguous [B, N] accumulation dtype (float64 for float64 inputs, else float32); rows that are not
// masked are written as 0.
void patch_contrast_forward(const PatchContrastArgs& a, int64_t loss, int64_t lse, int nthreads);

// grad: [B, N] accumulation dtype with strides (grad_sb, grad_sn) (0 strides allowed: an expanded scalar).
// ds (and dt unless 0): contiguous [B, N, D] of `dtype`, every element written (zeros for unmasked rows).
void patch_contrast_backward(const PatchContrastArgs& a, int64_t lse, int64_t grad, int64_t grad_sb,
                             int64_t grad_sn, int64_t ds, int64_t dt, int nthreads);

}  // namespace cpu
}  // namespace conmim
