// CUDA kernels for the ConMIM patch-contrast loss: same contract as the Triton kernels (kernels/patch_contrast.py).
// Student and teacher may differ in dtype: each is read in its own, staged in shared memory in a common type
// (theirs when they agree, else float32), and each gradient is written in its input's dtype.
//
// Work is indexed by a device-side order (each image's masked patches first) and per-image counts, so no launch
// depends on a host-side count. A block owns kTile (32) rows of one image and streams the image's keys in tiles
// of kTile, the feature dim in chunks of kChunk (32):
// - S = Q K^T per tile on tensor cores, fp32 accumulate (see Mma): WMMA 16x16x16 for a bf16 or fp16 pair, TF32
//   16x16x8 for a pair with an fp32 side, each fp32 operand split in two TF32 parts, unless the logits can be
//   large (Args::exact_logits: fp32 FMA); logits = S / (|q| |k|) / tau with norms accumulated in fp32;
// - forward: the block's query rows staged once in dynamic shared memory when the device has room for them
//   (smem_plan), else streamed chunk by chunk with the keys; the key chunks go through two buffers (the
//   copy of the next chunk, cp.async where the layout allows, in flight during the product of this one); an
//   online logsumexp per row (one warp per row, one lane per key), the positive's logit picked on the fly;
//   writes loss and lse (0 on unmasked rows);
// - backward (queries): the tile is recomputed, the softmax kept exact with a running max (online_tile), dQ
//   accumulates in shared memory (G K on tensor cores with G split in two TF32 parts, fp32 keys too: 3xTF32),
//   then the positive's term and the L2 Jacobian; every row of d(student) written (0 on unmasked rows);
// - backward (keys, only when asked): one block per key tile loops over the masked query tiles, dK in shared
//   memory, then the L2 Jacobian.
// Scratch is O(tile x d) per block: never B x N x N.
#ifndef CONMIM_CUDA_ON_CPU
#include <cuda_pipeline_primitives.h>
#include <mma.h>
#endif

#include <array>
#include <atomic>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.h"
#include "cuda/cuda_common.cuh"
#include "cuda/patch_contrast.h"

