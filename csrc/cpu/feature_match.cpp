// Feature matching on the CPU: squared error or cosine distance per row, forward and gradients in
// one call (math in csrc/common/feature_match.h).
//
// Squared error needs nothing but the row's weight to write its gradient, so inputs are read once
// and the gradients written in the same pass. Cosine reads the row once for <s, t>, |s|^2 and |t|^2
// and writes the gradients in a second pass that hits cache (feature rows are short). Rows longer
// than kChunk are cut into chunks so that every core works on a few huge rows; per-chunk sums are
// combined in chunk order, so results do not depend on the thread count. Sums run in float vector
// lanes over blocks of kBlock elements and are carried across blocks in double: accurate for long
// rows at the cost of one horizontal add per block.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/feature_match.h"
#include "common/tuning.h"
#include "cpu/kernels.h"
#include "cpu/vec_io.h"

namespace kdfast {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = tuning::kFeatureSplitChunk;  // elements per task when rows are split
constexpr int64_t kBlock = 1024;     // elements summed in vector lanes before a double carry
// Large squared-error gradients are written with non-temporal stores (vec_io.h streams_output).
// (Not cosine gradients, which measured slower with them: a fence per short row drains the
// write-combining buffers.)

template <typename A>
double lane_sum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& x, Vectorized<A>& y) { return x + y; }, v);
}

// Sum of (s - t)^2 over n elements; with gs / gt, also writes c (s - t) and -c (s - t), times
// post as a scale_rows_ pass after them would, with non-temporal stores when `stream` (large
// gradients) and the slice allows them.
template <typename T>
double sq_error_slice(const T* s, const T* t, int64_t n, acc_of<T> c, acc_of<T> post, T* gs, T* gt, bool stream) {
  using A = acc_of<T>;
  using V = Vectorized<A>;
  constexpr int64_t K = 2 * V::size();
  const V vc(c), vnc(-c), vpost(post);
  const bool scaled_out = post != A(1);
  stream = can_stream(stream, gs, gt);
  double total = 0;
  int64_t i = 0;
  while (i + K <= n) {
    const int64_t end = i + std::min(kBlock, n - i);
    V a0(A(0)), a1(A(0));
    for (; i + K <= end; i += K) {
      V s0, s1, t0, t1;
      load2(s + i, s0, s1);
      load2(t + i, t0, t1);
      const V d0 = s0 - t0, d1 = s1 - t1;
      a0 = at::vec::fmadd(d0, d0, a0);
      a1 = at::vec::fmadd(d1, d1, a1);
      if (gs) store2_scaled<T>(gs + i, d0 * vc, d1 * vc, scaled_out, vpost, stream);
      if (gt) store2_scaled<T>(gt + i, d0 * vnc, d1 * vnc, scaled_out, vpost, stream);
    }
    total += lane_sum(a0 + a1);
  }
  if (stream) stream_fence();
  for (; i < n; ++i) {
    const A d = static_cast<A>(s[i]) - static_cast<A>(t[i]);
    total += static_cast<double>(d * d);
    if (gs) gs[i] = scale_as_stored<T>(c * d, post);
    if (gt) gt[i] = scale_as_stored<T>(-c * d, post);
  }
  return total;
}

struct Dots {
  double st = 0, ss = 0, tt = 0;
  double ms = 1, mt = 1;  // the sums are over s / ms and t / mt
  void add(const Dots& o) { st += o.st, ss += o.ss, tt += o.tt; }
  bool finite() const { return std::isfinite(st) && std::isfinite(ss) && std::isfinite(tt); }
};

// The sums in double over the inputs divided by their largest magnitudes: for rows whose plain sums
// overflow (float lanes beyond |x| ~ 1e19, double beyond ~ 1e154), where F.cosine_similarity's norms
// overflow too and it returns a cosine of 0 or 1 whatever the angle. Rare: a slow scalar pass.
template <typename T>
Dots dots_scaled(const T* s, const T* t, int64_t n) {
  Dots d;
  d.ms = d.mt = 0;
  for (int64_t i = 0; i < n; ++i) {
    d.ms = std::max(d.ms, std::abs(static_cast<double>(s[i])));
    d.mt = std::max(d.mt, std::abs(static_cast<double>(t[i])));
  }
  // zero, inf or nan: nothing to rescale (the sums carry inf and nan as they are)
  if (!(d.ms > 0 && std::isfinite(d.ms))) d.ms = 1;
  if (!(d.mt > 0 && std::isfinite(d.mt))) d.mt = 1;
  const double is = 1 / d.ms, it = 1 / d.mt;
  for (int64_t i = 0; i < n; ++i) {
    const double a = static_cast<double>(s[i]) * is, b = static_cast<double>(t[i]) * it;
    d.st += a * b, d.ss += a * a, d.tt += b * b;
  }
  return d;
}

