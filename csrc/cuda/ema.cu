// CUDA multi-tensor EMA: every tensor of a list is cut into kChunk-element chunks, one block per chunk, all in
// one launch; the tensor table travels as a __grid_constant__ kernel parameter (CUDA >= 12.1 allows 32 KB), so
// nothing is copied to the device and the launch can be captured in a CUDA graph. Aligned chunks use 4-element
// vector accesses (16 bytes for fp32); the tail and misaligned tensors take a scalar path.
#include <memory>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cuda/cuda_common.cuh"
#include "cuda/ema.h"

namespace conmim {
namespace cuda {
namespace {

constexpr int kMaxTensors = 640;
constexpr int kThreads = 256;
constexpr int64_t kChunk = 8192;

struct EmaTable {
  void* teacher[kMaxTensors];
  const void* student[kMaxTensors];
  int64_t numel[kMaxTensors];
  int first_block[kMaxTensors + 1];
  int count;
  const float* momentum_ptr;
  float momentum;
};
static_assert(sizeof(EmaTable) < 32000, "kernel parameter table must fit the 32 KB limit");

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// torch.lerp's formula, so results match torch._foreach_lerp_.
__device__ __forceinline__ float lerp_f(float t, float s, float w) {
  return w < 0.5f ? t + w * (s - t) : s - (s - t) * (1.f - w);
}

template <typename TT, typename TS>
__global__ void __launch_bounds__(kThreads) ema_kernel(const __grid_constant__ EmaTable p) {
  const int blk = blockIdx.x;
  int lo = 0, hi = p.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (p.first_block[mid] <= blk)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int64_t start = static_cast<int64_t>(blk - p.first_block[lo]) * kChunk;
  const int64_t n = min(kChunk, p.numel[lo] - start);
  TT* t = static_cast<TT*>(p.teacher[lo]) + start;
  const TS* s = static_cast<const TS*>(p.student[lo]) + start;
  const float w = 1.f - (p.momentum_ptr ? *p.momentum_ptr : p.momentum);

  int64_t done = 0;
  const bool aligned = (reinterpret_cast<uintptr_t>(t) % sizeof(Vec4<TT>) == 0) &&
                       (reinterpret_cast<uintptr_t>(s) % sizeof(Vec4<TS>) == 0);
  if (aligned) {
    const int64_t nv = n / 4;
    for (int64_t i = threadIdx.x; i < nv; i += kThreads) {
      Vec4<TT> tv = reinterpret_cast<const Vec4<TT>*>(t)[i];
      const Vec4<TS> sv = reinterpret_cast<const Vec4<TS>*>(s)[i];
#pragma unroll
      for (int k = 0; k < 4; ++k) tv.v[k] = from_f<TT>(lerp_f(to_f(tv.v[k]), to_f(sv.v[k]), w));
      reinterpret_cast<Vec4<TT>*>(t)[i] = tv;
    }
    done = nv * 4;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) t[i] = from_f<TT>(lerp_f(to_f(t[i]), to_f(s[i]), w));
}

}  // namespace

void ema_update(const std::vector<int64_t>& teacher, int teacher_dtype, const std::vector<int64_t>& student,
                int student_dtype, const std::vector<int64_t>& numel, double momentum, int64_t momentum_ptr,
                int64_t stream) {
  const size_t n = teacher.size();
  if (student.size() != n || numel.size() != n)
    throw std::invalid_argument("conmim._C.ema_update_cuda: argument lists differ in length");
  auto owner = std::make_unique<EmaTable>();  // ~18 KB: keep it off the host stack
  EmaTable* table = owner.get();
  for (size_t base = 0; base < n; base += kMaxTensors) {
    const size_t cnt = std::min<size_t>(kMaxTensors, n - base);
    int blocks = 0, used = 0;
    for (size_t i = 0; i < cnt; ++i) {
      if (numel[base + i] == 0) continue;
      table->teacher[used] = reinterpret_cast<void*>(teacher[base + i]);
      table->student[used] = reinterpret_cast<const void*>(student[base + i]);
      table->numel[used] = numel[base + i];
      table->first_block[used] = blocks;
      const int64_t nb = (numel[base + i] + kChunk - 1) / kChunk;
      if (blocks + nb > (int64_t{1} << 31) - 1)
        throw std::invalid_argument("conmim._C.ema_update_cuda: too many elements for one launch");
      blocks += static_cast<int>(nb);
      ++used;
    }
    if (used == 0) continue;
    table->first_block[used] = blocks;
    table->count = used;
    table->momentum_ptr = reinterpret_cast<const float*>(momentum_ptr);
    table->momentum = static_cast<float>(momentum);
    auto st = reinterpret_cast<cudaStream_t>(stream);
    dispatch<DeviceTypes>(teacher_dtype, "ema_update_cuda", [&](auto tt) {
      dispatch<DeviceTypes>(student_dtype, "ema_update_cuda", [&](auto ts) {
        launch(ema_kernel<decltype(tt), decltype(ts)>, dim3(blocks), dim3(kThreads), 0, st, *table);
      });
    });
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("conmim._C.ema_update_cuda: launch failed: ") + cudaGetErrorString(err));
  }
}

}  // namespace cuda
}  // namespace conmim
