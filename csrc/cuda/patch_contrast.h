// CUDA patch-contrast loss: host launcher declarations (no CUDA headers needed by callers).
#pragma once

#include <cstdint>

namespace conmim {
namespace cuda {

// Raw arguments of one call; pointers are device addresses passed as integers, strides in elements.
// order: int64 [B, N] (masked patches first), counts: int32 [B], pos: int64 [B, N] or 0.
struct PatchContrastCudaArgs {
  int64_t student, teacher, order, counts, pos;
  int64_t s_sb, s_sn, s_sd, t_sb, t_sn, t_sd, p_sb, p_sn;
  int64_t B, N, D;
  int dtype;
  double inv_tau;
  bool normalize;
};

// loss, lse: float32 [B, N] contiguous; every element written (0 where not masked).
void patch_contrast_forward(const PatchContrastCudaArgs& a, int64_t loss, int64_t lse, int64_t stream);

// grad: float32 [B, N] with strides (g_sb, g_sn); ds (and dt unless 0): contiguous [B, N, D] of the input dtype,
// every element written.
void patch_contrast_backward(const PatchContrastCudaArgs& a, int64_t lse, int64_t grad, int64_t g_sb, int64_t g_sn,
                             int64_t ds, int64_t dt, int64_t stream);

int patch_contrast_max_dim();

}  // namespace cuda
}  // namespace conmim