namespace conmim {
namespace cuda {
namespace {

constexpr int kTile = 32;     // query rows and key columns per tile
constexpr int kChunk = 32;    // feature-dim chunk staged in shared memory
constexpr int kThreads = 128;  // 4 warps
constexpr int kPad = 8;       // shared-memory row padding (keeps WMMA's ldm a multiple of 8 elements)
static_assert(kMaxDim % kChunk == 0, "the accumulator rows are padded to whole chunks");
constexpr int kCopyBytes = 16;  // one cp.async copy
static_assert((kChunk + kPad) * 2 % kCopyBytes == 0 && kChunk * 2 % kCopyBytes == 0,
              "staged rows and chunks hold whole 16-byte copies for 2- and 4-byte types");
constexpr float kNormEps = 1e-12f;

// The type both operands are staged in: theirs when they agree (tensor-core MMA for bf16/fp16), else float32.
template <typename TS, typename TT>
using Staged = typename std::conditional<std::is_same<TS, TT>::value, TS, float>::type;

// How a (student, teacher) pair's products run. kHalf: a bf16 or fp16 pair, staged as such, WMMA m16n16k16.
// kTf32: an fp32 pair or a mixed pair, staged as float, TF32 WMMA m16n16k8: bf16 and fp16 values are exact in
// TF32, and an fp32 operand x goes in as two TF32 parts, hi = tf32(x) and lo = tf32(x - hi) (about 21
// significant bits; the backward's G always does), lo lo dropped (an fp32 pair: 3xTF32, A_hi B_hi + A_lo B_hi +
// A_hi B_lo), so the products keep fp32-level precision. The logits of a pair with an fp32 side run as fp32 FMA
// instead where they can be large (Args::exact_logits, chosen by the caller: LossCall::exact_logits, set from
// conmim/limits.py's exact_logits, the same gate as the Triton kernels': unnormalized rows, or tau < 0.05): there split logits failed DESIGN.md's rule, at most 2x plain fp32 torch's error, where
// 1 / tau magnifies the logits' rounding: an fp32 pair's d(student) came out 4-6x plain torch's error at tau =
// 1e-3, 1e-4, 1e-5 and on unnormalized rows of norm 30 (tests/test_cuda_on_cpu.py, the large-logit cases; some
// still failed with the low products summed apart from S, or with three TF32 parts a side and six products), and
// passed at tau = 0.05 with normalized rows (|logit| <= 20); mixed pairs' split logits failed some of these cases
// too (bf16 with fp32 at tau = 1e-4, fp32 with fp16 at norm 30). The choice is per launch, a uniform branch.
enum class Mma { kHalf, kTf32 };
template <typename TS, typename TT>
constexpr Mma kMma = std::is_same<Staged<TS, TT>, float>::value ? Mma::kTf32 : Mma::kHalf;
// Whether a pair has an fp32 side, whose logits Args::exact_logits moves to fp32 FMA (a mixed bf16 / fp16 pair's
// TF32 products are exact: it keeps them).
template <typename TS, typename TT>
constexpr bool kHasF32 = std::is_same<TS, float>::value || std::is_same<TT, float>::value;
// The k of the pair's logits MMA.
template <typename TS, typename TT>
constexpr int kMmaK = kMma<TS, TT> == Mma::kHalf ? 16 : 8;

struct Args {
  const void* s;  // student, TS
  const void* t;  // teacher, TT
  const int64_t* order;
  const int* counts;
  const int64_t* pos;
  float* stats;  // [B, N, 3]: each masked row's (m, s, rest), written by bwd_q, read by bwd_k (see online_tile)
  int64_t s_sb, s_sn, s_sd, t_sb, t_sn, t_sd, p_sb, p_sn;
  int N, D;
  float inv_tau;
  bool normalize;
  bool exact_logits;        // the logits of a pair with an fp32 side on fp32 FMA (see Mma)
  bool s_copy16, t_copy16;  // rows of 16-byte aligned runs of features (see copy16_ok): cp.async can stage them
  bool q_resident;          // forward: the query rows stay in shared memory (smem_plan)
};


__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// WMMA loads and stores need 256-bit aligned tile pointers: every tile starts on a 32-byte boundary and the
// fragment offsets used (16 rows, 16 columns) keep that alignment.
struct TileState {
  alignas(32) float s[kTile][kTile + 4];  // logits tile, then G
  float inv_q[kTile], inv_k[kTile];
  float qsq[kTile], ksq[kTile];
  int64_t q_row[kTile];  // patch index of each query row
  int64_t pos[kTile];    // key index of each query's positive
  bool q_ok[kTile];
};

// The backward's staging: one feature chunk of the query rows and of the key rows.
template <typename T>
struct Tiles : TileState {
  alignas(32) T q[kTile][kChunk + kPad];
  alignas(32) T k[kTile][kChunk + kPad];
};

// The forward's: the key chunks in two buffers (the query rows, or their chunks, are in dynamic shared memory),
// the rows' online logsumexp and positive logit.
template <typename T>
struct FwdTiles : TileState {
  alignas(32) T k[2][kTile][kChunk + kPad];
  float m[kTile], l[kTile], pos_logit[kTile];
};

// The block's share of S = Q K^T: warp w's 16 x 16 block (w / 2, w % 2) on tensor cores (K: the MMA's k), or
// with exact logits the 8 entries (tid / 4, 8 (tid % 4) + i) in fp32, held in the fragment's first 8 elements
// (its 8 registers a thread on a GPU).
template <int K>
struct SAcc {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, K, float> f;
  static_assert(decltype(f)::num_elements >= 8, "the fragment holds a thread's 8 fp32 entries");
};

// x as T: itself, or converted through float.
template <typename T, typename Src>
__device__ __forceinline__ T staged(Src x) {
  if constexpr (std::is_same<T, Src>::value)
    return x;
  else
    return from_f<T>(to_f(x));
}

// Stages one feature chunk [d0, d0 + kChunk) of kTile rows of src into dst (row stride ld elements) as T, zero
// past D and on the rows left out. row_of(r): the offset in elements of row r's start from src (feature stride
// sd), or -1 to leave the row out. With copy16 (T == Src, sd == 1, every row start 16-byte aligned:
// Args::s_copy16 / t_copy16) the chunk goes by 16-byte cp.async copies, zero-filled past D, which land at the
// caller's __pipeline_wait_prior; otherwise by plain loads, complete on return: a feature stride or a misaligned
// row start (a 16-byte copy needs 16-byte aligned addresses on both sides), or Src != T (the bf16/fp16 operand of
// a mixed pair, staged as float32: a copy cannot convert; the pair's float32 operand still goes by cp.async).
template <typename T, typename Src, typename RowOf>
__device__ __forceinline__ void stage_chunk(T* dst, int ld, const Src* src, int64_t sd, RowOf row_of, int d0, int D,
                                            bool copy16) {
  if constexpr (std::is_same<T, Src>::value) {
    if (copy16) {
      constexpr int kVec = kCopyBytes / sizeof(T), kCopies = kTile * kChunk / kVec;
      static_assert(kCopies % kThreads == 0, "every thread issues the same number of copies");
#pragma unroll
      for (int i = 0; i < kCopies / kThreads; ++i) {
        const int e = i * kThreads + threadIdx.x;
        const int r = e / (kChunk / kVec), c = e % (kChunk / kVec) * kVec;
        const int64_t row = row_of(r);
        const int n = row < 0 ? 0 : max(0, min(kVec, D - d0 - c));  // elements to copy, the rest zeroed
        // a copy of 0 bytes reads nothing, but its source must still be a global address: the tensor's start
        __pipeline_memcpy_async(dst + r * ld + c, n > 0 ? src + row + d0 + c : src, kCopyBytes,
                                kCopyBytes - n * sizeof(T));
      }
      return;
    }
  }
  for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
    const int r = e / kChunk, c = e % kChunk;
    const int64_t row = row_of(r);
    dst[r * ld + c] =
        row >= 0 && d0 + c < D ? staged<T>(src[row + static_cast<int64_t>(d0 + c) * sd]) : from_f<T>(0.f);
  }
}

// Loads rows [rows] of one feature chunk of a [B, N, D] tensor of Src into dst as T (zero outside), plain loads;
// the backward's loader. (Written out rather than as stage_chunk with a row function: that form spilled 4 bytes
// in bwd_k for fp32-staged pairs at sm_80.)
template <typename T, typename Src>
__device__ __forceinline__ void load_chunk(T (*dst)[kChunk + kPad], const Src* base, int64_t sb, int64_t sn, int64_t sd, int64_t b,
                           const int64_t* rows, const bool* ok, int d0, int D) {
  for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
    const int r = e / kChunk, c = e % kChunk;
    dst[r][c] = ok[r] && d0 + c < D ? staged<T>(base[b * sb + rows[r] * sn + static_cast<int64_t>(d0 + c) * sd])
                                    : from_f<T>(0.f);
  }
}

// The backward's products G K and G^T Q on tensor cores, for every pair: G (fp32) as the sum of two TF32 parts,
// hi + lo (about 21 significant bits), times the features of one chunk, which bf16 and fp16 hold exactly in TF32
// (fp32 features are split too: G_hi X_hi + G_lo X_hi + G_hi X_lo).
struct GradMma {
  alignas(32) float hi[kTile][kTile + 4];
  alignas(32) float lo[kTile][kTile + 4];
  // two feature chunks of the other operand, as float: one multiplied while the next is loaded
  alignas(32) float x[2][kTile][kChunk + kPad];
};

// Backward accumulators ([kTile][acc_ld] fp32 in dynamic shared memory) have rows padded to whole feature chunks
// (the MMA path's 16 x 16 blocks stay aligned) plus 4 floats, so that the rows of a WMMA load or store start in
// different banks (a row of a multiple of 32 floats puts all 16 rows of a block on the same banks).
__host__ __device__ constexpr int padded_dim(int D) { return (D + kChunk - 1) / kChunk * kChunk; }
__host__ __device__ constexpr int acc_ld(int D) { return padded_dim(D) + 4; }
static_assert(acc_ld(kChunk) * 16 * sizeof(float) % 32 == 0,
              "a 16-row block of the accumulator starts 32-byte aligned (WMMA's pointers)");

// v = hi + lo, both TF32 (the tensor cores' input precision), together about 21 significant bits of v.
__device__ __forceinline__ void tf32_parts(float v, float& hi, float& lo) {
  hi = nvcuda::wmma::__float_to_tf32(v);
  lo = nvcuda::wmma::__float_to_tf32(v - hi);
}

// Splits v into the TF32 parts of a G tile entry.
__device__ __forceinline__ void split_tf32(GradMma& mm, int i, int j, float v) {
  tf32_parts(v, mm.hi[i][j], mm.lo[i][j]);
}

// A TF32 fragment holding fp32 values -> its two TF32 parts: hi in place, lo returned (elementwise: fragments of
// one type map their elements alike).
template <typename Frag>
__device__ __forceinline__ Frag split_fragment(Frag& hi) {
  Frag lo;
#pragma unroll
  for (int t = 0; t < hi.num_elements; ++t) tf32_parts(hi.x[t], hi.x[t], lo.x[t]);
  return lo;
}

// acc[0:32][d0:d0+32] += (hi + lo) x on tensor cores (TF32 m16n16k8, fp32 accumulate); warp w owns the 16 x 16
// block (w / 2, w % 2). acc rows have ld floats. kSplitX: x holds fp32 values (else values exact in TF32).
template <bool kSplitX>
__device__ __forceinline__ void mma_chunk(float* acc, int ld, int d0, const GradMma& mm, const float (*x)[kChunk + kPad]) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32;
  const int br = (warp / 2) * 16, bc = (warp % 2) * 16;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> c;
  float* out = acc + br * ld + d0 + bc;
  wmma::load_matrix_sync(c, out, ld, wmma::mem_row_major);
#pragma unroll
  for (int k = 0; k < kTile; k += 8) {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> b;
    wmma::load_matrix_sync(b, &x[k][bc], kChunk + kPad);
    wmma::load_matrix_sync(a, &mm.hi[br][k], kTile + 4);
    // A TF32 fragment must hold TF32 values before any product (the tensor cores' reading of an unconverted fp32
    // value is unspecified), so an fp32 x is split first: b keeps its TF32 high part, b_lo the residual. One A
    // fragment at a time (hi, then lo) keeps the registers of bwd_k's fp32 case within budget.
    if constexpr (kSplitX) {
      const auto b_lo = split_fragment(b);
      wmma::mma_sync(c, a, b_lo, c);
    }
    wmma::mma_sync(c, a, b, c);
    wmma::load_matrix_sync(a, &mm.lo[br][k], kTile + 4);
    wmma::mma_sync(c, a, b, c);
  }
  wmma::store_matrix_sync(out, c, ld, wmma::mem_row_major);
}

