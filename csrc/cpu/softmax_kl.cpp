// Temperature softmax-KL on the CPU: forward and gradients in one call.
//
// Row path (the usual case): each thread takes whole rows. Pass 1 finds both row maxima, pass 2
// computes e_s, e_t (the only two exponentials per element), the sums and the KL, keeping e_s and
// e_t in a per-thread scratch row that stays in cache, and pass 3 writes the gradients. Inputs are
// read from memory once and the gradient written once (non-temporal stores when it is large, see
// vec_io.h); the later passes hit L2.
// Split path (few rows, huge vocabulary): rows are cut into fixed chunks so that every core works;
// partial maxima and sums are combined in chunk order, so results do not depend on thread count.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/divergence.h"
#include "common/softmax_kl.h"
#include "common/tuning.h"
#include "cpu/kernels.h"
#include "cpu/fast_exp.h"
#include "cpu/fast_log.h"
#include "cpu/vec_io.h"

namespace kdfast {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using FVec = Vectorized<float>;

constexpr int64_t kSplitChunk = tuning::kKLSplitChunk;  // elements per task on the split path

struct RowStats {
  double zs = 0, zt = 0, a = 0;
};

// ---- float accumulation (float, half, bfloat16), vectorised ----

constexpr int64_t kStep = 2 * FVec::size();  // elements per vector step

// The last n < kStep elements of a row as floats, padded to a full step with `fill`, so that the
// tail takes one more vector step instead of a scalar loop (whose std::exp calls cost ~10 ns an
// element: most of a row's time at V = 16, a fifth of it at V = 100).
struct Tail {
  float s[kStep], t[kStep];
  template <typename T>
  Tail(const T* s_in, const T* t_in, int64_t n, float fill) {
    for (int64_t i = 0; i < kStep; ++i) {
      s[i] = i < n ? static_cast<float>(s_in[i]) : fill;
      t[i] = i < n ? static_cast<float>(t_in[i]) : fill;
    }
  }
};
constexpr float kPadLogit = -std::numeric_limits<float>::infinity();  // exponential 0, no KL term

// The gradient of a row whose KL is NaN: NaN throughout, on both sides, as the reference gives it
// (the kernels' own arithmetic may leave parts finite: a skipped NaN lane in a maximum, or a NaN
// beside a -inf logit, where the p_t = 0 guard writes 0).
template <typename T>
inline void nan_grad_row(T* g, int64_t n) {
  if (g) std::fill(g, g + n, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
}

template <typename T>
inline void copy_out(const float* from, int64_t n, T* to) {
  for (int64_t i = 0; i < n; ++i) to[i] = static_cast<T>(from[i]);
}

// Lane-wise maximum of logits. On AVX-512 and the baseline build one max instruction (clamp_min),
// which may skip a NaN: the NaN still makes its row NaN, because their exponentials keep NaN lanes
// (commit 318c7a2 measured it). ATen's AVX2 exp_u20 clamps its argument, a NaN included, so
// there the maximum itself carries the NaN (at::vec::maximum: three instructions more).
inline FVec logit_max(const FVec& a, const FVec& b) {
#if defined(CPU_CAPABILITY_AVX2)
  return at::vec::maximum(a, b);
#else
  return at::vec::clamp_min(a, b);
#endif
}

template <typename T>
void row_max(const T* s, const T* t, int64_t n, float& ms, float& mt) {
  FVec vs(kPadLogit), vt = vs;
  auto step = [&](const auto* ps, const auto* pt) {
    FVec s0, s1, t0, t1;
    load2(ps, s0, s1);
    load2(pt, t0, t1);
    vs = logit_max(vs, logit_max(s0, s1));
    vt = logit_max(vt, logit_max(t0, t1));
  };
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) step(s + i, t + i);
  if (i < n) {
    const Tail tail(s + i, t + i, n - i, kPadLogit);
    step(tail.s, tail.t);
  }
  float m1 = at::vec::vec_reduce_all<float>([](FVec& x, FVec& y) { return at::vec::maximum(x, y); }, vs);
  float m2 = at::vec::vec_reduce_all<float>([](FVec& x, FVec& y) { return at::vec::maximum(x, y); }, vt);
  ms = std::max(ms, m1);
  mt = std::max(mt, m2);
  if (std::isnan(m1)) ms = m1;
  if (std::isnan(m2)) mt = m2;
}

// The per-call constants of the float kernels: the units h = 2^-k of a, b and A (see
// common/softmax_kl.h), 1 / T, and the exponentials' scale for those units.
struct Units {
  float h, inv_h, invt;
  FVec vh, it, ex;
  Units(int k, float invt_)
      : h(std::ldexp(1.f, -k)), inv_h(std::ldexp(1.f, k)), invt(invt_), vh(h), it(invt_), ex(exp_scale(inv_h)) {}
  // -m h: the addend of kl::arg for a row maximum m (0 where a side is all -inf: its exponentials are
  // 0 whatever the reference).
  FVec neg_mh(float m) const { return FVec(m == -std::numeric_limits<float>::infinity() ? 0.f : -m * h); }
};

// a = (s - ms) / T, b = (t - mt) / T in units of h for K elements at s (kl::arg, one fma each:
// nms = -ms h, nmt = -mt h).
template <typename T>
inline void scaled(const T* s, const T* t, FVec nms, FVec nmt, const Units& u, FVec& a0, FVec& a1, FVec& b0,
                   FVec& b1) {
  load2(s, a0, a1);
  load2(t, b0, b1);
  a0 = at::vec::fmadd(a0, u.vh, nms) * u.it;
  a1 = at::vec::fmadd(a1, u.vh, nms) * u.it;
  b0 = at::vec::fmadd(b0, u.vh, nmt) * u.it;
  b1 = at::vec::fmadd(b1, u.vh, nmt) * u.it;
}

// x * y rounded on its own (kl::mul_rn, vectorised): GCC fuses a vector product into a following
// subtraction where FMA is enabled; the baseline build has no FMA to fuse into.
inline FVec mul_rn(const FVec& x, const FVec& y) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r = x * y;
  __asm__("" : "+v"(r));
  return r;
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 r = x * y;
  __asm__("" : "+x"(r));
  return r;
#else
  return x * y;
#endif
}

// acc + e_t * (b - a), adding nothing where e_t = 0 (a may be -inf there): kl::term, vectorised.
inline FVec add_term(FVec acc, FVec et, FVec a, FVec b) {
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 live = _mm512_cmp_ps_mask(et, _mm512_setzero_ps(), _CMP_NEQ_UQ);
  return _mm512_mask3_fmadd_ps(et, _mm512_sub_ps(b, a), acc, live);
#else
  return acc + FVec::blendv(FVec(0.f), et * (b - a), et != FVec(0.f));
#endif
}

