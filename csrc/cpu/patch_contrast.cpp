// Fused CPU kernel for the ConMIM patch-contrast loss (forward and backward).
//
// Per image b: normalise the teacher keys once, then for blocks of masked query rows compute the block of logits
// S = Q K^T / tau with a register-blocked GEMM, the row logsumexp and the loss. The backward recomputes the same
// block, forms G = g * (softmax - onehot) / tau and applies dQ = G K (and dK += G^T Q when the teacher needs a
// gradient), then the L2-normalisation Jacobian. Scratch is O(N * d) per thread plus one block of
// kRowBlock x N logits: never B x N x N.
#include "cpu/patch_contrast.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "cpu/gemm_tile.h"

namespace conmim {
namespace cpu {
namespace {

constexpr int kRowBlock = 48;  // query rows per block (multiple of Tile::MR)
constexpr double kNormEps = 1e-12;  // as torch.nn.functional.normalize

// exp on a whole vector: range reduction to 2^n * e^y, |y| <= ln2/2, degree-7 Taylor (relative error < 1e-7),
// written with vector arithmetic because GCC does not vectorise loops calling a scalar exp.
using VF = VecOf<float>::type;
using UF = VecOf<float>::utype;
typedef int32_t VI __attribute__((vector_size(kVecBytes)));
constexpr int kW = VecOf<float>::width;

static inline VF vexp(VF x) {
  x = x < -87.3f ? VF{} - 87.3f : x;
  x = x > 88.7f ? VF{} + 88.7f : x;
  const VF t = x * 1.44269504088896341f;
  const VI n = __builtin_convertvector(t + (t >= 0.f ? VF{} + 0.5f : VF{} - 0.5f), VI);
  const VF y = x - __builtin_convertvector(n, VF) * 0.693147180559945309f;
  VF p = VF{} + 1.f / 5040.f;
  p = p * y + 1.f / 720.f;
  p = p * y + 1.f / 120.f;
  p = p * y + 1.f / 24.f;
  p = p * y + 1.f / 6.f;
  p = p * y + 0.5f;
  p = p * y + 1.f;
  p = p * y + 1.f;
  const VI bits = (n + 127) << 23;
  VF scale;
  std::memcpy(&scale, &bits, sizeof(VF));
  return p * scale;
}

// Softmax rows are computed from differences of unscaled logits, x[j] - max, scaled by a = 1/tau afterwards: the
// largest term is exp(0) = 1 exactly (so the loss is never negative) and nothing of size a * |x| is ever
// subtracted (so small temperatures and large unnormalised features keep fp32 accuracy, and 1/tau up to the
// largest float gives finite values).

// sum_j exp((x[j] - m) * a), j < N. Rows are padded to a multiple of the vector width, so the last vector is read
// whole and its lanes at j >= N are dropped.
static inline float sum_exp(const float* x, ptrdiff_t N, float a, float m) {
  VI lane;
  for (int v = 0; v < kW; ++v) lane[v] = v;
  VF acc = VF{};
  for (ptrdiff_t j = 0; j < N; j += kW) {
    const VF e = vexp((*reinterpret_cast<const UF*>(x + j) - m) * a);
    acc += (lane + static_cast<int32_t>(j)) < static_cast<int32_t>(N) ? e : VF{};
  }
  float sum = 0.f;
  for (int v = 0; v < kW; ++v) sum += acc[v];
  return sum;
}
static inline double sum_exp(const double* x, ptrdiff_t N, double a, double m) {
  double sum = 0;
  for (ptrdiff_t j = 0; j < N; ++j) sum += std::exp((x[j] - m) * a);
  return sum;
}

// x[j] <- exp((x[j] - m) * a) for j < N, whole vectors (padded lanes get values the caller then zeroes).
static inline void shifted_exp(float* x, ptrdiff_t N, float a, float m) {
  for (ptrdiff_t j = 0; j < N; j += kW) {
    UF* p = reinterpret_cast<UF*>(x + j);
    *p = vexp((*p - m) * a);
  }
}
static inline void shifted_exp(double* x, ptrdiff_t N, double a, double m) {
  for (ptrdiff_t j = 0; j < N; ++j) x[j] = std::exp((x[j] - m) * a);
}

template <typename A>
static inline A row_max(const A* x, ptrdiff_t N) {
  A mx = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : mx)
  for (ptrdiff_t j = 0; j < N; ++j) mx = std::max(mx, x[j]);
  return mx;
}

template <typename A>
static inline A row_sum(const A* x, ptrdiff_t N) {
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (ptrdiff_t j = 0; j < N; ++j) sum += x[j];
  return sum;
}

// Npad: columns of the logits (multiple of Tile::NR) and rows of the key buffers, which the G^T Q product walks
// in tiles of Tile::MR, hence Npad >= round_up(N, MR) as well.
template <typename A>
struct Dims {
  ptrdiff_t N, D, Npad, Dpad;
};

// Strided view of a [B, N, D] input.
template <typename T>
struct View3 {
  const T* p;
  ptrdiff_t sb, sn, sd;
  inline const T& at(ptrdiff_t b, ptrdiff_t n, ptrdiff_t d) const { return p[b * sb + n * sn + d * sd]; }
};

// Loads row `n` of image b as Acc, optionally L2-normalised; returns the norm (before clamping).
template <typename T, typename A>
static inline A load_row(const View3<T>& v, ptrdiff_t b, ptrdiff_t n, ptrdiff_t D, bool normalize, A* out) {
  const T* src = &v.at(b, n, 0);
  A ss = 0;
  if (v.sd == 1) {
#pragma omp simd reduction(+ : ss)
    for (ptrdiff_t c = 0; c < D; ++c) {
      const A x = static_cast<A>(to_float(src[c]));
      out[c] = x;
      ss += x * x;
    }
  } else {
    for (ptrdiff_t c = 0; c < D; ++c) {
      const A x = static_cast<A>(to_float(src[c * v.sd]));
      out[c] = x;
      ss += x * x;
    }
  }
  const A nrm = std::sqrt(ss);
  if (normalize) {
    const A inv = A(1) / std::max(nrm, static_cast<A>(kNormEps));
#pragma omp simd
    for (ptrdiff_t c = 0; c < D; ++c) out[c] *= inv;
  }
  return nrm;
}

// Per-thread scratch for one image; all Acc, zero-padded.
template <typename A>
struct Scratch {
  std::vector<A> k;     // [Npad][Dpad] normalised keys (operand of G K)
  std::vector<A> kpack; // the same keys transposed and packed (operand of Q K^T), see pack_transposed
  std::vector<A> knrm;  // [N] key norms (teacher gradient only)
  std::vector<A> q;     // [kRowBlock][Dpad] normalised queries of one block
  std::vector<A> qnrm;  // [kRowBlock]
  std::vector<A> s;     // [kRowBlock][Npad] logits, then G
  std::vector<A> dq;    // [kRowBlock][Dpad]
  std::vector<A> dk;    // [Npad][Dpad] teacher-gradient accumulator
  std::vector<ptrdiff_t> rows;