// acc[32][ld] += (hi + lo) X over the whole feature dim, X = rows `rows` of the [B, N, D] tensor `src` (zero where
// not ok), one chunk at a time.
// Double-buffered: chunk c is multiplied from one buffer and chunk c + 1 loaded into the other with no barrier
// between, so a warp done with its products loads while the others multiply; one barrier per chunk (the buffer
// a load overwrites was last read by the previous chunk's products, finished at the previous barrier). Loading
// after the products rather than before keeps the loads' registers apart from the fragments' (loaded before,
// bwd_k spilled 40 bytes in bf16 and fp16). Ends on a barrier, so the caller may overwrite mm's G at once.
template <typename Src>
__device__ void mma_rows(float* acc, int ld, GradMma& mm, const Src* src, int64_t sb, int64_t sn, int64_t sd,
                         int64_t b, const int64_t* rows, const bool* ok, int D) {
  float(*cur)[kChunk + kPad] = mm.x[0];
  float(*next)[kChunk + kPad] = mm.x[1];
  load_chunk<float, Src>(cur, src, sb, sn, sd, b, rows, ok, 0, D);
  __syncthreads();
  for (int d0 = 0; d0 < D; d0 += kChunk) {
    mma_chunk<std::is_same<Src, float>::value>(acc, ld, d0, mm, cur);
    if (d0 + kChunk < D) load_chunk<float, Src>(next, src, sb, sn, sd, b, rows, ok, d0 + kChunk, D);
    __syncthreads();
    const auto done = cur;
    cur = next;
    next = done;
  }
}

// Adds one staged feature chunk to S (acc) and to the rows' squared norms (ksq, and qsq when want_q): q = the
// query rows (row stride ldq), k = the key rows (row stride kChunk + kPad), both in shared memory. exact: the
// product of a pair with an fp32 side on fp32 FMA (Args::exact_logits).
template <typename TS, typename TT, typename T = Staged<TS, TT>>
__device__ void chunk_product(TileState& sh, const T* q, int ldq, const T (*k)[kChunk + kPad], bool want_q,
                              bool exact, SAcc<kMmaK<TS, TT>>& acc) {
  {  // the rows' squared norms, over all warps: four lanes per row, a quarter of the chunk each
    static_assert(kThreads == 4 * kTile && kChunk % 4 == 0, "four threads per row of the tile");
    const int r = threadIdx.x / 4, c0 = (threadIdx.x % 4) * (kChunk / 4);
    float kk = 0.f, qq = 0.f;
#pragma unroll 1
    for (int c = c0; c < c0 + kChunk / 4; ++c) {
      const float kv = to_f(k[r][c]);
      kk += kv * kv;
      if (want_q) {
        const float qv = to_f(q[r * ldq + c]);
        qq += qv * qv;
      }
    }
    for (int o = 1; o < 4; o <<= 1) {
      kk += __shfl_xor_sync(0xffffffffu, kk, o);
      qq += __shfl_xor_sync(0xffffffffu, qq, o);
    }
    if (threadIdx.x % 4 == 0) {
      sh.ksq[r] += kk;
      if (want_q) sh.qsq[r] += qq;
    }
  }
  if (!kHasF32<TS, TT> || !exact) {
    // warp w owns the 16 x 16 output block (w / 2, w % 2); A = Q rows, B = K^T (K rows read column-major).
    using namespace nvcuda;
    using Prec = typename std::conditional<kMma<TS, TT> == Mma::kTf32, wmma::precision::tf32, T>::type;
    constexpr int K = kMmaK<TS, TT>;
    const int warp = threadIdx.x / 32;
    const int br = (warp / 2) * 16, bc = (warp % 2) * 16;
#pragma unroll
    for (int kk = 0; kk < kChunk; kk += K) {
      wmma::fragment<wmma::matrix_a, 16, 16, K, Prec, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, K, Prec, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, q + br * ldq + kk, ldq);
      wmma::load_matrix_sync(fb, &k[bc][kk], kChunk + kPad);
      // each fp32 side split (both split before any product: a part must meet the other side's TF32 hi)
      constexpr bool kSplitQ = std::is_same<TS, float>::value, kSplitK = std::is_same<TT, float>::value;
      decltype(fa) q_lo;
      decltype(fb) k_lo;
      if constexpr (kSplitQ) q_lo = split_fragment(fa);
      if constexpr (kSplitK) k_lo = split_fragment(fb);
      if constexpr (kSplitQ) wmma::mma_sync(acc.f, q_lo, fb, acc.f);
      if constexpr (kSplitK) wmma::mma_sync(acc.f, fa, k_lo, acc.f);
      wmma::mma_sync(acc.f, fa, fb, acc.f);
    }
  } else {
    const int r = threadIdx.x / 4, c0 = (threadIdx.x % 4) * 8;
#pragma unroll 4  // unrolled whole or not at all, an fp32 pair's bwd_k spilled 4 bytes (sm_80 or sm_90)
    for (int c = 0; c < kChunk; ++c) {
      const float qv = to_f(q[r * ldq + c]);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc.f.x[i] += qv * to_f(k[c0 + i][c]);
    }
  }
}