// <s, t>, |s|^2 and |t|^2 over n elements.
template <typename T>
Dots dots_slice(const T* s, const T* t, int64_t n) {
  using A = acc_of<T>;
  using V = Vectorized<A>;
  constexpr int64_t K = 2 * V::size();
  Dots d;
  int64_t i = 0;
  while (i + K <= n) {
    const int64_t end = i + std::min(kBlock, n - i);
    V st(A(0)), ss(A(0)), tt(A(0));
    for (; i + K <= end; i += K) {
      V s0, s1, t0, t1;
      load2(s + i, s0, s1);
      load2(t + i, t0, t1);
      st = at::vec::fmadd(s0, t0, at::vec::fmadd(s1, t1, st));
      ss = at::vec::fmadd(s0, s0, at::vec::fmadd(s1, s1, ss));
      tt = at::vec::fmadd(t0, t0, at::vec::fmadd(t1, t1, tt));
    }
    d.st += lane_sum(st), d.ss += lane_sum(ss), d.tt += lane_sum(tt);
  }
  for (; i < n; ++i) {
    const A a = static_cast<A>(s[i]), b = static_cast<A>(t[i]);
    d.st += static_cast<double>(a * b), d.ss += static_cast<double>(a * a), d.tt += static_cast<double>(b * b);
  }
  return d;
}

// The gradients of a cosine row (feature::cosine_grad) over n elements.
template <typename T>
void cosine_grad_slice(const T* s, const T* t, int64_t n, const feature::CosineRow<acc_of<T>>& k, acc_of<T> post,
                       T* gs, T* gt) {
  using A = acc_of<T>;
  using V = Vectorized<A>;
  constexpr int64_t K = 2 * V::size();
  const V ss(k.s.scale), cs(k.s.cross), es(k.s.self), st(k.t.scale), ct(k.t.cross), et(k.t.self), vpost(post);
  const bool scaled_out = post != A(1);
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    V s0, s1, t0, t1;
    load2(s + i, s0, s1);
    load2(t + i, t0, t1);
    if (gs) {
      store2_scaled<T>(gs + i, ss * at::vec::fmadd(cs, t0, es * s0), ss * at::vec::fmadd(cs, t1, es * s1),
                       scaled_out, vpost);
    }
    if (gt) {
      store2_scaled<T>(gt + i, st * at::vec::fmadd(ct, s0, et * t0), st * at::vec::fmadd(ct, s1, et * t1),
                       scaled_out, vpost);
    }
  }
  for (; i < n; ++i) {
    const A a = static_cast<A>(s[i]), b = static_cast<A>(t[i]);
    if (gs) gs[i] = scale_as_stored<T>(feature::cosine_grad(k.s, a, b), post);
    if (gt) gt[i] = scale_as_stored<T>(feature::cosine_grad(k.t, b, a), post);
  }
}

template <typename T>
feature::CosineRow<acc_of<T>> cosine_coef(const Dots& d, double eps, acc_of<T> w, int64_t dim) {
  using A = acc_of<T>;
  const auto k = feature::cosine_row<double>(d.st, d.ss, d.tt, d.ms, d.mt, eps, static_cast<double>(w), dim);
  return {static_cast<A>(k.loss), feature::side_as<A>(k.s), feature::side_as<A>(k.t)};
}