  void init(const Dims<A>& dm, bool backward, bool want_dk) {
    k.assign(dm.Npad * dm.Dpad, A(0));
    kpack.assign(dm.Npad * dm.D, A(0));
    q.assign(kRowBlock * dm.Dpad, A(0));
    qnrm.assign(kRowBlock, A(0));
    s.assign(kRowBlock * dm.Npad, A(0));
    rows.reserve(dm.N);
    if (backward) dq.assign(kRowBlock * dm.Dpad, A(0));
    if (want_dk) {
      knrm.assign(dm.N, A(0));
      dk.assign(dm.Npad * dm.Dpad, A(0));
    }
  }
};

// Normalised keys of image b into k (row-major, zero-padded) and kpack (transposed, packed once per image).
template <typename T, typename A>
static void load_keys(const View3<T>& t, ptrdiff_t b, const Dims<A>& dm, bool normalize, Scratch<A>& sc) {
  for (ptrdiff_t j = 0; j < dm.N; ++j) {
    const A nrm = load_row<T, A>(t, b, j, dm.D, normalize, sc.k.data() + j * dm.Dpad);
    if (!sc.knrm.empty()) sc.knrm[j] = nrm;
  }
  pack_transposed<A>(dm.Npad, dm.D, sc.k.data(), dm.Dpad, sc.kpack.data());
}

static inline void masked_rows(const uint8_t* mask, ptrdiff_t msb, ptrdiff_t msn, ptrdiff_t b, ptrdiff_t N,
                               std::vector<ptrdiff_t>& rows) {
  rows.clear();
  for (ptrdiff_t i = 0; i < N; ++i)
    if (mask[b * msb + i * msn]) rows.push_back(i);
}

// The positive's key index of row i, or -1 when positive_index holds a value outside [0, N): the host cannot check
// the indices under torch.compile or graph capture, so the kernel bounds them itself and gives that row a NaN loss
// and NaN gradients rather than reading another row (or past the tensor).
static inline ptrdiff_t positive_of(const int64_t* pos, ptrdiff_t psb, ptrdiff_t psn, ptrdiff_t b, ptrdiff_t i,
                                    ptrdiff_t N) {
  if (!pos) return i;
  const int64_t p = pos[b * psb + i * psn];
  return p >= 0 && p < N ? static_cast<ptrdiff_t>(p) : -1;
}

// Loads the block's queries and computes S = Q K^T (unscaled). Returns the padded row count.
template <typename T, typename A>
static ptrdiff_t block_logits(const View3<T>& s, ptrdiff_t b, const ptrdiff_t* rows, ptrdiff_t R,
                              const Dims<A>& dm, bool normalize, Scratch<A>& sc) {
  const ptrdiff_t Rpad = round_up(R, Tile<A>::MR);
  std::fill(sc.q.begin(), sc.q.begin() + Rpad * dm.Dpad, A(0));
  for (ptrdiff_t r = 0; r < R; ++r)
    sc.qnrm[r] = load_row<T, A>(s, b, rows[r], dm.D, normalize, sc.q.data() + r * dm.Dpad);
  gemm_packed<A>(Rpad, dm.Npad, dm.D, sc.q.data(), dm.Dpad, 1, sc.kpack.data(), sc.s.data(), dm.Npad, false);
  return Rpad;
}

template <typename TS, typename TT, typename A>
static void forward_image(const View3<TS>& s, const View3<TT>& t, const LossCall& a, ptrdiff_t b,
                          const Dims<A>& dm, Scratch<A>& sc, A* loss, A* lse) {
  const uint8_t* mask = reinterpret_cast<const uint8_t*>(a.mask);
  const int64_t* pos = reinterpret_cast<const int64_t*>(a.positive_index);
  masked_rows(mask, a.mask_stride[0], a.mask_stride[1], b, dm.N, sc.rows);
  std::fill(loss + b * dm.N, loss + (b + 1) * dm.N, A(0));
  std::fill(lse + b * dm.N, lse + (b + 1) * dm.N, A(0));
  if (sc.rows.empty()) return;
  load_keys<TT, A>(t, b, dm, a.normalize, sc);
  const A inv_tau = static_cast<A>(a.inv_tau);
  const ptrdiff_t M = static_cast<ptrdiff_t>(sc.rows.size());
  for (ptrdiff_t r0 = 0; r0 < M; r0 += kRowBlock) {
    const ptrdiff_t R = std::min<ptrdiff_t>(kRowBlock, M - r0);
    block_logits<TS, A>(s, b, sc.rows.data() + r0, R, dm, a.normalize, sc);
    for (ptrdiff_t r = 0; r < R; ++r) {
      const ptrdiff_t i = sc.rows[r0 + r];
      const A* x = sc.s.data() + r * dm.Npad;
      const A mx = row_max<A>(x, dm.N);
      const A log_sum = std::log(sum_exp(x, dm.N, inv_tau, mx));  // >= 0: the largest term is 1
      const ptrdiff_t p = positive_of(pos, a.positive_stride[0], a.positive_stride[1], b, i, dm.N);
      lse[b * dm.N + i] = mx * inv_tau + log_sum;
      loss[b * dm.N + i] = p < 0 ? std::numeric_limits<A>::quiet_NaN() : (mx - x[p]) * inv_tau + log_sum;
    }
  }
}

template <typename T, typename A>
static inline void write_row(T* dst, const A* src, ptrdiff_t D) {
  for (ptrdiff_t c = 0; c < D; ++c) dst[c] = from_float<T>(src[c]);
}

// dx = (dq - q (q . dq)) / ||x||  (the Jacobian of x / max(||x||, eps)); dq when not normalising.
template <typename A>
static inline void normalize_backward(const A* q, A nrm, bool normalize, ptrdiff_t D, A* dq) {
  if (!normalize) return;
  if (nrm < static_cast<A>(kNormEps)) {
    const A inv = A(1) / static_cast<A>(kNormEps);
    for (ptrdiff_t c = 0; c < D; ++c) dq[c] *= inv;
    return;
  }
  A dot = 0;
#pragma omp simd reduction(+ : dot)
  for (ptrdiff_t c = 0; c < D; ++c) dot += q[c] * dq[c];
  const A inv = A(1) / nrm;
#pragma omp simd
  for (ptrdiff_t c = 0; c < D; ++c) dq[c] = (dq[c] - q[c] * dot) * inv;
}

template <typename TS, typename TT, typename A>
static void backward_image(const View3<TS>& s, const View3<TT>& t, const LossCall& a, ptrdiff_t b,
                           const Dims<A>& dm, Scratch<A>& sc, const A* grad, TS* ds, TT* dt) {
  const uint8_t* mask = reinterpret_cast<const uint8_t*>(a.mask);
  const int64_t* pos = reinterpret_cast<const int64_t*>(a.positive_index);
  const ptrdiff_t g_sb = a.grad_stride[0], g_sn = a.grad_stride[1];
  masked_rows(mask, a.mask_stride[0], a.mask_stride[1], b, dm.N, sc.rows);
  const ptrdiff_t N = dm.N, D = dm.D;
  std::fill(ds + b * N * D, ds + (b + 1) * N * D, from_float<TS>(0.0));
  if (sc.rows.empty()) {
    if (dt) std::fill(dt + b * N * D, dt + (b + 1) * N * D, from_float<TT>(0.0));
    return;
  }
  const bool want_dk = dt != nullptr;
  load_keys<TT, A>(t, b, dm, a.normalize, sc);
  if (want_dk) std::fill(sc.dk.begin(), sc.dk.end(), A(0));
  const A inv_tau = static_cast<A>(a.inv_tau);
  const ptrdiff_t M = static_cast<ptrdiff_t>(sc.rows.size());
  for (ptrdiff_t r0 = 0; r0 < M; r0 += kRowBlock) {
    const ptrdiff_t R = std::min<ptrdiff_t>(kRowBlock, M - r0);
    const ptrdiff_t Rpad = block_logits<TS, A>(s, b, sc.rows.data() + r0, R, dm, a.normalize, sc);
    for (ptrdiff_t r = 0; r < Rpad; ++r) {
      A* x = sc.s.data() + r * dm.Npad;
      if (r >= R) {
        std::fill(x, x + dm.Npad, A(0));
        continue;
      }
      // G = g (softmax - onehot(pos)) / tau, the softmax recomputed from the row (not from the saved lse, whose
      // fp32 rounding is a relative error of eps * |lse| in every probability), and the positive's entry
      // -g (1 - p_pos) / tau taken as the sum of the other terms, without the cancellation of p_pos - 1.
      const ptrdiff_t i = sc.rows[r0 + r];
      const ptrdiff_t p = positive_of(pos, a.positive_stride[0], a.positive_stride[1], b, i, N);
      if (p < 0) {
        std::fill(x, x + N, std::numeric_limits<A>::quiet_NaN());
        std::fill(x + N, x + dm.Npad, A(0));
        continue;
      }
      shifted_exp(x, N, inv_tau, row_max<A>(x, N));
      for (ptrdiff_t j = N; j < dm.Npad; ++j) x[j] = A(0);
      const A e_pos = x[p];
      x[p] = A(0);
      const A others = row_sum<A>(x, N);
      const A scale = grad[b * g_sb + i * g_sn] * inv_tau / (others + e_pos);
#pragma omp simd
      for (ptrdiff_t j = 0; j < N; ++j) x[j] *= scale;
      x[p] = -others * scale;
    }
    // dQ = G K
    gemm_padded<A>(Rpad, dm.Dpad, dm.Npad, sc.s.data(), dm.Npad, 1, sc.k.data(), dm.Dpad, sc.dq.data(), dm.Dpad,
                   false);
    // dK += G^T Q
    if (want_dk)
      gemm_padded<A>(round_up(N, Tile<A>::MR), dm.Dpad, Rpad, sc.s.data(), 1, dm.Npad, sc.q.data(), dm.Dpad,
                     sc.dk.data(), dm.Dpad, true);
    for (ptrdiff_t r = 0; r < R; ++r) {
      A* dqr = sc.dq.data() + r * dm.Dpad;
      normalize_backward<A>(sc.q.data() + r * dm.Dpad, sc.qnrm[r], a.normalize, D, dqr);
      write_row<TS, A>(ds + (b * N + sc.rows[r0 + r]) * D, dqr, D);
    }
  }
  if (want_dk) {
    for (ptrdiff_t j = 0; j < N; ++j) {
      A* dkr = sc.dk.data() + j * dm.Dpad;
      normalize_backward<A>(sc.k.data() + j * dm.Dpad, sc.knrm[j], a.normalize, D, dkr);
      write_row<TT, A>(dt + (b * N + j) * D, dkr, D);
    }
  }
}

template <typename A>
static Dims<A> make_dims(const LossCall& a) {
  ptrdiff_t npad = round_up(a.N, Tile<A>::NR);
  while (npad < round_up(a.N, Tile<A>::MR)) npad += Tile<A>::NR;
  return Dims<A>{a.N, a.D, npad, round_up(a.D, Tile<A>::NR)};
}

template <typename T>
static View3<T> view(int64_t ptr, const std::array<int64_t, 3>& st) {
  return View3<T>{reinterpret_cast<const T*>(ptr), st[0], st[1], st[2]};
}

template <typename T>
using AccOf = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

}  // namespace

void patch_contrast_forward(const LossCall& a) {
  dispatch_pair<HostTypes>(a.student_dtype, a.teacher_dtype, "patch_contrast_fwd_cpu", [&](auto s_tag, auto t_tag) {
    using TS = decltype(s_tag);
    using TT = decltype(t_tag);
    using A = AccOf<TS>;
    const auto s = view<TS>(a.student, a.student_stride);
    const auto t = view<TT>(a.teacher, a.teacher_stride);
    const Dims<A> dm = make_dims<A>(a);
    A* loss = reinterpret_cast<A*>(a.loss);
    A* lse = reinterpret_cast<A*>(a.lse);
#pragma omp parallel num_threads(a.nthreads)
    {
      Scratch<A> sc;
      sc.init(dm, false, false);
#pragma omp for schedule(dynamic, 1)
      for (ptrdiff_t b = 0; b < a.B; ++b) forward_image<TS, TT, A>(s, t, a, b, dm, sc, loss, lse);
    }
  });
}

void patch_contrast_backward(const LossCall& a) {
  dispatch_pair<HostTypes>(a.student_dtype, a.teacher_dtype, "patch_contrast_bwd_cpu", [&](auto s_tag, auto t_tag) {
    using TS = decltype(s_tag);
    using TT = decltype(t_tag);
    using A = AccOf<TS>;
    const auto s = view<TS>(a.student, a.student_stride);
    const auto t = view<TT>(a.teacher, a.teacher_stride);
    const Dims<A> dm = make_dims<A>(a);
    const A* grad = reinterpret_cast<const A*>(a.grad);
    TS* ds = reinterpret_cast<TS*>(a.d_student);
    TT* dt = reinterpret_cast<TT*>(a.d_teacher);
#pragma omp parallel num_threads(a.nthreads)
    {
      Scratch<A> sc;
      sc.init(dm, true, dt != nullptr);
#pragma omp for schedule(dynamic, 1)
      for (ptrdiff_t b = 0; b < a.B; ++b) backward_image<TS, TT, A>(s, t, a, b, dm, sc, grad, ds, dt);
    }
  });
}

}  // namespace cpu
}  // namespace conmim
