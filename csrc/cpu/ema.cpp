// Fused CPU EMA: one OpenMP parallel region over fixed-size chunks of all tensors, so many small parameters cost
// no more than one large one, and each chunk is a vectorised streaming lerp.
#include "cpu/ema.h"

#include <omp.h>

#include <algorithm>
#include <stdexcept>

#include "common.h"

namespace conmim {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1 << 15;

// Same formula as torch.lerp: start + w (end - start) for w < 0.5, end - (end - start)(1 - w) otherwise.
template <typename TT, typename TS, typename A>
static void lerp_chunk(TT* t, const TS* s, int64_t n, A w) {
  if (w < A(0.5)) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const A x = static_cast<A>(to_float(t[i]));
      t[i] = from_float<TT>(x + w * (static_cast<A>(to_float(s[i])) - x));
    }
  } else {
    const A wc = A(1) - w;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const A x = static_cast<A>(to_float(t[i]));
      const A y = static_cast<A>(to_float(s[i]));
      t[i] = from_float<TT>(y - (y - x) * wc);
    }
  }
}

struct Chunk {
  int tensor;
  int64_t begin, len;
};

}  // namespace

void ema_update(const std::vector<int64_t>& teacher, const std::vector<int>& teacher_dtype,
                const std::vector<int64_t>& student, const std::vector<int>& student_dtype,
                const std::vector<int64_t>& numel, double momentum, int nthreads) {
  const size_t n = teacher.size();
  if (student.size() != n || numel.size() != n || teacher_dtype.size() != n || student_dtype.size() != n)
    throw std::invalid_argument("conmim._C.ema_update_cpu: argument lists differ in length");
  for (size_t i = 0; i < n; ++i) {
    // Validated here: an exception must not escape the parallel region below.
    if (teacher_dtype[i] < 0 || teacher_dtype[i] > kFloat64 || student_dtype[i] < 0 || student_dtype[i] > kFloat64)
      throw std::invalid_argument("conmim._C.ema_update_cpu: bad dtype tag for tensor " + std::to_string(i));
  }
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < n; ++i)
    for (int64_t b = 0; b < numel[i]; b += kChunk)
      chunks.push_back(Chunk{static_cast<int>(i), b, std::min(kChunk, numel[i] - b)});
  const double w = 1.0 - momentum;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (size_t c = 0; c < chunks.size(); ++c) {
    const Chunk& ch = chunks[c];
    dispatch<HostTypes>(teacher_dtype[ch.tensor], "ema_update_cpu", [&](auto ttag) {
      using TT = decltype(ttag);
      dispatch<HostTypes>(student_dtype[ch.tensor], "ema_update_cpu", [&](auto stag) {
        using TS = decltype(stag);
        using A = typename std::conditional<std::is_same<TT, double>::value, double, float>::type;
        lerp_chunk<TT, TS, A>(reinterpret_cast<TT*>(teacher[ch.tensor]) + ch.begin,
                              reinterpret_cast<const TS*>(student[ch.tensor]) + ch.begin, ch.len,
                              static_cast<A>(w));
      });
    });
  }
}

}  // namespace cpu
}  // namespace conmim
