// Temperature softmax-KL on the CPU: forward and gradients in one call.
//
// Row path (the usual case): each thread takes whole rows. Pass 1 finds both row maxima, pass 2
// computes e_s, e_t (the only two exponentials per element), the sums and the KL, keeping e_s and
// e_t in a per-thread scratch row that stays in cache, and pass 3 writes the gradients. Inputs are
// read from memory once and the gradient written once; the later passes hit L2.
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
#include <vector>

#include "common/softmax_kl.h"
#include "cpu/kernels.h"
#include "cpu/fast_exp.h"
#include "cpu/vec_io.h"

namespace kdfast {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using FVec = Vectorized<float>;

constexpr int64_t kSplitChunk = 1 << 15;  // elements per task on the split path

struct RowStats {
  double zs = 0, zt = 0, a = 0;
};

// ---- float accumulation (float, half, bfloat16), vectorised ----

template <typename T>
void row_max(const T* s, const T* t, int64_t n, float& ms, float& mt) {
  constexpr int64_t K = 2 * FVec::size();
  FVec vs(-std::numeric_limits<float>::infinity()), vt = vs;
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    FVec s0, s1, t0, t1;
    load2(s + i, s0, s1);
    load2(t + i, t0, t1);
    vs = at::vec::maximum(vs, at::vec::maximum(s0, s1));
    vt = at::vec::maximum(vt, at::vec::maximum(t0, t1));
  }
  float m1 = at::vec::vec_reduce_all<float>([](FVec& x, FVec& y) { return at::vec::maximum(x, y); }, vs);
  float m2 = at::vec::vec_reduce_all<float>([](FVec& x, FVec& y) { return at::vec::maximum(x, y); }, vt);
  for (; i < n; ++i) {
    float a = static_cast<float>(s[i]), b = static_cast<float>(t[i]);
    m1 = (a > m1 || std::isnan(a)) ? a : m1;
    m2 = (b > m2 || std::isnan(b)) ? b : m2;
  }
  ms = std::max(ms, m1);
  mt = std::max(mt, m2);
  if (std::isnan(m1)) ms = m1;
  if (std::isnan(m2)) mt = m2;
}

// a = (s - ms) / T, b = (t - mt) / T for K elements at s + i.
template <typename T>
inline void scaled(const T* s, const T* t, FVec ms, FVec mt, FVec it, FVec& a0, FVec& a1, FVec& b0,
                   FVec& b1) {
  load2(s, a0, a1);
  load2(t, b0, b1);
  a0 = (a0 - ms) * it;
  a1 = (a1 - ms) * it;
  b0 = (b0 - mt) * it;
  b1 = (b1 - mt) * it;
}

// acc + e_t * (b - a), adding nothing where e_t = 0 (a may be -inf there): kl::term, vectorised.
inline FVec add_term(FVec acc, FVec et, FVec a, FVec b) {
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 live = _mm512_cmp_ps_mask(et, _mm512_setzero_ps(), _CMP_GT_OQ);
  return _mm512_mask3_fmadd_ps(et, _mm512_sub_ps(b, a), acc, live);
#else
  return acc + FVec::blendv(FVec(0.f), et * (b - a), et > FVec(0.f));
#endif
}

// The sums Z_s, Z_t and A over K elements at s and t, with exponentials relative to the maxima in
// vms / vmt; the exponentials also go to es_out / et_out when given.
template <typename T>
inline void sums_k(const T* s, const T* t, FVec vms, FVec vmt, FVec vit, FVec& zs, FVec& zt, FVec& acc,
                   float* es_out, float* et_out) {
  FVec a0, a1, b0, b1;
  scaled(s, t, vms, vmt, vit, a0, a1, b0, b1);
  FVec es0 = exp_nonpos(a0), es1 = exp_nonpos(a1), et0 = exp_nonpos(b0), et1 = exp_nonpos(b1);
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

template <typename T>
RowStats row_stats(const T* s, const T* t, int64_t n, float ms, float mt, float invt, float* es_out,
                   float* et_out) {
  constexpr int64_t K = 2 * FVec::size();
  const FVec vms(ms), vmt(mt), vit(invt);
  FVec zs(0.f), zt(0.f), acc(0.f);
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    sums_k(s + i, t + i, vms, vmt, vit, zs, zt, acc, es_out ? es_out + i : nullptr,
           et_out ? et_out + i : nullptr);
  }
  auto sum = [](FVec& x, FVec& y) { return x + y; };
  RowStats r;
  r.zs = at::vec::vec_reduce_all<float>(sum, zs);
  r.zt = at::vec::vec_reduce_all<float>(sum, zt);
  r.a = at::vec::vec_reduce_all<float>(sum, acc);
  for (; i < n; ++i) {
    float a = (static_cast<float>(s[i]) - ms) * invt, b = (static_cast<float>(t[i]) - mt) * invt;
    float es = std::exp(a), et = std::exp(b);
    r.zs += es;
    r.zt += et;
    r.a += kl::term(et, a, b);
    if (es_out) {
      es_out[i] = es;
      et_out[i] = et;
    }
  }
  return r;
}