// After the last chunk: S (acc) to sh.s, and the rows' inverse norms (inv_q when want_q).
template <typename TS, typename TT>
__device__ void finish_logits(TileState& sh, const SAcc<kMmaK<TS, TT>>& acc, bool normalize, bool exact,
                              bool want_q) {
  __syncthreads();
  if (!kHasF32<TS, TT> || !exact) {
    const int warp = threadIdx.x / 32;
    const int br = (warp / 2) * 16, bc = (warp % 2) * 16;
    nvcuda::wmma::store_matrix_sync(&sh.s[br][bc], acc.f, kTile + 4, nvcuda::wmma::mem_row_major);
  } else {
    const int r = threadIdx.x / 4, c0 = (threadIdx.x % 4) * 8;
#pragma unroll
    for (int i = 0; i < 8; ++i) sh.s[r][c0 + i] = acc.f.x[i];
  }
  if (threadIdx.x < kTile) {
    sh.inv_k[threadIdx.x] = normalize ? 1.f / fmaxf(sqrtf(sh.ksq[threadIdx.x]), kNormEps) : 1.f;
    if (want_q) sh.inv_q[threadIdx.x] = normalize ? 1.f / fmaxf(sqrtf(sh.qsq[threadIdx.x]), kNormEps) : 1.f;
  }
  __syncthreads();
}

// S[32][32] = Q K^T over the full feature dim, plus the rows' squared norms (qsq when want_q); for the backward,
// which stages the query rows chunk by chunk with the key rows.
template <typename TS, typename TT, typename T = Staged<TS, TT>>
__device__ void logits_tile(Tiles<T>& sh, const Args& a, int64_t b, const int64_t* k_rows, const bool* k_ok,
                            bool want_q) {
  const TS* s = static_cast<const TS*>(a.s);
  const TT* t = static_cast<const TT*>(a.t);
  SAcc<kMmaK<TS, TT>> acc;
  nvcuda::wmma::fill_fragment(acc.f, 0.f);
  if (threadIdx.x < kTile) {
    sh.ksq[threadIdx.x] = 0.f;
    if (want_q) sh.qsq[threadIdx.x] = 0.f;
  }
  for (int d0 = 0; d0 < a.D; d0 += kChunk) {
    __syncthreads();
    load_chunk<T, TS>(sh.q, s, a.s_sb, a.s_sn, a.s_sd, b, sh.q_row, sh.q_ok, d0, a.D);
    load_chunk<T, TT>(sh.k, t, a.t_sb, a.t_sn, a.t_sd, b, k_rows, k_ok, d0, a.D);
    __syncthreads();
    chunk_product<TS, TT>(sh, &sh.q[0][0], kChunk + kPad, sh.k, want_q, a.exact_logits, acc);
  }
  finish_logits<TS, TT>(sh, acc, a.normalize, a.exact_logits, want_q);
}

// Fills the block's query rows from the work order: q_row, q_ok (masked), pos. Returns the block's first row.
// A positive index outside [0, N) becomes -1 (kNoPositive): the host cannot check the indices under torch.compile
// or graph capture, so the kernels bound them and give that row a NaN loss and NaN gradients instead of reading
// another row or past the teacher.
constexpr int64_t kNoPositive = -1;
__device__ void query_rows(TileState& sh, const Args& a, int64_t b, int m0, int cnt) {
  if (threadIdx.x < kTile) {
    const int m = m0 + threadIdx.x;
    const bool in = m < a.N;
    const int64_t row = in ? a.order[b * a.N + m] : 0;
    sh.q_row[threadIdx.x] = row;
    sh.q_ok[threadIdx.x] = m < cnt;
    int64_t p = row;
    if (a.pos != nullptr && m < cnt) {
      p = a.pos[b * a.p_sb + row * a.p_sn];
      if (p < 0 || p >= a.N) p = kNoPositive;
    }
    sh.pos[threadIdx.x] = p;
  }
}