// The sums Z_s, Z_t and A (in units of h) over K elements at s and t, with exponentials relative to
// the maxima given as nms / nmt (Units::neg_mh); the exponentials also go to es_out / et_out when given.
template <typename T>
inline void sums_k(const T* s, const T* t, FVec nms, FVec nmt, const Units& u, FVec& zs, FVec& zt, FVec& acc,
                   float* es_out, float* et_out) {
  FVec a0, a1, b0, b1;
  scaled(s, t, nms, nmt, u, a0, a1, b0, b1);
  FVec es0 = exp_nonpos(a0, u.ex), es1 = exp_nonpos(a1, u.ex), et0 = exp_nonpos(b0, u.ex),
       et1 = exp_nonpos(b1, u.ex);
  zs = zs + (es0 + es1);
  zt = zt + (et0 + et1);
  acc = add_term(add_term(acc, et0, a0, b0), et1, a1, b1);
  if (es_out) {
    es0.store(es_out);
    es1.store(es_out + FVec::size());
    et0.store(et_out);
    et1.store(et_out + FVec::size());
  }
}

inline RowStats reduce_stats(FVec zs, FVec zt, FVec acc) {
  auto sum = [](FVec& x, FVec& y) { return x + y; };
  RowStats r;
  r.zs = at::vec::vec_reduce_all<float>(sum, zs);
  r.zt = at::vec::vec_reduce_all<float>(sum, zt);
  r.a = at::vec::vec_reduce_all<float>(sum, acc);
  return r;
}

// The sums of a chunk of a split row (relative to the row's maxima).
template <typename T>
RowStats row_stats(const T* s, const T* t, int64_t n, float ms, float mt, const Units& u) {
  const FVec nms = u.neg_mh(ms), nmt = u.neg_mh(mt);
  FVec zs(0.f), zt(0.f), acc(0.f);
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) sums_k(s + i, t + i, nms, nmt, u, zs, zt, acc, nullptr, nullptr);
  if (i < n) {
    const Tail tail(s + i, t + i, n - i, kPadLogit);
    sums_k(tail.s, tail.t, nms, nmt, u, zs, zt, acc, nullptr, nullptr);
  }
  return reduce_stats(zs, zt, acc);
}

// One streaming pass over a row for the row path: each block of kBlock elements is read from memory
// once; its maxima are taken while it sits in L1, the running maxima move up if needed (rescaling
// the sums, as online softmax does) and the exponentials relative to the running maxima go to the
// scratch rows. block_ms/block_mt record, per block, the maxima its exponentials are relative to.
constexpr int64_t kBlock = tuning::kKLBlock;

// Software prefetch of the cache lines of K elements at p (for writing when kWrite). The row pass
// asks for the next block while it computes this one, so that memory and arithmetic overlap
// instead of taking turns (the hardware prefetcher alone runs too little ahead); the gradient pass
// asks for its destination kKLWriteAheadBytes ahead of its stores, which otherwise stall on reading
// each line first (streamed gradients need no such read).
template <int kWrite = 0, typename T>
inline void prefetch_k(const T* p) {
  for (int64_t off = 0; off < int64_t(2 * FVec::size() * sizeof(T)); off += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(p) + off, kWrite);
  }
}

inline float nan_max(float a, float b) { return (b > a || std::isnan(b)) ? b : a; }

template <typename T>
RowStats row_online(const T* s, const T* t, int64_t n, const Units& u, float* es_out, float* et_out,
                    float* block_ms, float* block_mt, float& ms, float& mt) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr int64_t K = kStep;
  FVec zs(0.f), zt(0.f), acc(0.f);
  ms = mt = kNegInf;
  for (int64_t b0 = 0, blk = 0; b0 < n; b0 += kBlock, ++blk) {
    const int64_t bn = std::min(kBlock, n - b0);
    float bms = kNegInf, bmt = kNegInf;
    row_max(s + b0, t + b0, bn, bms, bmt);
    const float nms = nan_max(ms, bms), nmt = nan_max(mt, bmt);
    if (!(nms == ms && nmt == mt)) {
      // The moves of the maxima, in double: finite maxima can be 2 FLT_MAX apart. With f = e^-dt,
      // A' = f A + Z_t f (ds - dt) h: both factors are finite, and f (ds - dt) is 0 where f is
      // (A' = f (A + Z_t (ds - dt) h) would take inf * 0 for a jump of ~FLT_MAX).
      const double ds = ms == kNegInf ? 0.0 : (static_cast<double>(nms) - ms) * u.invt;
      if (mt == kNegInf) {  // no teacher mass yet: nothing to rescale on that side
        acc = FVec(0.f);
      } else {
        const double dt = (static_cast<double>(nmt) - mt) * u.invt;
        const double ft = std::exp(-dt);
        acc = acc * FVec(static_cast<float>(ft)) + zt * FVec(static_cast<float>(ft * (ds - dt) * u.h));
        zt = zt * FVec(static_cast<float>(ft));
      }
      if (ms != kNegInf) zs = zs * FVec(static_cast<float>(std::exp(-ds)));
      ms = nms, mt = nmt;
    }
    block_ms[blk] = ms, block_mt[blk] = mt;
    const FVec vnms = u.neg_mh(ms), vnmt = u.neg_mh(mt);
    const T* sb = s + b0;
    const T* tb = t + b0;
    int64_t i = 0;
    for (; i + K <= bn; i += K) {
      prefetch_k(sb + i + kBlock);
      prefetch_k(tb + i + kBlock);
      sums_k(sb + i, tb + i, vnms, vnmt, u, zs, zt, acc, es_out ? es_out + b0 + i : nullptr,
             es_out ? et_out + b0 + i : nullptr);
    }
    if (i < bn) {  // only the row's last block has a tail (kBlock is a multiple of K)
      const Tail tail(sb + i, tb + i, bn - i, kPadLogit);
      float es[K], et[K];
      sums_k(tail.s, tail.t, vnms, vnmt, u, zs, zt, acc, es, et);
      if (es_out) copy_out(es, bn - i, es_out + b0 + i), copy_out(et, bn - i, et_out + b0 + i);
    }
  }
  return reduce_stats(zs, zt, acc);
}

