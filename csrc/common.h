// Shared helpers for the CPU kernels: dtype tags, scalar conversions, small vector types.
// No torch headers here (see README, "Design"): kernels take raw pointers, sizes, strides and a dtype tag.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace conmim {

// Dtype tags passed from Python (exported as conmim._C.dtype_tags, from which conmim/_ext.py builds its table).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

static inline float to_float(float x) { return x; }
static inline double to_float(double x) { return x; }
static inline float to_float(bf16_t x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float to_float(fp16_t x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return static_cast<float>(h);
}

template <typename T>
static inline T from_float(double x);
template <>
inline float from_float<float>(double x) {
  return static_cast<float>(x);
}
template <>
inline double from_float<double>(double x) {
  return x;
}
template <>
inline bf16_t from_float<bf16_t>(double xd) {
  // Round to nearest even, NaN kept quiet (matches torch's float -> bfloat16 conversion).
  float x = static_cast<float>(xd);
  uint32_t u;
  std::memcpy(&u, &x, 4);
  bf16_t r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r.bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    return r;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  r.bits = static_cast<uint16_t>(u >> 16);
  return r;
}
template <>
inline fp16_t from_float<fp16_t>(double xd) {
  _Float16 h = static_cast<_Float16>(static_cast<float>(xd));
  fp16_t r;
  std::memcpy(&r.bits, &h, 2);
  return r;
}

inline std::string dtype_name(int tag) {
  switch (tag) {
    case kFloat32:
      return "float32";
    case kBFloat16:
      return "bfloat16";
    case kFloat16:
      return "float16";
    case kFloat64:
      return "float64";
    default:
      return "unknown dtype tag " + std::to_string(tag);
  }
}

// The storage types of the host kernels (CPU); csrc/cuda/cuda_common.cuh has the device table.
struct HostTypes {
  using f32 = float;
  using bf16 = bf16_t;
  using f16 = fp16_t;
  using f64 = double;
};

// The one dtype dispatcher of host and device code: calls f(T{}) with T the storage type of `tag` in the type
// table `Types` (f64 = void: float64 unsupported there). `who` names the caller in the error for any other tag.
template <typename Types, typename F>
inline void dispatch(int tag, const char* who, F&& f) {
  switch (tag) {
    case kFloat32:
      f(typename Types::f32{});
      return;
    case kBFloat16:
      f(typename Types::bf16{});
      return;
    case kFloat16:
      f(typename Types::f16{});
      return;
    case kFloat64:
      if constexpr (!std::is_void<typename Types::f64>::value) {
        f(typename Types::f64{});
        return;
      }
      break;
    default:
      break;
  }
  throw std::invalid_argument(std::string("conmim._C.") + who + ": unsupported dtype " + dtype_name(tag));
}

template <typename S, typename T, typename F>
inline void call_pair(F& f) {
  if constexpr (std::is_same<S, double>::value == std::is_same<T, double>::value) f(S{}, T{});
}

// f(S{}, T{}) for the (student, teacher) storage types: any pair of float32 / bfloat16 / float16, or float64 with
// float64 (the accumulation dtype follows the inputs, so float64 does not mix).
template <typename Types, typename F>
inline void dispatch_pair(int s_tag, int t_tag, const char* who, F&& f) {
  if ((s_tag == kFloat64) != (t_tag == kFloat64))
    throw std::invalid_argument(std::string("conmim._C.") + who + ": float64 pairs only with float64, got " +
                                dtype_name(s_tag) + " and " + dtype_name(t_tag));
  dispatch<Types>(s_tag, who, [&](auto s) {
    dispatch<Types>(t_tag, who, [&](auto t) { call_pair<decltype(s), decltype(t)>(f); });
  });
}

}  // namespace conmim