// One streaming pass over a row for the row path: each block of kBlock elements is read from memory
// once; its maxima are taken while it sits in L1, the running maxima move up if needed (rescaling
// the sums, as online softmax does) and the exponentials relative to the running maxima go to the
// scratch rows. block_ms/block_mt record, per block, the maxima its exponentials are relative to.
constexpr int64_t kBlock = 2048;

// Software prefetch of the cache lines of K elements at p (for writing when kWrite). The row pass
// asks for the next block while it computes this one, so that memory and arithmetic overlap
// instead of taking turns (the hardware prefetcher alone runs too little ahead; measured: forward
// 46 -> 26 ms at 2048 x 32000); the gradient pass asks for its destination 2 KB ahead of its
// stores, which otherwise stall on reading each line first (49 -> 45 ms).
template <int kWrite = 0, typename T>
inline void prefetch_k(const T* p) {
  for (int64_t off = 0; off < int64_t(2 * FVec::size() * sizeof(T)); off += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(p) + off, kWrite);
  }
}

inline float nan_max(float a, float b) { return (b > a || std::isnan(b)) ? b : a; }

template <typename T>
RowStats row_online(const T* s, const T* t, int64_t n, float invt, float* es_out, float* et_out,
                    float* block_ms, float* block_mt, float& ms, float& mt) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr int64_t K = 2 * FVec::size();
  FVec zs(0.f), zt(0.f), acc(0.f);
  float tzs = 0.f, tzt = 0.f, tacc = 0.f;  // the scalar tail's sums (last block only)
  ms = mt = kNegInf;
  for (int64_t b0 = 0, blk = 0; b0 < n; b0 += kBlock, ++blk) {
    const int64_t bn = std::min(kBlock, n - b0);
    float bms = kNegInf, bmt = kNegInf;
    row_max(s + b0, t + b0, bn, bms, bmt);
    const float nms = nan_max(ms, bms), nmt = nan_max(mt, bmt);
    if (!(nms == ms && nmt == mt)) {
      if (mt == kNegInf) {  // no teacher mass yet: nothing to rescale on that side
        acc = FVec(0.f);
        if (ms != kNegInf) zs = zs * FVec(std::exp((ms - nms) * invt));
      } else {
        const float dt = (nmt - mt) * invt;
        const float ds = ms == kNegInf ? 0.f : (nms - ms) * invt;
        const FVec ft(std::exp(-dt));
        acc = ft * (acc + zt * FVec(ds - dt));
        zt = zt * ft;
        if (ms != kNegInf) zs = zs * FVec(std::exp(-ds));
      }
      ms = nms, mt = nmt;
    }
    block_ms[blk] = ms, block_mt[blk] = mt;
    // Where a side has only -inf so far, its exponentials are 0 whatever the reference.
    const float rs = ms == kNegInf ? 0.f : ms, rt = mt == kNegInf ? 0.f : mt;
    const FVec vms(rs), vmt(rt), vit(invt);
    const T* sb = s + b0;
    const T* tb = t + b0;
    int64_t i = 0;
    for (; i + K <= bn; i += K) {
      prefetch_k(sb + i + kBlock);
      prefetch_k(tb + i + kBlock);
      sums_k(sb + i, tb + i, vms, vmt, vit, zs, zt, acc, es_out ? es_out + b0 + i : nullptr,
             es_out ? et_out + b0 + i : nullptr);
    }
    for (; i < bn; ++i) {  // only the row's last block has a tail (kBlock is a multiple of K)
      float a = (static_cast<float>(sb[i]) - rs) * invt, b = (static_cast<float>(tb[i]) - rt) * invt;
      float es = std::exp(a), et = std::exp(b);
      tzs += es, tzt += et, tacc += kl::term(et, a, b);
      if (es_out) es_out[b0 + i] = es, et_out[b0 + i] = et;
    }
  }
  auto sum = [](FVec& x, FVec& y) { return x + y; };
  RowStats r;
  r.zs = static_cast<double>(at::vec::vec_reduce_all<float>(sum, zs)) + tzs;
  r.zt = static_cast<double>(at::vec::vec_reduce_all<float>(sum, zt)) + tzt;
  r.a = static_cast<double>(at::vec::vec_reduce_all<float>(sum, acc)) + tacc;
  return r;
}