// The forward. With a.q_resident the block's query rows are staged once, whole, in dynamic shared memory
// ([kTile][padded D + kPad] of T), else (a device without room for them: smem_plan) one feature chunk
// per step with the keys, in two buffers ([2][kTile][kChunk + kPad] of T) like the keys. The key rows stream
// through FwdTiles::k one feature chunk at a time, step i = (key tile i / chunks, chunk i % chunks) in buffer
// i % 2. Step i + 1 is issued before the product of step i, so with cp.async its copy is in flight during the
// MMA; one commit group per step (the first also holds the resident query rows), and waiting for all but the
// newest group lands step i.
template <typename TS, typename TT>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const Args a, float* loss, float* lse) {
  using T = Staged<TS, TT>;
  const int ldq = a.q_resident ? padded_dim(a.D) + kPad : kChunk + kPad;
  T* q = dynamic_smem<T>();
  __shared__ FwdTiles<T> sh;
  const int64_t b = blockIdx.y;
  const int m0 = blockIdx.x * kTile;
  const int cnt = a.counts[b];
  query_rows(sh, a, b, m0, cnt);
  if (threadIdx.x < kTile) {
    sh.m[threadIdx.x] = -INFINITY;
    sh.l[threadIdx.x] = 0.f;
    sh.pos_logit[threadIdx.x] = 0.f;
  }
  __syncthreads();
  if (m0 < cnt) {
    const TS* s = static_cast<const TS*>(a.s);
    const TT* t = static_cast<const TT*>(a.t);
    const auto q_row_of = [&](int r) { return sh.q_ok[r] ? b * a.s_sb + sh.q_row[r] * a.s_sn : int64_t{-1}; };
    const int chunks = (a.D + kChunk - 1) / kChunk;
    const int steps = (a.N + kTile - 1) / kTile * chunks;
    const auto stage_step = [&](int step) {
      const int n0 = step / chunks * kTile, d0 = step % chunks * kChunk;
      if (!a.q_resident)
        stage_chunk<T, TS>(q + step % 2 * kTile * ldq, ldq, s, a.s_sd, q_row_of, d0, a.D, a.s_copy16);
      const auto k_row_of = [&](int r) { return n0 + r < a.N ? b * a.t_sb + (n0 + r) * a.t_sn : int64_t{-1}; };
      stage_chunk<T, TT>(&sh.k[step % 2][0][0], kChunk + kPad, t, a.t_sd, k_row_of, d0, a.D, a.t_copy16);
    };
    if (a.q_resident)
      for (int d0 = 0; d0 < a.D; d0 += kChunk)
        stage_chunk<T, TS>(q + d0, ldq, s, a.s_sd, q_row_of, d0, a.D, a.s_copy16);
    stage_step(0);
    __pipeline_commit();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int step = 0;
    for (int n0 = 0; n0 < a.N; n0 += kTile) {
      SAcc<kMmaK<TS, TT>> acc;
      nvcuda::wmma::fill_fragment(acc.f, 0.f);
      if (threadIdx.x < kTile) {
        sh.ksq[threadIdx.x] = 0.f;
        if (n0 == 0) sh.qsq[threadIdx.x] = 0.f;
      }
      for (int d0 = 0; d0 < a.D; d0 += kChunk, ++step) {
        if (step + 1 < steps) stage_step(step + 1);  // its buffers' last readers passed the barrier below
        __pipeline_commit();                         // (an empty group after the last step)
        __pipeline_wait_prior(1);                    // this thread's copies of step `step` have landed
        __syncthreads();                             // and every thread's
        chunk_product<TS, TT>(sh, a.q_resident ? q + d0 : q + step % 2 * kTile * ldq, ldq, sh.k[step % 2], n0 == 0,
                              a.exact_logits, acc);
        __syncthreads();
      }
      finish_logits<TS, TT>(sh, acc, a.normalize, a.exact_logits, n0 == 0);
      for (int r = warp; r < kTile; r += kThreads / 32) {
        if (!sh.q_ok[r]) continue;
        const int col = n0 + lane;
        const float x = col < a.N ? sh.s[r][lane] * sh.inv_q[r] * sh.inv_k[lane] * a.inv_tau : -INFINITY;
        const float m_new = fmaxf(sh.m[r], warp_max(x));
        const float e = warp_sum(col < a.N ? __expf(x - m_new) : 0.f);
        const float hit = warp_sum(col == sh.pos[r] ? x : 0.f);
        if (lane == 0) {
          sh.l[r] = sh.l[r] * __expf(sh.m[r] - m_new) + e;
          sh.m[r] = m_new;
          sh.pos_logit[r] += hit;
        }
      }
      __syncthreads();
    }
  }
  if (threadIdx.x < kTile && m0 + static_cast<int>(threadIdx.x) < a.N) {
    const int r = threadIdx.x;
    const int64_t o = b * a.N + sh.q_row[r];
    // loss = (max - positive) + log(sum exp(x - max)): no difference of two large numbers, and >= 0 (the
    // largest term is exp(0) = 1).
    const float log_sum = sh.q_ok[r] ? logf(sh.l[r]) : 0.f;
    const float row_loss = sh.pos[r] == kNoPositive ? NAN : (sh.m[r] - sh.pos_logit[r]) + log_sum;
    loss[o] = sh.q_ok[r] ? row_loss : 0.f;
    lse[o] = sh.q_ok[r] ? sh.m[r] + log_sum : 0.f;
  }
}

// The upstream gradient of the block's query rows (0 for rows that are not masked).
template <typename T>
__device__ void row_grads(const Tiles<T>& sh, int64_t b, const float* grad, int64_t g_sb, int64_t g_sn, float* g) {
  if (threadIdx.x < kTile) {
    const int r = threadIdx.x;
    g[r] = !sh.q_ok[r] ? 0.f : sh.pos[r] == kNoPositive ? NAN : grad[b * g_sb + sh.q_row[r] * g_sn];
  }
}

// The backward never uses the saved fp32 logsumexp (its rounding, eps * |lse|, would be a relative error in every
// probability) nor p - 1 for the positive (which loses its digits when the softmax saturates). Instead bwd_q keeps
// per query row, across the key tiles, the running max m of the logits, s = sum_j exp(x_j - m) and rest = the part
// of s over the keys other than the positive, so softmax_j = exp(x_j - m) / s and 1 - softmax_pos = rest / s, and
// leaves (m, s, rest) in Args::stats for bwd_k.

// bwd_q: folds one key tile into the rows' (m, s, rest) and turns the tile into E[r][j] = exp(x_rj - m_r) for the
// keys other than the positive (0 at the positive and outside the valid rows / keys), relative to the updated max;
// scale[r] = exp(m_old - m_new) rescales what was accumulated before. One warp per row, the lanes are the keys.
template <typename T>
__device__ void online_tile(Tiles<T>& sh, const Args& a, const int64_t* k_rows, const bool* k_ok, float* m, float* s,
                            float* rest, float* scale) {
  static_assert(kTile == 32, "one warp per row of the tile: the lanes are the keys");
  const int warp = threadIdx.x / 32, j = threadIdx.x % 32;
  for (int r = warp; r < kTile; r += kThreads / 32) {
    const bool valid = sh.q_ok[r] && k_ok[j];
    const float x = valid ? sh.s[r][j] * sh.inv_q[r] * sh.inv_k[j] * a.inv_tau : -INFINITY;
    const float m_new = fmaxf(m[r], warp_max(x));
    const float e = valid ? __expf(x - m_new) : 0.f;
    const float other = k_rows[j] == sh.pos[r] ? 0.f : e;
    const float e_sum = warp_sum(e), o_sum = warp_sum(other);
    sh.s[r][j] = other;
    if (j == 0 && sh.q_ok[r]) {
      const float f = __expf(m[r] - m_new);  // 0 on the first tile (m = -inf)
      scale[r] = f;
      s[r] = s[r] * f + e_sum;
      rest[r] = rest[r] * f + o_sum;
      m[r] = m_new;
    }
  }
  __syncthreads();
}