// Gradients of a row from the cached exponentials of row_online.
// shift = A / Z_t in units of h; the teacher's coefficient is coef / h.
template <typename T>
void row_grads_cached(const T* s, const T* t, int64_t n, float ms, float mt, const Units& u, float coef,
                      double zs, double zt, float shift, float post, const float* es_in,
                      const float* et_in, const float* block_ms, const float* block_mt, T* gs, T* gt,
                      bool stream) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr int64_t K = kStep;
  constexpr int64_t kWriteAhead = tuning::kKLWriteAheadBytes / sizeof(T);
  const FVec nms = u.neg_mh(ms), nmt = u.neg_mh(mt), vcoef(coef), vcoef_t(coef * u.inv_h), vshift(shift),
             vpost(post);
  const bool scaled_out = post != 1.f;
  stream = can_stream(stream, gs, gt);
  for (int64_t b0 = 0, blk = 0; b0 < n; b0 += kBlock, ++blk) {
    const int64_t bn = std::min(kBlock, n - b0);
    // This block's exponentials are relative to its own running maxima: one factor corrects them.
    // (In double: the maxima can be 2 FLT_MAX apart.)
    const float cs = block_ms[blk] == kNegInf ? 0.f : static_cast<float>(std::exp((static_cast<double>(block_ms[blk]) - ms) * u.invt) / zs);
    const float ct = block_mt[blk] == kNegInf ? 0.f : static_cast<float>(std::exp((static_cast<double>(block_mt[blk]) - mt) * u.invt) / zt);
    const FVec vcs(cs), vct(ct);
    // One step of K elements: exponentials at pe / pet, inputs at ps / pt, gradients to qs / qt,
    // non-temporal when nt (never into the tail's stack buffers: they need not be vector-aligned).
    auto step = [&](const float* pe, const float* pet, const auto* ps, const auto* pt, auto* qs, auto* qt,
                    bool nt) {
      const FVec et0 = FVec::loadu(pet), et1 = FVec::loadu(pet + FVec::size());
      // coef * (e_s cs - e_t ct), coef last: kd_loss's gradient is exactly T^2 times the KL's; both
      // products rounded alike: exactly 0 where p_s = p_t (kl::grad_student).
      const FVec pt0 = mul_rn(et0, vct), pt1 = mul_rn(et1, vct);
      if (gs) {
        const FVec es0 = FVec::loadu(pe), es1 = FVec::loadu(pe + FVec::size());
        store2_scaled<T>(qs, vcoef * (mul_rn(es0, vcs) - pt0), vcoef * (mul_rn(es1, vcs) - pt1), scaled_out, vpost,
                         nt);
      }
      if (gt) {
        FVec a0, a1, b0v, b1v;
        scaled(ps, pt, nms, nmt, u, a0, a1, b0v, b1v);
        store2_scaled<T>(qt, FVec::blendv(FVec(0.f), vcoef_t * pt0 * ((b0v - a0) - vshift), pt0 != FVec(0.f)),
                         FVec::blendv(FVec(0.f), vcoef_t * pt1 * ((b1v - a1) - vshift), pt1 != FVec(0.f)),
                         scaled_out, vpost, nt);
      }
    };
    int64_t i = 0;
    for (; i + K <= bn; i += K) {
      const int64_t j = b0 + i;
      if (gs && !stream) prefetch_k<1>(gs + j + kWriteAhead);
      step(es_in + j, et_in + j, s + j, t + j, gs ? gs + j : gs, gt ? gt + j : gt, stream);
    }
    if (i < bn) {  // padded with 0 (finite); the padding's gradients are dropped
      const int64_t j = b0 + i, m = bn - i;
      const Tail tail(s + j, t + j, m, 0.f), e(es_in + j, et_in + j, m, 0.f);
      float qs[K], qt[K];
      step(e.s, e.t, tail.s, tail.t, qs, qt, false);
      if (gs) copy_out(qs, m, gs + j);
      if (gt) copy_out(qt, m, gt + j);
    }
  }
  if (stream) stream_fence();
}

struct GradCoef {
  float coef, inv_zs, inv_zt, shift, post;  // shift in units of h
};

// Gradients of a chunk of a split row, recomputing the exponentials from the inputs.
template <typename T>
void row_grads(const T* s, const T* t, int64_t n, float ms, float mt, const Units& u, const GradCoef& g, T* gs,
               T* gt, bool stream) {
  constexpr int64_t K = kStep;
  const FVec nms = u.neg_mh(ms), nmt = u.neg_mh(mt), coef(g.coef), coef_t(g.coef * u.inv_h), izs(g.inv_zs),
             izt(g.inv_zt), shift(g.shift);
  const FVec vpost(g.post);
  const bool scaled_out = g.post != 1.f;
  stream = can_stream(stream, gs, gt);
  auto step = [&](const auto* ps, const auto* pt, auto* qs, auto* qt, bool nt) {  // nt: as row_grads_cached
    FVec a0, a1, b0, b1;
    scaled(ps, pt, nms, nmt, u, a0, a1, b0, b1);
    const FVec es0 = exp_nonpos(a0, u.ex), es1 = exp_nonpos(a1, u.ex), et0 = exp_nonpos(b0, u.ex),
               et1 = exp_nonpos(b1, u.ex);
    if (gs) {
      store2_scaled<T>(qs, coef * (mul_rn(es0, izs) - mul_rn(et0, izt)), coef * (mul_rn(es1, izs) - mul_rn(et1, izt)),
                       scaled_out, vpost, nt);
    }
    if (gt) {
      FVec pt0 = et0 * izt, pt1 = et1 * izt;
      store2_scaled<T>(qt, FVec::blendv(FVec(0.f), coef_t * pt0 * ((b0 - a0) - shift), et0 != FVec(0.f)),
                       FVec::blendv(FVec(0.f), coef_t * pt1 * ((b1 - a1) - shift), et1 != FVec(0.f)), scaled_out, vpost,
                       nt);
    }
  };
  int64_t i = 0;
  for (; i + K <= n; i += K) step(s + i, t + i, gs ? gs + i : gs, gt ? gt + i : gt, stream);
  if (i < n) {
    const Tail tail(s + i, t + i, n - i, kPadLogit);
    float qs[K], qt[K];
    step(tail.s, tail.t, qs, qt, false);
    if (gs) copy_out(qs, n - i, gs + i);
    if (gt) copy_out(qt, n - i, gt + i);
  }
  if (stream) stream_fence();
}

// ---- double: plain loops (the float64 path exists for checking, not for speed) ----

void row_max(const double* s, const double* t, int64_t n, double& ms, double& mt) {
  for (int64_t i = 0; i < n; ++i) {
    ms = (s[i] > ms || std::isnan(s[i])) ? s[i] : ms;
    mt = (t[i] > mt || std::isnan(t[i])) ? t[i] : mt;
  }
}

RowStats row_stats(const double* s, const double* t, int64_t n, double ms, double mt, double invt) {
  RowStats r;
  for (int64_t i = 0; i < n; ++i) {
    double a = (s[i] - ms) * invt, b = (t[i] - mt) * invt, et = std::exp(b);
    r.zs += std::exp(a);
    r.zt += et;
    r.a += kl::term(et, a, b);
  }
  return r;
}

void row_grads(const double* s, const double* t, int64_t n, double ms, double mt, double invt,
               double coef, double izs, double izt, double shift, double post, double* gs, double* gt) {
  for (int64_t i = 0; i < n; ++i) {
    double a = (s[i] - ms) * invt, b = (t[i] - mt) * invt, es = std::exp(a), et = std::exp(b);
    if (gs) gs[i] = kl::grad_student(coef, es, izs, et, izt) * post;
    if (gt) gt[i] = kl::grad_teacher(coef, et, izt, a, b, shift) * post;
  }
}