// Gradients of a row from the cached exponentials of row_online.
template <typename T>
void row_grads_cached(const T* s, const T* t, int64_t n, float ms, float mt, float invt, float coef,
                      double zs, double zt, float shift, const float* es_in, const float* et_in,
                      const float* block_ms, const float* block_mt, T* gs, T* gt) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr int64_t K = 2 * FVec::size();
  constexpr int64_t kWriteAhead = 2048 / sizeof(T);
  const FVec vms(ms), vmt(mt), vit(invt), vcoef(coef), vshift(shift);
  for (int64_t b0 = 0, blk = 0; b0 < n; b0 += kBlock, ++blk) {
    const int64_t bn = std::min(kBlock, n - b0);
    // This block's exponentials are relative to its own running maxima: one factor corrects them.
    const float cs = block_ms[blk] == kNegInf ? 0.f : static_cast<float>(std::exp((block_ms[blk] - ms) * invt) / zs);
    const float ct = block_mt[blk] == kNegInf ? 0.f : static_cast<float>(std::exp((block_mt[blk] - mt) * invt) / zt);
    const FVec vcs(cs), vct(ct);
    const float* eb = es_in + b0;
    const float* tb = et_in + b0;
    int64_t i = 0;
    for (; i + K <= bn; i += K) {
      const FVec et0 = FVec::loadu(tb + i), et1 = FVec::loadu(tb + i + FVec::size());
      if (gs) {  // coef * (e_s cs - e_t ct), coef last: kd_loss's gradient is exactly T^2 times the KL's
        prefetch_k<1>(gs + b0 + i + kWriteAhead);
        const FVec es0 = FVec::loadu(eb + i), es1 = FVec::loadu(eb + i + FVec::size());
        store2(gs + b0 + i, vcoef * at::vec::fmsub(es0, vcs, et0 * vct),
               vcoef * at::vec::fmsub(es1, vcs, et1 * vct));
      }
      if (gt) {
        const FVec pt0 = et0 * vct, pt1 = et1 * vct;
        FVec a0, a1, b0v, b1v;
        scaled(s + b0 + i, t + b0 + i, vms, vmt, vit, a0, a1, b0v, b1v);
        FVec g0 = FVec::blendv(FVec(0.f), vcoef * pt0 * ((b0v - a0) - vshift), pt0 > FVec(0.f));
        FVec g1 = FVec::blendv(FVec(0.f), vcoef * pt1 * ((b1v - a1) - vshift), pt1 > FVec(0.f));
        store2(gt + b0 + i, g0, g1);
      }
    }
    for (; i < bn; ++i) {
      const int64_t j = b0 + i;
      float pt = et_in[j] * ct, ps = es_in[j] * cs;
      if (gs) gs[j] = static_cast<T>(coef * (ps - pt));
      if (gt) {
        float a = (static_cast<float>(s[j]) - ms) * invt, b = (static_cast<float>(t[j]) - mt) * invt;
        gt[j] = static_cast<T>(pt > 0.f ? coef * pt * ((b - a) - shift) : 0.f);
      }
    }
  }
}

struct GradCoef {
  float coef, inv_zs, inv_zt, shift;
};