// bwd_q, after the last key tile: dq_r <- g_r / tau * (dq_r - rest_r k_hat[pos_r]) / s_r, where dq_r holds
// sum_{j != pos} exp(x_rj - m_r) k_hat_j; and the rows' (m, s, rest) go to Args::stats. One warp per row.
template <typename TT>
__device__ void finish_rows(float* dq, int ld, const Args& a, int64_t b, const int64_t* q_row, const int64_t* pos,
                            const bool* ok, const float* g, const float* m, const float* s, const float* rest) {
  const TT* t = static_cast<const TT*>(a.t);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < kTile; r += kThreads / 32) {
    if (!ok[r]) continue;
    const TT* key = t + b * a.t_sb + (pos[r] == kNoPositive ? 0 : pos[r]) * a.t_sn;  // g[r] is NaN there
    float sq = 0.f;
    if (a.normalize) {
      for (int d = lane; d < a.D; d += 32) {
        const float x = to_f(key[static_cast<int64_t>(d) * a.t_sd]);
        sq += x * x;
      }
      sq = warp_sum(sq);
    }
    const float inv = a.normalize ? 1.f / fmaxf(sqrtf(sq), kNormEps) : 1.f;
    const float c = g[r] * a.inv_tau / s[r];
    const float c_pos = c * rest[r] * inv;
    for (int d = lane; d < a.D; d += 32)
      dq[r * ld + d] = c * dq[r * ld + d] - c_pos * to_f(key[static_cast<int64_t>(d) * a.t_sd]);
    if (lane == 0) {
      float* st = a.stats + (b * a.N + q_row[r]) * 3;
      st[0] = m[r];
      st[1] = s[r];
      st[2] = rest[r];
    }
  }
  __syncthreads();
}

// bwd_k: turns the logits tile into G (fp32) in place from the rows' (m, s, rest) that bwd_q left:
// G[r][j] = g_r / tau * exp(x_rj - m_r) / s_r, and at the positive -g_r / tau * rest_r / s_r; zero outside the
// valid rows / keys.
template <typename T>
__device__ void grad_tile(Tiles<T>& sh, const Args& a, const float* g, const float* m, const float* s,
                          const float* rest, const int64_t* k_rows, const bool* k_ok) {
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, j = e % kTile;
    float v = 0.f;
    if (sh.q_ok[r] && k_ok[j]) {
      const float c = g[r] * a.inv_tau / s[r];
      if (k_rows[j] == sh.pos[r])
        v = -c * rest[r];
      else
        v = c * __expf(sh.s[r][j] * sh.inv_q[r] * sh.inv_k[j] * a.inv_tau - m[r]);
    }
    sh.s[r][j] = v;
  }
  __syncthreads();
}

// out[r][:] <- Jacobian of x / max(|x|, eps) applied to acc[r][:] (x = rows of `src`), written in T.
template <typename T>
__device__ void normalize_and_store(const float* acc, int ld, const T* src, int64_t sb, int64_t sn, int64_t sd,
                                    int64_t b, const int64_t* rows, const bool* ok, const bool* in_range,
                                    const float* inv_norm, bool normalize, int D, T* out, int64_t N) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < kTile; r += kThreads / 32) {
    if (!in_range[r]) continue;
    T* dst = out + (b * N + rows[r]) * static_cast<int64_t>(D);
    if (!ok[r]) {
      for (int d = lane; d < D; d += 32) dst[d] = from_f<T>(0.f);
      continue;
    }
    float proj = 0.f, sq = 0.f;
    if (normalize) {
      for (int d = lane; d < D; d += 32) {
        const float x = to_f(src[b * sb + rows[r] * sn + static_cast<int64_t>(d) * sd]);
        proj += x * acc[r * ld + d];
        sq += x * x;
      }
      proj = warp_sum(proj);
      sq = warp_sum(sq);
    }
    const float inv = inv_norm[r];
    const float keep = sqrtf(sq) >= kNormEps ? 1.f : 0.f;
    for (int d = lane; d < D; d += 32) {
      float v = acc[r * ld + d];
      if (normalize) {
        const float xh = to_f(src[b * sb + rows[r] * sn + static_cast<int64_t>(d) * sd]) * inv;
        v = (v - xh * proj * inv * keep) * inv;
      }
      dst[d] = from_f<T>(v);
    }
  }
}

template <typename TS, typename TT>
__global__ void __launch_bounds__(kThreads) bwd_q_kernel(const Args a, const float* grad, int64_t g_sb, int64_t g_sn,
                                                         TS* ds) {
  using T = Staged<TS, TT>;
  const int ld = acc_ld(a.D);
  float* dq = dynamic_smem<float>();  // [kTile][ld]
  __shared__ Tiles<T> sh;
  __shared__ GradMma mm;
  __shared__ float g[kTile], m[kTile], s[kTile], rest[kTile], scale[kTile];
  __shared__ int64_t k_rows[kTile];
  __shared__ bool k_ok[kTile], in_range[kTile];
  const int64_t b = blockIdx.y;
  const int m0 = blockIdx.x * kTile;
  const int cnt = a.counts[b];
  query_rows(sh, a, b, m0, cnt);
  if (threadIdx.x < kTile) {
    in_range[threadIdx.x] = m0 + static_cast<int>(threadIdx.x) < a.N;
    m[threadIdx.x] = -INFINITY;
    s[threadIdx.x] = 0.f;
    rest[threadIdx.x] = 0.f;
    scale[threadIdx.x] = 1.f;
  }
  for (int e = threadIdx.x; e < kTile * ld; e += kThreads) dq[e] = 0.f;
  __syncthreads();
  row_grads<T>(sh, b, grad, g_sb, g_sn, g);
  if (m0 < cnt) {
    const TT* t = static_cast<const TT*>(a.t);
    for (int n0 = 0; n0 < a.N; n0 += kTile) {
      if (threadIdx.x < kTile) {
        k_rows[threadIdx.x] = n0 + threadIdx.x;
        k_ok[threadIdx.x] = n0 + threadIdx.x < a.N;
      }
      __syncthreads();
      logits_tile<TS, TT>(sh, a, b, k_rows, k_ok, n0 == 0);
      online_tile<T>(sh, a, k_rows, k_ok, m, s, rest, scale);
      // dq[r][d] <- dq[r][d] * scale[r] + sum_j E[r][j] * k_hat[j][d]
      for (int e = threadIdx.x; e < kTile * kTile; e += kThreads)
        split_tf32(mm, e / kTile, e % kTile, sh.s[e / kTile][e % kTile] * sh.inv_k[e % kTile]);
      for (int e = threadIdx.x; e < kTile * ld; e += kThreads) dq[e] *= scale[e / ld];
      __syncthreads();
      mma_rows<TT>(dq, ld, mm, t, a.t_sb, a.t_sn, a.t_sd, b, k_rows, k_ok, a.D);
    }
    finish_rows<TT>(dq, ld, a, b, sh.q_row, sh.pos, sh.q_ok, g, m, s, rest);
  }
  normalize_and_store<TS>(dq, ld, static_cast<const TS*>(a.s), a.s_sb, a.s_sn, a.s_sd, b, sh.q_row, sh.q_ok, in_range,
                          sh.inv_q, a.normalize, a.D, ds, a.N);
}