// ---- the other divergences: JSD, skew KL, TVD (common/divergence.h) ----
//
// Three passes over a row: its maxima and softmax sums (row_online, reading the inputs from memory
// once), the sums F, SU, SW of the divergence's terms, then the gradients; the last two recompute
// the exponentials from the inputs, which are still in cache (no scratch row to write and read).

using div::Divergence;

// div::terms' operations on float vectors.
struct VecOps {
  static FVec log(const FVec& x) { return log_nonneg(x); }
  static FVec abs(const FVec& x) { return x.abs(); }
  // x / y to about 2 ulps through the reciprocal estimate and one Newton step (a vector division
  // costs several times more); 0 / 0 is NaN and x / 0 inf, as the terms expect.
  static FVec div(const FVec& x, const FVec& y) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 r0 = _mm512_rcp14_ps(y);
    const __m512 r1 = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(y, r0, _mm512_set1_ps(1.f)), r0);
    const __m512 q = _mm512_mul_ps(x, r1);
    // where y is 0 or inf the Newton step gives NaN: the plain quotient there
    return _mm512_mask_div_ps(q, _mm512_fpclass_ps_mask(y, 0x1e), x, y);
#else
    return x / y;
#endif
  }
  static FVec if_nonzero(const FVec& c, const FVec& x) { return FVec::blendv(FVec(0.f), x, c != FVec(0.f)); }
  static FVec clamp_hi(const FVec& x, const FVec& hi) { return FVec::blendv(x, hi, x > hi); }
  static FVec sign(const FVec& x) {
    const FVec one(1.f), zero(0.f);
    const FVec sg = FVec::blendv(FVec::blendv(zero, one, x > zero), -one, x < zero);
    return FVec::blendv(sg, x, x != x);
  }
};

struct DivStats {
  double f = 0, su = 0, sw = 0;  // sum f, sum Q u, sum P w
};

// The exponentials of a row cached by row_online (relative to each block's running maxima).
// With u and w: room for a row's terms u and w, rounded up to whole steps, which the sums' pass
// writes and the gradients' pass reads instead of computing them again (their log and division
// are most of the terms' cost).
struct ExpCache {
  const float *es, *et, *block_ms, *block_mt;
  float *u = nullptr, *w = nullptr;
};

// A row's (or chunk's) softmaxes and divergence terms, K elements at a time: P = e_t / Z_t and
// Q = e_s / Z_s relative to the row maxima, from cached exponentials (the row path) or computed
// from the inputs (chunks of the split path).
template <Divergence D>
struct DivRow {
  static constexpr bool kLogRatio = D == Divergence::JSD;  // whether the terms read log(P/Q)
  float ms, mt;
  double zs, zt;
  FVec nms, nmt, izs, izt, inv_h, lz;  // lz = log Z_s - log Z_t
  div::Consts<FVec> k;
  const Units& u;
  DivRow(float ms_, float mt_, double zs_, double zt_, const div::Params<float>& c, const Units& u_)
      : ms(ms_), mt(mt_), zs(zs_), zt(zt_), nms(u_.neg_mh(ms_)), nmt(u_.neg_mh(mt_)),
        izs(static_cast<float>(1.0 / zs_)), izt(static_cast<float>(1.0 / zt_)), inv_h(u_.inv_h),
        lz(static_cast<float>(std::log(zs_) - std::log(zt_))),
        k{FVec(c.m), FVec(c.one_m), FVec(c.max_p), FVec(c.log_max_q)}, u(u_) {}

  // fn(offset, half, is_tail, P, Q, f, u, w) over n elements at s, t, two vectors per step; the
  // tail is padded with -inf logits (P = Q = 0, whose terms are 0).
  template <bool kCachedTerms, typename T, typename Fn>
  void for_row(const T* s, const T* t, int64_t n, const ExpCache* c, const Fn& fn) const {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    FVec cs = izs, ct = izt;  // Q = e_s cs, P = e_t ct
    // The terms come from c's u and w when kCachedTerms (f is then not computed: 0).
    const bool cached = kCachedTerms && c && c->u;
    auto step = [&](int64_t i, bool tail, const auto* ps, const auto* pt, const float* pe, const float* pet) {
      FVec a[2], b[2], es[2], et[2];
      if ((kLogRatio && !cached) || !c) scaled(ps, pt, nms, nmt, u, a[0], a[1], b[0], b[1]);
      for (int h = 0; h < 2; ++h) {
        if (c) {
          es[h] = FVec::loadu(pe + h * FVec::size()), et[h] = FVec::loadu(pet + h * FVec::size());
        } else {
          es[h] = exp_nonpos(a[h], u.ex), et[h] = exp_nonpos(b[h], u.ex);
        }
        const FVec q = es[h] * cs, p = et[h] * ct;
        FVec f(0.f), uu, w;
        if (cached) {
          uu = FVec::loadu(c->u + i + h * FVec::size()), w = FVec::loadu(c->w + i + h * FVec::size());
        } else {
          const FVec lpq = kLogRatio ? at::vec::fmadd(b[h] - a[h], inv_h, lz) : FVec(0.f);
          div::terms<D, VecOps>(p, q, lpq, k, f, uu, w);
        }
        fn(i, h, tail, p, q, f, uu, w);
      }
    };
    const int64_t block = c ? kBlock : n;
    for (int64_t b0 = 0, blk = 0; b0 < n; b0 += block, ++blk) {
      const int64_t bn = std::min(block, n - b0);
      if (c) {  // this block's exponentials are relative to its own running maxima (in double: see row_grads_cached)
        cs = FVec(c->block_ms[blk] == kNegInf ? 0.f
                  : static_cast<float>(std::exp((static_cast<double>(c->block_ms[blk]) - ms) * u.invt) / zs));
        ct = FVec(c->block_mt[blk] == kNegInf ? 0.f
                  : static_cast<float>(std::exp((static_cast<double>(c->block_mt[blk]) - mt) * u.invt) / zt));
        // A side without mass (all -inf) has no softmax: NaN, as 1 / Z gives it on the uncached path
        if (!(zs > 0)) cs = FVec(std::numeric_limits<float>::quiet_NaN());
        if (!(zt > 0)) ct = FVec(std::numeric_limits<float>::quiet_NaN());
      }
      int64_t i = 0;
      for (; i + kStep <= bn; i += kStep) {
        const int64_t j = b0 + i;
        step(j, false, s + j, t + j, c ? c->es + j : nullptr, c ? c->et + j : nullptr);
      }
      if (i < bn) {
        const int64_t j = b0 + i, m = bn - i;
        const Tail tail(s + j, t + j, m, kPadLogit);
        if (c) {
          const Tail e(c->es + j, c->et + j, m, 0.f);
          step(j, true, tail.s, tail.t, e.s, e.t);
        } else {
          step(j, true, tail.s, tail.t, nullptr, nullptr);
        }
      }
    }
  }