template <typename T>
void row_grads(const T* s, const T* t, int64_t n, float ms, float mt, float invt, const GradCoef& g,
               const float* es_in, const float* et_in, T* gs, T* gt) {
  constexpr int64_t K = 2 * FVec::size();
  const FVec vms(ms), vmt(mt), vit(invt), coef(g.coef), izs(g.inv_zs), izt(g.inv_zt), shift(g.shift);
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    FVec a0, a1, b0, b1, es0, es1, et0, et1;
    if (es_in && !gt) {  // the student gradient alone needs no inputs, only the cached exponentials
      es0 = FVec::loadu(es_in + i), es1 = FVec::loadu(es_in + i + FVec::size());
      et0 = FVec::loadu(et_in + i), et1 = FVec::loadu(et_in + i + FVec::size());
    } else {
      scaled(s + i, t + i, vms, vmt, vit, a0, a1, b0, b1);
      if (es_in) {
        es0 = FVec::loadu(es_in + i), es1 = FVec::loadu(es_in + i + FVec::size());
        et0 = FVec::loadu(et_in + i), et1 = FVec::loadu(et_in + i + FVec::size());
      } else {
        es0 = exp_nonpos(a0), es1 = exp_nonpos(a1), et0 = exp_nonpos(b0), et1 = exp_nonpos(b1);
      }
    }
    if (gs) {
      store2(gs + i, coef * (es0 * izs - et0 * izt), coef * (es1 * izs - et1 * izt));
    }
    if (gt) {
      FVec pt0 = et0 * izt, pt1 = et1 * izt;
      FVec g0 = FVec::blendv(FVec(0.f), coef * pt0 * ((b0 - a0) - shift), et0 > FVec(0.f));
      FVec g1 = FVec::blendv(FVec(0.f), coef * pt1 * ((b1 - a1) - shift), et1 > FVec(0.f));
      store2(gt + i, g0, g1);
    }
  }
  for (; i < n; ++i) {
    float a = (static_cast<float>(s[i]) - ms) * invt, b = (static_cast<float>(t[i]) - mt) * invt;
    float es = es_in ? es_in[i] : std::exp(a), et = et_in ? et_in[i] : std::exp(b);
    if (gs) gs[i] = static_cast<T>(kl::grad_student(g.coef, es, g.inv_zs, et, g.inv_zt));
    if (gt) gt[i] = static_cast<T>(kl::grad_teacher(g.coef, et, g.inv_zt, a, b, g.shift));
  }
}

// ---- double: plain loops (the float64 path exists for checking, not for speed) ----

void row_max(const double* s, const double* t, int64_t n, double& ms, double& mt) {
  for (int64_t i = 0; i < n; ++i) {
    ms = (s[i] > ms || std::isnan(s[i])) ? s[i] : ms;
    mt = (t[i] > mt || std::isnan(t[i])) ? t[i] : mt;
  }
}

RowStats row_stats(const double* s, const double* t, int64_t n, double ms, double mt, double invt,
                   double*, double*) {
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
               double coef, double izs, double izt, double shift, double* gs, double* gt) {
  for (int64_t i = 0; i < n; ++i) {
    double a = (s[i] - ms) * invt, b = (t[i] - mt) * invt, es = std::exp(a), et = std::exp(b);
    if (gs) gs[i] = kl::grad_student(coef, es, izs, et, izt);
    if (gt) gt[i] = kl::grad_teacher(coef, et, izt, a, b, shift);
  }
}

// ---- driver ----

template <typename T>
struct Acc { using type = float; };
template <>
struct Acc<double> { using type = double; };

template <typename T>
void finish_row(T* gs, T* gt, int64_t V, bool skip) {
  if (skip) {
    if (gs) std::fill(gs, gs + V, T(0));
    if (gt) std::fill(gt, gt + V, T(0));
  }
}

