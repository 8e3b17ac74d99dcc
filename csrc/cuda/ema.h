// CUDA multi-tensor EMA update: host launcher declaration (no CUDA headers needed by callers).
#pragma once

#include <cstdint>
#include <vector>

namespace conmim {
namespace cuda {

// One launch per 640 tensors (all tensors share teacher_dtype / student_dtype; the Python launcher groups them).
// teacher <- lerp(teacher, student, 1 - m) with m = *momentum_ptr when momentum_ptr != 0 (a float32 device scalar,
// read on the device: no host sync), else m = momentum.
void ema_update(const std::vector<int64_t>& teacher, int teacher_dtype, const std::vector<int64_t>& student,
                int student_dtype, const std::vector<int64_t>& numel, double momentum, int64_t momentum_ptr,
                int64_t stream);

}  // namespace cuda
}  // namespace conmim