  template <typename T>
  DivStats stats(const T* s, const T* t, int64_t n, const ExpCache* c) const {
    FVec F(0.f), SU(0.f), SW(0.f);
    float* cu = c ? c->u : nullptr;
    for_row<false>(s, t, n, c, [&](int64_t i, int h, bool, const FVec& p, const FVec& q, const FVec& f,
                                   const FVec& uu, const FVec& w) {
      F = F + f, SU = SU + q * uu, SW = SW + p * w;
      if (cu) uu.store(cu + i + h * FVec::size()), w.store(c->w + i + h * FVec::size());
    });
    const RowStats r = reduce_stats(F, SU, SW);
    return DivStats{r.zs, r.zt, r.a};
  }

  // Gradients: cs * Q (u - su) to gs and ct * P (w - sw) to gt (either may be null).
  template <typename T>
  void grads(const T* s, const T* t, int64_t n, const ExpCache* c, float gcs, float gct, float su, float sw,
             float post, T* gs, T* gt, bool stream) const {
    const FVec vcs(gcs), vct(gct), vsu(su), vsw(sw), vpost(post);
    const bool scaled_out = post != 1.f;
    stream = can_stream(stream, gs, gt);
    FVec qs[2], qt[2];
    for_row<true>(s, t, n, c, [&](int64_t i, int h, bool tail, const FVec& p, const FVec& q, const FVec&,
                                  const FVec& uu, const FVec& w) {
      qs[h] = div::grad<VecOps>(vcs, q, uu, vsu);
      qt[h] = div::grad<VecOps>(vct, p, w, vsw);
      if (h == 0) return;
      if (!tail) {
        if (gs) store2_scaled<T>(gs + i, qs[0], qs[1], scaled_out, vpost, stream);
        if (gt) store2_scaled<T>(gt + i, qt[0], qt[1], scaled_out, vpost, stream);
        return;
      }
      float bs[kStep], bt[kStep];
      store2_scaled<float>(bs, qs[0], qs[1], scaled_out, vpost, false);
      store2_scaled<float>(bt, qt[0], qt[1], scaled_out, vpost, false);
      if (gs) copy_out(bs, n - i, gs + i);
      if (gt) copy_out(bt, n - i, gt + i);
    });
    if (stream) stream_fence();
  }
};

// double: plain loops over the same terms.
template <Divergence D>
struct DivRowDouble {
  double ms, mt, invt, izs, izt;
  div::Params<double> k;

  template <typename Fn>
  void for_row(const double* s, const double* t, int64_t n, const Fn& fn) const {
    const double lz = -std::log(izs) + std::log(izt);
    for (int64_t i = 0; i < n; ++i) {
      const double a = (s[i] - ms) * invt, b = (t[i] - mt) * invt;
      // rounded on their own (kl::mul_rn): equal rows give P = Q exactly, so TVD's sign is 0
      const double q = kl::mul_rn(std::exp(a), izs), p = kl::mul_rn(std::exp(b), izt);
      double f, uu, w;
      div::terms<D, div::ScalarOps<double>>(p, q, (b - a) + lz, k, f, uu, w);
      fn(i, p, q, f, uu, w);
    }
  }
  DivStats stats(const double* s, const double* t, int64_t n, const ExpCache*) const {
    DivStats r;
    for_row(s, t, n, [&](int64_t, double p, double q, double f, double uu, double w) {
      r.f += f, r.su += q * uu, r.sw += p * w;
    });
    return r;
  }
  void grads(const double* s, const double* t, int64_t n, const ExpCache*, double cs, double ct, double su, double sw,
             double post, double* gs, double* gt, bool) const {
    using Ops = div::ScalarOps<double>;
    for_row(s, t, n, [&](int64_t i, double p, double q, double, double uu, double w) {
      if (gs) gs[i] = div::grad<Ops>(cs, q, uu, su) * post;
      if (gt) gt[i] = div::grad<Ops>(ct, p, w, sw) * post;
    });
  }
};

// ---- split path: rows cut into chunks of kSplitChunk elements ----

// The maxima and softmax sums of every row, from (row, chunk) tasks whose partial results are
// combined in chunk order (so they do not depend on the thread count); rows of weight 0 are skipped.
template <typename T>
struct SplitRows {
  using acc_t = acc_of<T>;
  const SoftmaxKLArgs& p;
  int64_t nchunk;
  std::vector<acc_t> ms, mt;
  std::vector<RowStats> st;

  // fn(row, first element, count) for every chunk of a row, in parallel.
  template <typename Fn>
  void for_chunks(const Fn& fn) const {
    const int64_t V = p.cols;
    at::parallel_for(0, p.rows * nchunk, 1, [&](int64_t k0, int64_t k1) {
      const FlushDenormals ftz;
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b = (k % nchunk) * kSplitChunk;
        fn(k / nchunk, b, std::min(kSplitChunk, V - b));
      }
    });
  }
};

template <typename T>
SplitRows<T> split_rows(const SoftmaxKLArgs& p, const Units& u, int64_t nchunk) {
  using acc_t = acc_of<T>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const T* S = static_cast<const T*>(p.student);
  const T* Tt = static_cast<const T*>(p.teacher);
  const acc_t* W = static_cast<const acc_t*>(p.row_weight);
  const int64_t R = p.rows, ntask = R * nchunk;
  SplitRows<T> sp{p, nchunk, std::vector<acc_t>(R, kNegInf), std::vector<acc_t>(R, kNegInf), std::vector<RowStats>(R)};
  std::vector<acc_t> cms(ntask, kNegInf), cmt(ntask, kNegInf);
  sp.for_chunks([&](int64_t r, int64_t b, int64_t n) {
    if (W[r] == acc_t(0)) return;
    const int64_t k = r * nchunk + b / kSplitChunk;
    row_max(S + r * p.student_row_stride + b, Tt + r * p.teacher_row_stride + b, n, cms[k], cmt[k]);
  });
  for (int64_t k = 0; k < ntask; ++k) {
    const int64_t r = k / nchunk;
    sp.ms[r] = (cms[k] > sp.ms[r] || std::isnan(cms[k])) ? cms[k] : sp.ms[r];
    sp.mt[r] = (cmt[k] > sp.mt[r] || std::isnan(cmt[k])) ? cmt[k] : sp.mt[r];
  }
  std::vector<RowStats> cst(ntask);
  sp.for_chunks([&](int64_t r, int64_t b, int64_t n) {
    if (W[r] == acc_t(0)) return;
    const T* s = S + r * p.student_row_stride + b;
    const T* t = Tt + r * p.teacher_row_stride + b;
    if constexpr (std::is_same_v<T, double>) {
      cst[r * nchunk + b / kSplitChunk] = row_stats(s, t, n, sp.ms[r], sp.mt[r], p.inv_temperature);
    } else {
      cst[r * nchunk + b / kSplitChunk] = row_stats(s, t, n, sp.ms[r], sp.mt[r], u);
    }
  });
  for (int64_t k = 0; k < ntask; ++k) {
    RowStats& d = sp.st[k / nchunk];
    d.zs += cst[k].zs, d.zt += cst[k].zt, d.a += cst[k].a;
  }
  return sp;
}