template <typename T>
void feature_typed(const FeatureArgs& p) {
  using A = acc_of<T>;
  const T* S = static_cast<const T*>(p.student);
  const T* Tt = static_cast<const T*>(p.teacher);
  const A* W = static_cast<const A*>(p.row_weight);
  A* L = static_cast<A*>(p.loss_rows);
  T* GS = static_cast<T*>(p.grad_student);
  T* GT = static_cast<T*>(p.grad_teacher);
  const int64_t R = p.rows, D = p.cols;
  const bool want_grad = GS || GT;
  const bool stream = streams_output(R * D, sizeof(T));
  const A post = static_cast<A>(p.grad_scale);

  // One (row, chunk) slice: its student and teacher pointers, gradient pointers and length.
  struct Slice {
    const T *s, *t;
    T *gs, *gt;
    int64_t n;
  };
  const int64_t nchunk = std::max<int64_t>(1, (D + kChunk - 1) / kChunk);
  auto slice = [&](int64_t r, int64_t c) {
    const int64_t b = c * kChunk;
    return Slice{S + r * p.student_row_stride + b, Tt + r * p.teacher_row_stride + b, GS ? GS + r * D + b : nullptr,
                 GT ? GT + r * D + b : nullptr, std::min(kChunk, D - b)};
  };

  if (nchunk == 1) {  // whole rows per task; a cosine row is still in cache for its gradient pass
    at::parallel_for(0, R, rows_per_task(D, tuning::kFeatureRowGrain), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const Slice x = slice(r, 0);
        if (W[r] == A(0)) {
          L[r] = A(0);
          zero_grad_row(x.gs, x.n, post), zero_grad_row(x.gt, x.n, post);
        } else if (!p.cosine) {
          L[r] = static_cast<A>(sq_error_slice(x.s, x.t, x.n, A(2) * W[r], post, x.gs, x.gt, stream));
        } else {
          Dots d = dots_slice(x.s, x.t, x.n);
          if (!d.finite()) d = dots_scaled(x.s, x.t, x.n);
          const auto k = cosine_coef<T>(d, p.eps, W[r], D);
          L[r] = k.loss;
          if (want_grad) cosine_grad_slice(x.s, x.t, x.n, k, post, x.gs, x.gt);
        }
      }
    });
    return;
  }

  // Split rows: partial sums per (row, chunk), combined per row in chunk order.
  const int64_t ntask = R * nchunk;
  std::vector<Dots> part(ntask);
  at::parallel_for(0, ntask, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r = k / nchunk;
      const Slice x = slice(r, k % nchunk);
      if (W[r] == A(0)) {
        if (!p.cosine) zero_grad_row(x.gs, x.n, post), zero_grad_row(x.gt, x.n, post);
      } else if (!p.cosine) {
        part[k].ss = sq_error_slice(x.s, x.t, x.n, A(2) * W[r], post, x.gs, x.gt, stream);
      } else {
        part[k] = dots_slice(x.s, x.t, x.n);
      }
    }
  });
  std::vector<feature::CosineRow<A>> coef(p.cosine ? R : 0);
  for (int64_t r = 0; r < R; ++r) {
    Dots d;
    for (int64_t c = 0; c < nchunk; ++c) d.add(part[r * nchunk + c]);
    if (W[r] == A(0)) {
      L[r] = A(0);
    } else if (!p.cosine) {
      L[r] = static_cast<A>(d.ss);
    } else {
      if (!d.finite()) d = dots_scaled(S + r * p.student_row_stride, Tt + r * p.teacher_row_stride, D);
      coef[r] = cosine_coef<T>(d, p.eps, W[r], D);
      L[r] = coef[r].loss;
    }
  }
  if (!p.cosine || !want_grad) return;
  at::parallel_for(0, ntask, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r = k / nchunk;
      const Slice x = slice(r, k % nchunk);
      if (W[r] == A(0)) {
        zero_grad_row(x.gs, x.n, post), zero_grad_row(x.gt, x.n, post);
      } else {
        cosine_grad_slice(x.s, x.t, x.n, coef[r], post, x.gs, x.gt);
      }
    }
  });
}

}  // namespace

void feature_match(const FeatureArgs& p) {
  switch (p.dtype) {
    case DType::Float: return feature_typed<float>(p);
    case DType::Double: return feature_typed<double>(p);
    case DType::Half: return feature_typed<c10::Half>(p);
    case DType::BFloat16: return feature_typed<c10::BFloat16>(p);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast
