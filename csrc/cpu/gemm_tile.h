// A small register-blocked GEMM used by the fused CPU loss kernel.
// C[MR x NR] (+)= sum_p a(i, p) * B[p, 0:NR], with a(i, p) = A[i * lda_i + p * lda_p] (any strides, so the same
// kernel serves Q K^T, G K and G^T Q) and B row-major with leading dimension ldb. Callers pad every operand so
// that rows are a multiple of MR and columns a multiple of NR (padding is zero), which keeps the kernel free of
// edge cases.
#pragma once

#include <cstddef>
#include <cstring>
#include <vector>

namespace conmim {
namespace cpu {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename A>
struct VecOf {
  typedef A type __attribute__((vector_size(kVecBytes)));
  // Unaligned, alias-safe view of memory as a vector.
  typedef A utype __attribute__((vector_size(kVecBytes), aligned(sizeof(A)), __may_alias__));
  static constexpr int width = kVecBytes / static_cast<int>(sizeof(A));
};

template <typename A>
struct Tile {
  static constexpr int MR = 6;
  static constexpr int NV = 2;  // vectors per row of the tile
  static constexpr int W = VecOf<A>::width;
  static constexpr int NR = NV * W;
};

template <typename A>
static inline void micro_tile(ptrdiff_t K, const A* a, ptrdiff_t lda_i, ptrdiff_t lda_p, const A* b, ptrdiff_t ldb,
                              A* c, ptrdiff_t ldc, bool accumulate) {
  using V = typename VecOf<A>::type;
  using U = typename VecOf<A>::utype;
  constexpr int MR = Tile<A>::MR, NV = Tile<A>::NV, W = Tile<A>::W;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V{} + A(0);
  for (ptrdiff_t p = 0; p < K; ++p) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const U*>(b + p * ldb + v * W);
    const A* ap = a + p * lda_p;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const A av = ap[r * lda_i];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      U* dst = reinterpret_cast<U*>(c + r * ldc + v * W);
      *dst = accumulate ? *dst + acc[r][v] : acc[r][v];
    }
}

// Packed layout of a K x Ncols operand: Ncols / NR strips, each K x NR contiguous (strip s holds columns
// s*NR .. s*NR+NR-1). Read in place, a strip strides by its leading dimension, and strides like 224 floats fold
// onto a few L1 sets and evict each other; packed, a strip stays in L1 for every row tile.

// Packs B^T given row-major (bt[j * ldbt + p], j < Ncols, p < K) into `pk` (Ncols * K elements); Ncols % NR == 0.
// Transposed in blocks of NR rows x kPackDepth columns so that reads and writes both stay within a few KiB: a
// row-at-a-time transpose wrote each element to a different cache line (at d = 1024, B = 8 it was half the
// forward's time).
constexpr ptrdiff_t kPackDepth = 16;
template <typename A>
static inline void pack_transposed(ptrdiff_t Ncols, ptrdiff_t K, const A* bt, ptrdiff_t ldbt, A* pk) {
  constexpr int NR = Tile<A>::NR;
  for (ptrdiff_t j0 = 0; j0 < Ncols; j0 += NR) {
    A* strip = pk + (j0 / NR) * K * NR;
    const A* rows = bt + j0 * ldbt;
    for (ptrdiff_t p0 = 0; p0 < K; p0 += kPackDepth) {
      const ptrdiff_t pe = K - p0 < kPackDepth ? K : p0 + kPackDepth;
      for (int jj = 0; jj < NR; ++jj) {
        const A* src = rows + jj * ldbt;
        for (ptrdiff_t p = p0; p < pe; ++p) strip[p * NR + jj] = src[p];
      }
    }
  }
}

// C[M x Ncols] (+)= A-op[M x K] * B, B packed by pack_transposed (or strip by strip below).
template <typename A>
static inline void gemm_packed(ptrdiff_t M, ptrdiff_t Ncols, ptrdiff_t K, const A* a, ptrdiff_t lda_i,
                               ptrdiff_t lda_p, const A* pk, A* c, ptrdiff_t ldc, bool accumulate) {
  constexpr int MR = Tile<A>::MR, NR = Tile<A>::NR;
  for (ptrdiff_t j = 0; j < Ncols; j += NR)
    for (ptrdiff_t i = 0; i < M; i += MR)
      micro_tile<A>(K, a + i * lda_i, lda_i, lda_p, pk + (j / NR) * K * NR, NR, c + i * ldc + j, ldc, accumulate);
}

// C[M x Ncols] (+)= A-op[M x K] * B[K x Ncols] with B row-major (b[p * ldb + j]), packed one strip at a time.
// M % MR == 0 and Ncols % NR == 0 (callers pad).
template <typename A>
static inline void gemm_padded(ptrdiff_t M, ptrdiff_t Ncols, ptrdiff_t K, const A* a, ptrdiff_t lda_i,
                               ptrdiff_t lda_p, const A* b, ptrdiff_t ldb, A* c, ptrdiff_t ldc, bool accumulate) {
  constexpr int NR = Tile<A>::NR;
  thread_local std::vector<A> packed;
  if (static_cast<ptrdiff_t>(packed.size()) < K * NR) packed.resize(K * NR);
  for (ptrdiff_t j = 0; j < Ncols; j += NR) {
    for (ptrdiff_t p = 0; p < K; ++p) std::memcpy(packed.data() + p * NR, b + p * ldb + j, NR * sizeof(A));
    gemm_packed<A>(M, NR, K, a, lda_i, lda_p, packed.data(), c + j, ldc, accumulate);
  }
}

static inline ptrdiff_t round_up(ptrdiff_t x, ptrdiff_t m) { return (x + m - 1) / m * m; }

}  // namespace cpu
}  // namespace conmim