// The row kernel of divergence D for element type T: plain double loops, or the float vector row.
template <Divergence D, typename T, typename acc_t>
auto make_div_row(acc_t ms, acc_t mt, double zs, double zt, const div::Params<acc_t>& k, acc_t invt, const Units& u) {
  if constexpr (std::is_same<T, double>::value) {
    return DivRowDouble<D>{ms, mt, invt, 1.0 / zs, 1.0 / zt, k};
  } else {
    return DivRow<D>(ms, mt, zs, zt, k, u);
  }
}

// f(std::integral_constant<Divergence, D>{}) for the kernel divergence d (KL, JSD, SkewKL or TVD:
// the glue reduced every other kind to these).
template <typename F>
void with_divergence(Divergence d, const F& f) {
  switch (d) {
    case Divergence::JSD: return f(std::integral_constant<Divergence, Divergence::JSD>{});
    case Divergence::SkewKL: return f(std::integral_constant<Divergence, Divergence::SkewKL>{});
    case Divergence::TVD: return f(std::integral_constant<Divergence, Divergence::TVD>{});
    default: return f(std::integral_constant<Divergence, Divergence::KL>{});
  }
}

// ---- driver ----

template <typename T>
void softmax_kl_typed(const SoftmaxKLArgs& p) {
  using acc_t = acc_of<T>;
  const T* S = static_cast<const T*>(p.student);
  const T* Tt = static_cast<const T*>(p.teacher);
  const acc_t* W = static_cast<const acc_t*>(p.row_weight);
  double* KL = static_cast<double*>(p.loss_rows);
  T* GS = static_cast<T*>(p.grad_student);
  T* GT = static_cast<T*>(p.grad_teacher);
  const int64_t R = p.rows, V = p.cols;
  const acc_t invt = static_cast<acc_t>(p.inv_temperature);
  const acc_t post = static_cast<acc_t>(p.grad_scale);
  const bool want_grad = GS || GT;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  // The float kernels' units (common/softmax_kl.h); the double loops work in natural units.
  constexpr bool kDouble = std::is_same<T, double>::value;
  const Units u(kl::scale_exponent(V, p.inv_temperature), static_cast<float>(p.inv_temperature));
  const double inv_h = kDouble ? 1.0 : static_cast<double>(u.inv_h);

  auto grad_coef = [&](acc_t w, const RowStats& st) {
    acc_t zs = static_cast<acc_t>(st.zs), zt = static_cast<acc_t>(st.zt);
    return std::make_tuple(w * invt, acc_t(1) / zs, acc_t(1) / zt, static_cast<acc_t>(st.a) / zt);
  };

  // The row path keeps per-block maxima on the stack: rows beyond 2^20 elements take the split path.
  const bool split = (R < tuning::kKLSplitFewRows && V >= 2 * kSplitChunk) || V > tuning::kKLSplitRowsAbove;
  const int64_t nchunk = split ? (V + kSplitChunk - 1) / kSplitChunk : 1;
  const bool stream = streams_output(R * V, sizeof(T));  // the gradients (vec_io.h)
  if (nchunk == 1) {
    at::parallel_for(0, R, rows_per_task(V, tuning::kKLRowGrain), [&](int64_t r0, int64_t r1) {
      const FlushDenormals ftz;
      std::vector<float> scratch;
      if (!std::is_same<T, double>::value && want_grad) scratch.resize(2 * V);
      for (int64_t r = r0; r < r1; ++r) {
        const T* s = S + r * p.student_row_stride;
        const T* t = Tt + r * p.teacher_row_stride;
        T* gs = GS ? GS + r * V : nullptr;
        T* gt = GT ? GT + r * V : nullptr;
        const acc_t w = W[r];
        if (w == acc_t(0)) {
          KL[r] = 0;
          zero_grad_row(gs, V, post), zero_grad_row(gt, V, post);
          continue;
        }
        if constexpr (kDouble) {
          acc_t ms = kNegInf, mt = kNegInf;
          row_max(s, t, V, ms, mt);
          RowStats st = row_stats(s, t, V, ms, mt, invt);
          KL[r] = kl::row_value(st.zs, st.zt, st.a);
          if (want_grad && std::isnan(KL[r])) {
            nan_grad_row(gs, V), nan_grad_row(gt, V);
          } else if (want_grad) {
            auto [c, izs, izt, shift] = grad_coef(w, st);
            row_grads(s, t, V, ms, mt, invt, c, izs, izt, shift, post, gs, gt);
          }
        } else {
          float bms[(1 << 20) / kBlock];
          float bmt[(1 << 20) / kBlock];
          float* es = want_grad ? scratch.data() : nullptr;
          float* et = want_grad ? scratch.data() + V : nullptr;
          float fms, fmt;
          RowStats st = row_online(s, t, V, u, es, et, bms, bmt, fms, fmt);
          KL[r] = kl::row_value(st.zs, st.zt, st.a * inv_h);
          if (want_grad && std::isnan(KL[r])) {
            nan_grad_row(gs, V), nan_grad_row(gt, V);
          } else if (want_grad) {
            auto [c, izs, izt, shift] = grad_coef(w, st);
            (void)izs, (void)izt;
            row_grads_cached(s, t, V, fms, fmt, u, c, st.zs, st.zt, shift, post, es, et, bms, bmt, gs, gt,
                             stream);
          }
        }
      }
    });
    return;
  }

  const SplitRows<T> sp = split_rows<T>(p, u, nchunk);
  const std::vector<acc_t>&ms = sp.ms, &mt = sp.mt;
  const std::vector<RowStats>& st = sp.st;
  for (int64_t r = 0; r < R; ++r) {
    KL[r] = W[r] == acc_t(0) ? 0.0 : kl::row_value(st[r].zs, st[r].zt, st[r].a * inv_h);
  }
  if (!want_grad) return;
  sp.for_chunks([&](int64_t r, int64_t b, int64_t n) {
    T* gs = GS ? GS + r * V + b : nullptr;
    T* gt = GT ? GT + r * V + b : nullptr;
    if (W[r] == acc_t(0)) {
      zero_grad_row(gs, n, post), zero_grad_row(gt, n, post);
      return;
    }
    if (std::isnan(KL[r])) {
      nan_grad_row(gs, n), nan_grad_row(gt, n);
      return;
    }
    const T* s = S + r * p.student_row_stride + b;
    const T* t = Tt + r * p.teacher_row_stride + b;
    auto [c, izs, izt, shift] = grad_coef(W[r], st[r]);
    if constexpr (kDouble) {
      row_grads(s, t, n, ms[r], mt[r], invt, c, izs, izt, shift, post, gs, gt);
    } else {
      row_grads(s, t, n, ms[r], mt[r], u, GradCoef{c, izs, izt, shift, post}, gs, gt, stream);
    }
  });
}