// At least 3 blocks per SM (at most 168 registers): without a minimum, ptxas chose 80-96 registers for the
// double-buffered loop and spilled (bf16, fp16 and fp32 pairs); the static shared memory allows 3 blocks up to
// d = 256 anyway.
template <typename TS, typename TT>
__global__ void __launch_bounds__(kThreads, 3) bwd_k_kernel(const Args a, const float* grad, int64_t g_sb, int64_t g_sn,
                                                         TT* dt) {
  using T = Staged<TS, TT>;
  const int ld = acc_ld(a.D);
  float* dk = dynamic_smem<float>();  // [kTile][ld]
  __shared__ Tiles<T> sh;
  __shared__ GradMma mm;
  __shared__ float g[kTile], m[kTile], s_r[kTile], rest[kTile], inv_k_keep[kTile];
  __shared__ int64_t k_rows[kTile];
  __shared__ bool k_ok[kTile];
  const int64_t b = blockIdx.y;
  const int n0 = blockIdx.x * kTile;
  const int cnt = a.counts[b];
  if (threadIdx.x < kTile) {
    k_rows[threadIdx.x] = n0 + threadIdx.x;
    k_ok[threadIdx.x] = n0 + threadIdx.x < a.N;
    inv_k_keep[threadIdx.x] = 1.f;
  }
  for (int e = threadIdx.x; e < kTile * ld; e += kThreads) dk[e] = 0.f;
  __syncthreads();
  const TS* s = static_cast<const TS*>(a.s);
  for (int m0 = 0; m0 < cnt; m0 += kTile) {
    query_rows(sh, a, b, m0, cnt);
    __syncthreads();
    row_grads<T>(sh, b, grad, g_sb, g_sn, g);
    if (threadIdx.x < kTile && sh.q_ok[threadIdx.x]) {
      const float* st = a.stats + (b * a.N + sh.q_row[threadIdx.x]) * 3;
      m[threadIdx.x] = st[0];
      s_r[threadIdx.x] = st[1];
      rest[threadIdx.x] = st[2];
    }
    logits_tile<TS, TT>(sh, a, b, k_rows, k_ok, true);
    if (threadIdx.x < kTile) inv_k_keep[threadIdx.x] = sh.inv_k[threadIdx.x];
    grad_tile<T>(sh, a, g, m, s_r, rest, k_rows, k_ok);
    // dk[j][d] += sum_r G[r][j] * q_hat[r][d]
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads)  // G^T, scaled by the query norms
      split_tf32(mm, e % kTile, e / kTile, sh.s[e / kTile][e % kTile] * sh.inv_q[e / kTile]);
    __syncthreads();
    mma_rows<TS>(dk, ld, mm, s, a.s_sb, a.s_sn, a.s_sd, b, sh.q_row, sh.q_ok, a.D);
  }
  if (cnt == 0 && threadIdx.x < kTile) {  // norms of the keys for the Jacobian when no tile ran
    float sq = 0.f;
    if (k_ok[threadIdx.x])
      for (int d = 0; d < a.D; ++d) {
        const float x = to_f(static_cast<const TT*>(a.t)[b * a.t_sb + k_rows[threadIdx.x] * a.t_sn +
                                                        static_cast<int64_t>(d) * a.t_sd]);
        sq += x * x;
      }
    inv_k_keep[threadIdx.x] = a.normalize ? 1.f / fmaxf(sqrtf(sq), kNormEps) : 1.f;
  }
  __syncthreads();
  normalize_and_store<TT>(dk, ld, static_cast<const TT*>(a.t), a.t_sb, a.t_sn, a.t_sd, b, k_rows, k_ok, k_ok,
                          inv_k_keep, a.normalize, a.D, dt, a.N);
}

Args make(const LossCall& p) {
  if (p.D < 1 || p.D > kMaxDim)
    throw std::invalid_argument("conmim._C.patch_contrast_cuda: feature dim must lie in [1, " +
                                std::to_string(kMaxDim) + "], got " + std::to_string(p.D));
  if (p.B > kMaxGridY)
    throw std::invalid_argument("conmim._C.patch_contrast_cuda: batch must be at most " +
                                std::to_string(kMaxGridY) + " images per call (one grid row each), got " +
                                std::to_string(p.B));
  Args a;
  a.s = reinterpret_cast<const void*>(p.student);
  a.t = reinterpret_cast<const void*>(p.teacher);
  a.order = reinterpret_cast<const int64_t*>(p.order);
  a.counts = reinterpret_cast<const int*>(p.counts);
  a.pos = reinterpret_cast<const int64_t*>(p.positive_index);
  a.stats = reinterpret_cast<float*>(p.row_stats);
  a.s_sb = p.student_stride[0], a.s_sn = p.student_stride[1], a.s_sd = p.student_stride[2];
  a.t_sb = p.teacher_stride[0], a.t_sn = p.teacher_stride[1], a.t_sd = p.teacher_stride[2];
  a.p_sb = p.positive_stride[0], a.p_sn = p.positive_stride[1];
  a.N = static_cast<int>(p.N);
  a.D = static_cast<int>(p.D);
  a.inv_tau = static_cast<float>(p.inv_tau);
  a.normalize = p.normalize;
  a.exact_logits = p.exact_logits;
  a.s_copy16 = a.t_copy16 = false;  // the forward's launcher decides, knowing the element types and the device
  a.q_resident = true;
  return a;
}

void check(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("conmim._C.") + what + ": launch failed: " + cudaGetErrorString(err));
}

constexpr int kMaxDevices = 64;

int current_device() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices)
    throw std::runtime_error("conmim._C.patch_contrast_cuda: no usable current CUDA device (at most " +
                             std::to_string(kMaxDevices) + " are supported)");
  return dev;
}

