// Fused CPU EMA update over a list of tensors: declarations.
#pragma once

#include <cstdint>
#include <vector>

namespace conmim {
namespace cpu {

// For every i: teacher[i] <- lerp(teacher[i], student[i], 1 - momentum), elementwise over numel[i] contiguous
// elements, computed in fp32 (fp64 for fp64 tensors) and stored in each tensor's own dtype.
void ema_update(const std::vector<int64_t>& teacher, const std::vector<int>& teacher_dtype,
                const std::vector<int64_t>& student, const std::vector<int>& student_dtype,
                const std::vector<int64_t>& numel, double momentum, int nthreads);

}  // namespace cpu
}  // namespace conmim