template <Divergence D, typename T>
void divergence_typed(const SoftmaxKLArgs& p) {
  using acc_t = acc_of<T>;
  constexpr bool kDouble = std::is_same<T, double>::value;
  const T* S = static_cast<const T*>(p.student);
  const T* Tt = static_cast<const T*>(p.teacher);
  const acc_t* W = static_cast<const acc_t*>(p.row_weight);
  double* L = static_cast<double*>(p.loss_rows);
  T* GS = static_cast<T*>(p.grad_student);
  T* GT = static_cast<T*>(p.grad_teacher);
  const int64_t R = p.rows, V = p.cols;
  const acc_t invt = static_cast<acc_t>(p.inv_temperature);
  const acc_t post = static_cast<acc_t>(p.grad_scale);
  const bool want_grad = GS || GT;
  const div::Params<acc_t> k = div::params<acc_t>(D, p.mix);
  const Units u(kl::scale_exponent(V, p.inv_temperature), static_cast<float>(p.inv_temperature));
  const bool stream = streams_output(R * V, sizeof(T));
  auto row_kernel = [&](acc_t ms, acc_t mt, double zs, double zt) {
    return make_div_row<D, T>(ms, mt, zs, zt, k, invt, u);
  };
  // The gradient coefficients of a row: weight / T times the divergence's factors.
  const acc_t cs = invt * k.cq, ct = invt * k.cp;

  const bool split = (R < tuning::kKLSplitFewRows && V >= 2 * kSplitChunk) || V > tuning::kKLSplitRowsAbove;
  if (!split) {
    at::parallel_for(0, R, rows_per_task(V, tuning::kKLRowGrain), [&](int64_t r0, int64_t r1) {
      const FlushDenormals ftz;
      // The row's exponentials and terms (ExpCache), the terms' rows rounded up to whole steps.
      const int64_t Vp = (V + kStep - 1) / kStep * kStep;
      std::vector<float> scratch(kDouble ? 0 : 2 * V + (want_grad ? 2 * Vp : 0));
      float bms[(1 << 20) / kBlock], bmt[(1 << 20) / kBlock];
      for (int64_t r = r0; r < r1; ++r) {
        const T* s = S + r * p.student_row_stride;
        const T* t = Tt + r * p.teacher_row_stride;
        T* gs = GS ? GS + r * V : nullptr;
        T* gt = GT ? GT + r * V : nullptr;
        const acc_t w = W[r];
        if (w == acc_t(0)) {
          L[r] = 0;
          zero_grad_row(gs, V, post), zero_grad_row(gt, V, post);
          continue;
        }
        acc_t ms = -std::numeric_limits<acc_t>::infinity(), mt = ms;
        RowStats st;
        ExpCache cache{}, *c = nullptr;
        if constexpr (kDouble) {
          row_max(s, t, V, ms, mt);
          st = row_stats(s, t, V, ms, mt, invt);
        } else {
          float* es = scratch.data();
          st = row_online(s, t, V, u, es, es + V, bms, bmt, ms, mt);
          cache = ExpCache{es, es + V, bms, bmt}, c = &cache;
          if (want_grad) cache.u = es + 2 * V, cache.w = es + 2 * V + Vp;
        }
        const auto row = row_kernel(ms, mt, st.zs, st.zt);
        const DivStats ds = row.stats(s, t, V, c);
        L[r] = div::row_value(ds.f);
        if (want_grad && std::isnan(L[r])) {
          nan_grad_row(gs, V), nan_grad_row(gt, V);
        } else if (want_grad) {
          row.grads(s, t, V, c, w * cs, w * ct, static_cast<acc_t>(ds.su), static_cast<acc_t>(ds.sw), post, gs, gt,
                    stream);
        }
      }
    });
    return;
  }

  const int64_t nchunk = (V + kSplitChunk - 1) / kSplitChunk;
  const SplitRows<T> sp = split_rows<T>(p, u, nchunk);
  std::vector<DivStats> cds(R * nchunk);
  sp.for_chunks([&](int64_t r, int64_t b, int64_t n) {
    if (W[r] == acc_t(0)) return;
    cds[r * nchunk + b / kSplitChunk] = row_kernel(sp.ms[r], sp.mt[r], sp.st[r].zs, sp.st[r].zt)
                                            .stats(S + r * p.student_row_stride + b, Tt + r * p.teacher_row_stride + b, n,
                                                   nullptr);
  });
  std::vector<DivStats> ds(R);
  for (int64_t i = 0; i < R * nchunk; ++i) {
    DivStats& d = ds[i / nchunk];
    d.f += cds[i].f, d.su += cds[i].su, d.sw += cds[i].sw;
  }
  for (int64_t r = 0; r < R; ++r) L[r] = W[r] == acc_t(0) ? 0.0 : static_cast<double>(div::row_value(ds[r].f));
  if (!want_grad) return;
  sp.for_chunks([&](int64_t r, int64_t b, int64_t n) {
    T* gs = GS ? GS + r * V + b : nullptr;
    T* gt = GT ? GT + r * V + b : nullptr;
    if (W[r] == acc_t(0)) {
      zero_grad_row(gs, n, post), zero_grad_row(gt, n, post);
    } else if (std::isnan(L[r])) {
      nan_grad_row(gs, n), nan_grad_row(gt, n);
    } else {
      row_kernel(sp.ms[r], sp.mt[r], sp.st[r].zs, sp.st[r].zt)
          .grads(S + r * p.student_row_stride + b, Tt + r * p.teacher_row_stride + b, n, nullptr, W[r] * cs, W[r] * ct,
                 static_cast<acc_t>(ds[r].su), static_cast<acc_t>(ds[r].sw), post, gs, gt, stream);
    }
  });
}

template <typename T>
void softmax_kl_any(const SoftmaxKLArgs& p) {
  with_divergence(p.divergence, [&](auto d) {
    if constexpr (d() == Divergence::KL) {
      softmax_kl_typed<T>(p);
    } else {
      divergence_typed<d(), T>(p);
    }
  });
}

}  // namespace

