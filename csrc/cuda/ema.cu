// CUDA multi-tensor EMA: every tensor of a list is cut into kChunk-element chunks, one block per chunk, all in
// one launch; the tensor table travels as a __grid_constant__ kernel parameter (CUDA >= 12.1 allows 32 KB), so
// nothing is copied to the device and the launch can be captured in a CUDA graph. Both tensors move as 16-byte
// vectors (8 elements of bf16/fp16, 4 of fp32, per vector) from their first common 16-byte boundary (the start,
// for the flat teacher buffer's views); a misaligned head, the tail, and pairs never aligned together go scalar.
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

  // 16-byte vectors of both tensors: a step moves kVec elements, 16 bytes of the narrower type (and 16 or 32 of
  // the wider). They start at the first element where both tensors are 16-byte aligned: found from the narrower
  // type's address (its alignment repeats every kVec elements) and checked on the other's; if the other is not
  // aligned there, nowhere (the scalar path does the whole chunk). The head before it and the tail after the last
  // whole step go scalar.
  constexpr int kVec = 16 / (sizeof(TT) < sizeof(TS) ? sizeof(TT) : sizeof(TS));
  using VT = Vec16<TT, kVec>;
  using VS = Vec16<TS, kVec>;
  const uintptr_t at = reinterpret_cast<uintptr_t>(t), as = reinterpret_cast<uintptr_t>(s);
  const int64_t head = sizeof(TT) <= sizeof(TS) ? (16 - at % 16) % 16 / sizeof(TT) : (16 - as % 16) % 16 / sizeof(TS);
  const bool vec = head < n && (at + head * sizeof(TT)) % 16 == 0 && (as + head * sizeof(TS)) % 16 == 0;
  const int64_t v0 = vec ? head : n;           // the vectors cover [v0, v1)
  const int64_t nv = vec ? (n - head) / kVec : 0;
  const int64_t v1 = v0 + nv * kVec;
  for (int64_t i = threadIdx.x; i < nv; i += kThreads) {
    VT tv = load16(reinterpret_cast<const VT*>(t + v0) + i);
    const VS sv = load16(reinterpret_cast<const VS*>(s + v0) + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) tv.v[k] = from_f<TT>(lerp_f(to_f(tv.v[k]), to_f(sv.v[k]), w));
    store16(reinterpret_cast<VT*>(t + v0) + i, tv);
  }
  for (int64_t i = threadIdx.x; i < v0 + (n - v1); i += kThreads) {  // head, then tail
    const int64_t e = i < v0 ? i : v1 + (i - v0);
    t[e] = from_f<TT>(lerp_f(to_f(t[e]), to_f(s[e]), w));
  }
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