template <typename T>
void softmax_kl_typed(const SoftmaxKLArgs& p) {
  using acc_t = typename Acc<T>::type;
  const T* S = static_cast<const T*>(p.student);
  const T* Tt = static_cast<const T*>(p.teacher);
  const acc_t* W = static_cast<const acc_t*>(p.row_weight);
  acc_t* KL = static_cast<acc_t*>(p.kl_rows);
  T* GS = static_cast<T*>(p.grad_student);
  T* GT = static_cast<T*>(p.grad_teacher);
  const int64_t R = p.rows, V = p.vocab;
  const acc_t invt = static_cast<acc_t>(p.inv_temperature);
  const bool want_grad = GS || GT;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  auto grad_coef = [&](acc_t w, const RowStats& st) {
    acc_t zs = static_cast<acc_t>(st.zs), zt = static_cast<acc_t>(st.zt);
    return std::make_tuple(w * invt, acc_t(1) / zs, acc_t(1) / zt, static_cast<acc_t>(st.a) / zt);
  };

  // The row path keeps per-block maxima on the stack: rows beyond 2^20 elements take the split path.
  const bool split = (R < 16 && V >= 2 * kSplitChunk) || V > (int64_t(1) << 20);
  const int64_t nchunk = split ? (V + kSplitChunk - 1) / kSplitChunk : 1;
  if (nchunk == 1) {
    at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
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
          finish_row(gs, gt, V, true);
          continue;
        }
        if constexpr (std::is_same<T, double>::value) {
          acc_t ms = kNegInf, mt = kNegInf;
          row_max(s, t, V, ms, mt);
          RowStats st = row_stats(s, t, V, ms, mt, invt, nullptr, nullptr);
          KL[r] = kl::row_value(st.zs, st.zt, st.a);
          if (want_grad) {
            auto [c, izs, izt, shift] = grad_coef(w, st);
            row_grads(s, t, V, ms, mt, invt, c, izs, izt, shift, gs, gt);
          }
        } else {
          float bms[(1 << 20) / kBlock];
          float bmt[(1 << 20) / kBlock];
          float* es = want_grad ? scratch.data() : nullptr;
          float* et = want_grad ? scratch.data() + V : nullptr;
          float fms, fmt;
          RowStats st = row_online(s, t, V, invt, es, et, bms, bmt, fms, fmt);
          KL[r] = static_cast<float>(kl::row_value(st.zs, st.zt, st.a));
          if (want_grad) {
            auto [c, izs, izt, shift] = grad_coef(w, st);
            (void)izs, (void)izt;
            row_grads_cached(s, t, V, fms, fmt, invt, c, st.zs, st.zt, shift, es, et, bms, bmt, gs, gt);
          }
        }
      }
    });
    return;
  }

  // Split path: tasks are (row, chunk) pairs.
  const int64_t ntask = R * nchunk;
  std::vector<acc_t> cms(ntask, kNegInf), cmt(ntask, kNegInf);
  std::vector<RowStats> cst(ntask);
  auto chunk_of = [&](int64_t task, int64_t& r, int64_t& b, int64_t& n) {
    r = task / nchunk;
    b = (task % nchunk) * kSplitChunk;
    n = std::min(kSplitChunk, V - b);
  };
  at::parallel_for(0, ntask, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      int64_t r, b, n;
      chunk_of(k, r, b, n);
      if (W[r] == acc_t(0)) continue;
      row_max(S + r * p.student_row_stride + b, Tt + r * p.teacher_row_stride + b, n, cms[k], cmt[k]);
    }
  });
  std::vector<acc_t> ms(R, kNegInf), mt(R, kNegInf);
  for (int64_t k = 0; k < ntask; ++k) {
    int64_t r = k / nchunk;
    ms[r] = (cms[k] > ms[r] || std::isnan(cms[k])) ? cms[k] : ms[r];
    mt[r] = (cmt[k] > mt[r] || std::isnan(cmt[k])) ? cmt[k] : mt[r];
  }
  at::parallel_for(0, ntask, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      int64_t r, b, n;
      chunk_of(k, r, b, n);
      if (W[r] == acc_t(0)) continue;
      cst[k] = row_stats(S + r * p.student_row_stride + b, Tt + r * p.teacher_row_stride + b, n,
                         ms[r], mt[r], invt, static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr));
    }
  });
  std::vector<RowStats> st(R);
  for (int64_t k = 0; k < ntask; ++k) {
    RowStats& d = st[k / nchunk];
    d.zs += cst[k].zs, d.zt += cst[k].zt, d.a += cst[k].a;
  }
  for (int64_t r = 0; r < R; ++r) {
    KL[r] = W[r] == acc_t(0) ? acc_t(0) : static_cast<acc_t>(kl::row_value(st[r].zs, st[r].zt, st[r].a));
  }
  if (!want_grad) return;
  at::parallel_for(0, ntask, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      int64_t r, b, n;
      chunk_of(k, r, b, n);
      T* gs = GS ? GS + r * V + b : nullptr;
      T* gt = GT ? GT + r * V + b : nullptr;
      if (W[r] == acc_t(0)) {
        finish_row(gs, gt, n, true);
        continue;
      }
      const T* s = S + r * p.student_row_stride + b;
      const T* t = Tt + r * p.teacher_row_stride + b;
      auto [c, izs, izt, shift] = grad_coef(W[r], st[r]);
      if constexpr (std::is_same<T, double>::value) {
        row_grads(s, t, n, ms[r], mt[r], invt, c, izs, izt, shift, gs, gt);
      } else {
        row_grads(s, t, n, ms[r], mt[r], invt, GradCoef{c, izs, izt, shift}, nullptr, nullptr, gs, gt);
      }
    }
  });
}

}  // namespace

void softmax_kl(const SoftmaxKLArgs& p) {
  switch (p.dtype) {
    case DType::Float: return softmax_kl_typed<float>(p);
    case DType::Double: return softmax_kl_typed<double>(p);
    case DType::Half: return softmax_kl_typed<c10::Half>(p);
    case DType::BFloat16: return softmax_kl_typed<c10::BFloat16>(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast
