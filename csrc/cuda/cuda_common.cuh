// Device-side helpers shared by the CUDA kernels: fp32 conversion of the storage types and dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "common.h"

namespace conmim {
namespace cuda {

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

// Calls f(T{}) with T the CUDA storage type of a float32 / bfloat16 / float16 tag; `who` names the caller in the
// error for any other tag.
template <typename F>
inline void dispatch_cuda(int tag, const char* who, F&& f) {
  switch (tag) {
    case kFloat32:
      f(float{});
      break;
    case kBFloat16:
      f(__nv_bfloat16{});
      break;
    case kFloat16:
      f(__half{});
      break;
    default:
      throw std::invalid_argument(std::string("conmim._C.") + who + ": unsupported dtype " + dtype_name(tag));
  }
}

}  // namespace cuda
}  // namespace conmim