// The current device's cudaDevAttrMaxSharedMemoryPerBlockOptin, queried once per device.
int64_t smem_optin_limit(int dev) {
  static std::array<std::atomic<int>, kMaxDevices> cache{};  // 0: not queried yet
  int v = cache[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    const cudaError_t err = cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("conmim._C.patch_contrast_cuda: cannot read the device's shared memory "
                                           "limit: ") +
                               cudaGetErrorString(err));
    cache[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Lets Kernel use up to `bytes` of dynamic shared memory on device dev (beyond the default 48 KB), once per kernel
// and device rather than on every call.
template <auto Kernel>
void opt_in_smem(int dev, int64_t bytes) {
  static std::atomic<uint64_t> done{0};  // bit i: device i
  const uint64_t bit = uint64_t{1} << dev;
  if (done.load(std::memory_order_relaxed) & bit) return;
  const cudaError_t err =
      cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess)
    throw std::runtime_error("conmim._C.patch_contrast_cuda: cannot opt in to " + std::to_string(bytes) +
                             " bytes of dynamic shared memory per block (" + cudaGetErrorString(err) + ")");
  done.fetch_or(bit, std::memory_order_relaxed);
}

// Static shared memory as the device allots it: rounded to 128 bytes, plus the 1 KB sm_80 and later reserve per
// block (the sm_90 binary's figures; tests/test_cuda_sm90.py compares them).
constexpr int64_t kSmemReserved = 1024;
constexpr int64_t kDefaultSmem = 48 * 1024;  // a block's shared memory without opting in
constexpr int64_t allotted(size_t bytes) { return (static_cast<int64_t>(bytes) + 127) / 128 * 128 + kSmemReserved; }

// The __shared__ declarations of bwd_q_kernel (bwd_k_kernel's: one array fewer, the same once rounded): the
// staged chunks, the gradient products' split G, five per-row floats, k_rows, two flags.
template <typename TS, typename TT>
constexpr int64_t bwd_static_smem() {
  using T = Staged<TS, TT>;
  return allotted(sizeof(Tiles<T>) + sizeof(GradMma) +
                  kTile * (5 * sizeof(float) + sizeof(int64_t) + 2 * sizeof(bool)));
}

template <typename TS, typename TT>
SmemPlan plan_of(LossKernel kernel, int64_t D, int64_t limit) {
  using T = Staged<TS, TT>;
  SmemPlan p;
  if (kernel == LossKernel::kForward) {
    p.static_bytes = allotted(sizeof(FwdTiles<T>));
    p.dynamic_bytes = static_cast<int64_t>(sizeof(T)) * kTile * (padded_dim(static_cast<int>(D)) + kPad);
    if (p.static_bytes + p.dynamic_bytes > limit) {  // stream the query chunks through two buffers
      p.q_resident = false;
      p.dynamic_bytes = static_cast<int64_t>(sizeof(T)) * 2 * kTile * (kChunk + kPad);
    }
  } else {
    p.static_bytes = bwd_static_smem<TS, TT>();
    p.dynamic_bytes = static_cast<int64_t>(sizeof(float)) * kTile * acc_ld(static_cast<int>(D));
  }
  const int64_t need = p.static_bytes + p.dynamic_bytes;
  if (need > limit)
    throw std::runtime_error("conmim._C.patch_contrast_cuda: this GPU gives at most " + std::to_string(limit) +
                             " bytes of shared memory per block; the " +
                             (kernel == LossKernel::kForward ? "forward" : "backward") + " at d = " +
                             std::to_string(D) + " needs " + std::to_string(need) + "; use backend='triton'");
  p.opt_in = need > kDefaultSmem;
  return p;
}

// Whether cp.async can stage a [B, N, D] tensor of Elem: unit feature stride and every row start 16-byte aligned,
// so each 16-byte run of a chunk is.
template <typename Elem>
bool copy16_ok(int64_t ptr, const std::array<int64_t, 3>& stride) {
  constexpr int64_t kVec = kCopyBytes / sizeof(Elem);
  return stride[2] == 1 && ptr % kCopyBytes == 0 && stride[0] % kVec == 0 && stride[1] % kVec == 0;
}

dim3 grid_of(const Args& a, int64_t B) { return dim3((a.N + kTile - 1) / kTile, static_cast<unsigned>(B)); }

}  // namespace

SmemPlan smem_plan(LossKernel kernel, int64_t D, int student_dtype, int teacher_dtype, int64_t optin_limit) {
  SmemPlan p;
  dispatch_pair<DeviceTypes>(student_dtype, teacher_dtype, "patch_contrast_cuda", [&](auto s, auto t) {
    p = plan_of<decltype(s), decltype(t)>(kernel, D, optin_limit);
  });
  return p;
}

void patch_contrast_forward(const LossCall& p) {
  Args a = make(p);
  if (p.B == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(p.stream);
  const int dev = current_device();
  const int64_t limit = smem_optin_limit(dev);
  dispatch_pair<DeviceTypes>(p.student_dtype, p.teacher_dtype, "patch_contrast_fwd_cuda", [&](auto s, auto t) {
    using TS = decltype(s);
    using TT = decltype(t);
    const SmemPlan plan = plan_of<TS, TT>(LossKernel::kForward, p.D, limit);
    a.s_copy16 = copy16_ok<TS>(p.student, p.student_stride);
    a.t_copy16 = copy16_ok<TT>(p.teacher, p.teacher_stride);
    a.q_resident = plan.q_resident;
    if (plan.opt_in) opt_in_smem<fwd_kernel<TS, TT>>(dev, limit - plan.static_bytes);
    launch(fwd_kernel<TS, TT>, grid_of(a, p.B), dim3(kThreads), plan.dynamic_bytes, st, a,
           reinterpret_cast<float*>(p.loss), reinterpret_cast<float*>(p.lse));
  });
  check("patch_contrast_fwd_cuda");
}

void patch_contrast_backward(const LossCall& p) {
  const Args a = make(p);
  if (p.B == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(p.stream);
  const int dev = current_device();
  const int64_t limit = smem_optin_limit(dev);
  const float* grad = reinterpret_cast<const float*>(p.grad);
  const int64_t g_sb = p.grad_stride[0], g_sn = p.grad_stride[1];
  dispatch_pair<DeviceTypes>(p.student_dtype, p.teacher_dtype, "patch_contrast_bwd_cuda", [&](auto s, auto t) {
    using TS = decltype(s);
    using TT = decltype(t);
    const SmemPlan plan = plan_of<TS, TT>(LossKernel::kBackward, p.D, limit);
    if (plan.opt_in) opt_in_smem<bwd_q_kernel<TS, TT>>(dev, limit - plan.static_bytes);
    launch(bwd_q_kernel<TS, TT>, grid_of(a, p.B), dim3(kThreads), plan.dynamic_bytes, st, a, grad, g_sb, g_sn,
           reinterpret_cast<TS*>(p.d_student));
    check("patch_contrast_bwd_cuda (student gradient)");
    if (p.d_teacher != 0) {
      if (plan.opt_in) opt_in_smem<bwd_k_kernel<TS, TT>>(dev, limit - plan.static_bytes);
      launch(bwd_k_kernel<TS, TT>, grid_of(a, p.B), dim3(kThreads), plan.dynamic_bytes, st, a, grad, g_sb, g_sn,
             reinterpret_cast<TT*>(p.d_teacher));
      check("patch_contrast_bwd_cuda (teacher gradient)");
    }
  });
}

}  // namespace cuda
}  // namespace conmim
