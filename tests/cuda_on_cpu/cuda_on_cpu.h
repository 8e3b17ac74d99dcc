// A CPU execution layer for the CUDA kernels of csrc/cuda, for the tests: the unmodified .cu sources compile as
// host C++ (g++ -x c++ -DCONMIM_CUDA_ON_CPU) against this header and executor.cpp.
//
// - Blocks run one after another; the threads of a block are fibers (ucontext) on one OS thread. A fiber runs until
//   it reaches a barrier, so __syncthreads() has its real meaning: no thread passes it before every thread of the
//   block has arrived. Between barriers the threads run in the order CONMIM_CUDA_ON_CPU_ORDER names (forward,
//   reverse, shuffle:<seed>, or warps: one warp at a time, each running ahead to the next block barrier), so a
//   missing barrier shows as a wrong result under one of the orders.
// - Warp shuffles exchange among the 32 lanes of a warp (a warp-level barrier on each side of the exchange).
// - __shared__ variables are block-wide (static storage, one block at a time); dynamic shared memory is a fresh
//   NaN-filled allocation per block. Out-of-range subscripts of arrays with a known bound (the kernels' __shared__
//   tiles) are caught by -fsanitize=bounds, whose handler (executor.cpp) fails the launch with the source line.
// - nvcuda::wmma: fragments hold the whole tile in every lane; loads and stores are warp-collective (every lane of
//   the warp arrives before any lane goes on, so a load-multiply-store of a shared accumulator happens once per
//   warp, as on the GPU); mma_sync computes the exact products with fp32 accumulation (not the tensor cores'
//   rounding).
// - cp.async (__pipeline_memcpy_async, __pipeline_commit, __pipeline_wait_prior): a copy's destination is poisoned
//   (all bits set: NaN in float, bf16 and half) when the copy is issued and the data lands only when the issuing
//   thread waits for its group, so a read before the wait, or by another thread before the barrier that follows
//   every thread's wait, sees NaN; a size other than 4, 8 or 16 bytes or a misaligned address fails the launch.
// - 16-byte vector accesses (load16, store16) at an address that is not 16-byte aligned fail the launch.
// - Devices: CONMIM_CUDA_ON_CPU_DEVICE picks the current one of two models that differ in the shared memory a
//   block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin): 0 (default) an sm_90 GPU, 227 KB; 1 an
//   sm_86/sm_89 GPU, 99 KB. cudaFuncSetAttribute(MaxDynamicSharedMemorySize) is recorded per kernel and device
//   (and refused past the device's limit); a launch with more than 48 KB of dynamic shared memory fails unless
//   its kernel opted in to that much there.
// - bf16/half conversions are the CUDA headers' host paths; streams are no-ops.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#undef __global__
#undef __host__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#undef __shared__
#define __global__
#define __host__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static

namespace cuda_on_cpu {

// The position of the running thread; set by the executor before it resumes a fiber.
struct Position {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
  void* dynamic_smem;
};
extern Position g_pos;

void sync_threads();           // block barrier
void sync_warp();              // barrier of the running thread's warp
uint64_t* warp_exchange_slot(int lane);  // the 32 slots of the running warp
void memcpy_async(void* dst, const void* src, size_t bytes, size_t zfill);  // the running thread's cp.async
void commit_group();
void wait_prior(size_t groups);
void check_vector(const void* p);  // a 16-byte vector access at p: fails the launch unless p is 16-byte aligned

// Fails (std::runtime_error) a launch of `kernel` with `smem` bytes of dynamic shared memory over the default
// 48 KB unless the kernel opted in to that much on the current device (cudaFuncSetAttribute).
void check_dynamic_smem(const void* kernel, size_t smem);

// Runs `body` for every thread of every block of the grid; throws std::runtime_error on a deadlock or on an
// out-of-bounds subscript reported during the run.
void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

int lane_id();

}  // namespace cuda_on_cpu

#define threadIdx (cuda_on_cpu::g_pos.thread)
#define blockIdx (cuda_on_cpu::g_pos.block)
#define blockDim (cuda_on_cpu::g_pos.block_dim)
#define gridDim (cuda_on_cpu::g_pos.grid_dim)

inline void __syncthreads() { cuda_on_cpu::sync_threads(); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
  const int lane = cuda_on_cpu::lane_id();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  cuda_on_cpu::sync_warp();  // every lane has read the previous exchange
  cuda_on_cpu::warp_exchange_slot(lane)[0] = bits;
  cuda_on_cpu::sync_warp();  // every lane has written
  T r;
  const uint64_t got = cuda_on_cpu::warp_exchange_slot(lane ^ lane_mask)[0];
  std::memcpy(&r, &got, sizeof(T));
  return r;
}

inline float __expf(float x) { return std::exp(x); }

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size_and_align, size_t zfill = 0) {
  cuda_on_cpu::memcpy_async(dst, src, size_and_align, zfill);
}
template <typename V>
inline V load16(const V* p) {
  cuda_on_cpu::check_vector(p);
  return *p;
}
template <typename V>
inline void store16(V* p, const V& v) {
  cuda_on_cpu::check_vector(p);
  *p = v;
}

inline void __pipeline_commit() { cuda_on_cpu::commit_group(); }
inline void __pipeline_wait_prior(size_t prior) { cuda_on_cpu::wait_prior(prior); }

// cuda_runtime.h declares this overload only for nvcc.
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

namespace conmim {
namespace cuda {

template <typename T>
inline T* dynamic_smem() {
  return static_cast<T*>(cuda_on_cpu::g_pos.dynamic_smem);
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A&&... args) {
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // copied, as kernel parameters are
  cuda_on_cpu::check_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  cuda_on_cpu::run_grid(grid, block, smem, [&] { std::apply(kernel, params); });
}

}  // namespace cuda
}  // namespace conmim

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// The whole tile in every lane: rows x cols of the operand (A: M x K, B: K x N, accumulator: M x N).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  using storage = typename std::conditional<std::is_same<T, precision::tf32>::value, float, T>::type;
  storage x[rows * cols];
  static constexpr int num_elements = rows * cols;
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, V v) {
  for (auto& e : f.x) e = static_cast<typename fragment<Use, M, N, K, T, L>::storage>(v);
}

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  cuda_on_cpu::sync_warp();
  using F = fragment<Use, M, N, K, T, L>;
  constexpr bool kColMajor = std::is_same<L, col_major>::value;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = kColMajor ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K, typename P>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const P* p, unsigned ldm, layout_t l) {
  cuda_on_cpu::sync_warp();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t l) {
  cuda_on_cpu::sync_warp();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * N + c];
}

// Rounds to TF32 (10 explicit mantissa bits), to nearest with ties away from zero, as cvt.rna.tf32.f32.
inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}

inline float to_float(float v) { return v; }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float to_float(__half v) { return __half2float(v); }

// d = a b + c, products exact (bf16/fp16 and tf32 products fit fp32; tf32 operands are used as loaded: the
// kernels round them with __float_to_tf32 first), fp32 accumulation in k order.
template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc += to_float(a.x[i * K + k]) * to_float(b.x[k * N + j]);
      out[i * N + j] = acc;
    }
  std::copy(out, out + M * N, d.x);
}

}  // namespace wmma
}  // namespace nvcuda
