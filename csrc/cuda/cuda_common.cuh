// Device-side helpers shared by the CUDA kernels: fp32 conversion of the storage types, the device type table of
// the dtype dispatcher (common.h), 16-byte vector accesses (load16, store16), and the two points where a kernel
// meets its launcher (launch, dynamic_smem); the CPU executor of the tests (tests/cuda_on_cpu/) provides those
// four itself when CONMIM_CUDA_ON_CPU is defined.
#pragma once

#ifdef CONMIM_CUDA_ON_CPU
#include "cuda_on_cpu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <stdexcept>
#include <string>
#include <utility>

#include "common.h"

namespace conmim {
namespace cuda {

// Storage types of the device kernels; float64 is not supported on the device.
struct DeviceTypes {
  using f32 = float;
  using bf16 = __nv_bfloat16;
  using f16 = __half;
  using f64 = void;
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}

// A run of N elements starting 16-byte aligned (N sizeof(T) a multiple of 16), moved as whole 16-byte vectors
// (LDG.E.128 / STG.E.128) by load16 / store16, which the CPU executor checks for alignment.
template <typename T, int N>
struct alignas(16) Vec16 {
  static_assert(N * sizeof(T) % 16 == 0, "whole 16-byte vectors");
  T v[N];
};

#ifndef CONMIM_CUDA_ON_CPU
template <typename V>
__device__ __forceinline__ V load16(const V* p) {
  return *p;
}
template <typename V>
__device__ __forceinline__ void store16(V* p, const V& v) {
  *p = v;
}

// The block's dynamic shared memory (the launch's smem bytes), as T.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char conmim_dynamic_smem[];
  return reinterpret_cast<T*>(conmim_dynamic_smem);
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
}
#endif

}  // namespace cuda
}  // namespace conmim