void softmax_kl(const SoftmaxKLArgs& p) {
  switch (p.dtype) {
    case DType::Float: return softmax_kl_any<float>(p);
    case DType::Double: return softmax_kl_any<double>(p);
    case DType::Half: return softmax_kl_any<c10::Half>(p);
    case DType::BFloat16: return softmax_kl_any<c10::BFloat16>(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast

// ---- per-shard passes of the vocab-parallel losses (kdfast/distributed.py) ----
//
// A rank holds a slice of each row's vocabulary. The statistics pass gives the slice's maxima and
// sums relative to them (row_max, row_stats); the caller merges them over the ranks into the row's
// global maxima and sums, with which the term-sums pass (DivRow::stats) and the gradient pass
// (row_grads, DivRow::grads) run on the slice exactly as on a whole row.

namespace kdfast {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename T>
void shard_stats_typed(const ShardArgs& p) {
  using acc_t = acc_of<T>;
  constexpr bool kDouble = std::is_same<T, double>::value;
  const T* S = static_cast<const T*>(p.student);
  const T* Tt = static_cast<const T*>(p.teacher);
  acc_t* out = static_cast<acc_t*>(p.out);
  const int64_t R = p.rows, V = p.cols;
  const Units u(kl::scale_exponent(V, p.inv_temperature), static_cast<float>(p.inv_temperature));
  at::parallel_for(0, R, rows_per_task(V, tuning::kKLRowGrain), [&](int64_t r0, int64_t r1) {
    const FlushDenormals ftz;
    for (int64_t r = r0; r < r1; ++r) {
      const T* s = S + r * p.student_row_stride;
      const T* t = Tt + r * p.teacher_row_stride;
      acc_t ms = -std::numeric_limits<acc_t>::infinity(), mt = ms;
      RowStats st;
      double a_nat;  // A in natural units
      if constexpr (kDouble) {
        row_max(s, t, V, ms, mt);
        // a slice row without mass: its sums are 0 relative to any finite reference (as neg_mh does)
        auto ref = [](double m) { return m == -std::numeric_limits<double>::infinity() ? 0.0 : m; };
        st = row_stats(s, t, V, ref(ms), ref(mt), static_cast<double>(p.inv_temperature));
        a_nat = st.a;
      } else {
        row_max(s, t, V, ms, mt);
        st = row_stats(s, t, V, ms, mt, u);
        a_nat = st.a * static_cast<double>(u.inv_h);
      }
      out[r] = ms, out[R + r] = mt;
      out[2 * R + r] = static_cast<acc_t>(st.zs), out[3 * R + r] = static_cast<acc_t>(st.zt);
      if (p.with_a) out[4 * R + r] = static_cast<acc_t>(a_nat);
    }
  });
}

// The row state the caller merged: global maxima (raw logits), sums relative to them and, for KL,
// A / Z_t (natural units); coef the upstream weight of each row.
template <typename acc_t>
struct ShardRow {
  acc_t ms, mt, zs, zt, shift;
};

template <typename acc_t>
ShardRow<acc_t> shard_row(const ShardArgs& p, int64_t r) {
  const acc_t* st = static_cast<const acc_t*>(p.state);
  const int64_t R = p.rows;
  return {st[r], st[R + r], st[2 * R + r], st[3 * R + r], p.with_a ? st[4 * R + r] : acc_t(0)};
}

template <Divergence D, typename T>
void shard_div_typed(const ShardArgs& p) {
  using acc_t = acc_of<T>;
  constexpr bool kDouble = std::is_same<T, double>::value;
  const T* S = static_cast<const T*>(p.student);
  const T* Tt = static_cast<const T*>(p.teacher);
  const acc_t* coef = static_cast<const acc_t*>(p.coef);
  const acc_t* sums = static_cast<const acc_t*>(p.row_sums);
  acc_t* out = static_cast<acc_t*>(p.out);
  T* GS = static_cast<T*>(p.grad_student);
  T* GT = static_cast<T*>(p.grad_teacher);
  const int64_t R = p.rows, V = p.cols;
  const acc_t invt = static_cast<acc_t>(p.inv_temperature);
  const div::Params<acc_t> k = div::params<acc_t>(D, p.mix);
  const Units u(kl::scale_exponent(V, p.inv_temperature), static_cast<float>(p.inv_temperature));
  const bool grads = GS || GT;
  const bool stream = streams_output(R * V, sizeof(T));
  at::parallel_for(0, R, rows_per_task(V, tuning::kKLRowGrain), [&](int64_t r0, int64_t r1) {
    const FlushDenormals ftz;
    for (int64_t r = r0; r < r1; ++r) {
      const T* s = S + r * p.student_row_stride;
      const T* t = Tt + r * p.teacher_row_stride;
      T* gs = GS ? GS + r * V : nullptr;
      T* gt = GT ? GT + r * V : nullptr;
      const ShardRow<acc_t> st = shard_row<acc_t>(p, r);
      if constexpr (D == Divergence::KL) {  // gradients only: the value came from the statistics
        const acc_t c = coef[r] * invt, izs = acc_t(1) / st.zs, izt = acc_t(1) / st.zt;
        if constexpr (kDouble) {
          row_grads(s, t, V, st.ms, st.mt, invt, c, izs, izt, st.shift, 1.0, gs, gt);
        } else {
          row_grads(s, t, V, st.ms, st.mt, u, GradCoef{c, izs, izt, static_cast<float>(st.shift * u.h), 1.f}, gs, gt,
                    stream);
        }
        continue;
      }
      auto run = [&](const auto& row) {
        if (!grads) {
          const DivStats ds = row.stats(s, t, V, nullptr);
          out[r] = static_cast<acc_t>(ds.f), out[R + r] = static_cast<acc_t>(ds.su), out[2 * R + r] =
              static_cast<acc_t>(ds.sw);
        } else {
          const acc_t c = coef[r];
          row.grads(s, t, V, nullptr, c * invt * k.cq, c * invt * k.cp, sums[R + r], sums[2 * R + r], acc_t(1), gs, gt,
                    stream);
        }
      };
      run(make_div_row<D, T>(st.ms, st.mt, st.zs, st.zt, k, invt, u));
    }
  });
}

template <typename T>
void shard_pass_any(const ShardArgs& p) {
  with_divergence(p.divergence, [&](auto d) { shard_div_typed<d(), T>(p); });
}

}  // namespace

void softmax_kl_shard_stats(const ShardArgs& p) {
  switch (p.dtype) {
    case DType::Float: return shard_stats_typed<float>(p);
    case DType::Double: return shard_stats_typed<double>(p);
    case DType::Half: return shard_stats_typed<c10::Half>(p);
    case DType::BFloat16: return shard_stats_typed<c10::BFloat16>(p);
  }
}

void softmax_kl_shard_pass(const ShardArgs& p) {
  switch (p.dtype) {
    case DType::Float: return shard_pass_any<float>(p);
    case DType::Double: return shard_pass_any<double>(p);
    case DType::Half: return shard_pass_any<c10::Half>(p);
    case DType::BFloat16: return shard_pass_any<c10::BFloat16>(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast
