// Relational KD kernels on the CPU, one group (n points) at a time, from the exact squared
// distances D2 of its points (see csrc/common/rkd.h).
//
// Angle (n^3 triplets, O(n^2) memory): with c_ijk the cosine at vertex i, numerator
// H_jk - H_ik - H_ij (H = -D2 / 2), and h_ijk = coef * Huber' of (c_s - c_t), the gradient needs
// only n x n sums, because c_ijk = c_ikj:
//   A_jk = sum_i gN_ijk,  R_ij = sum_k gN_ijk,  S_ij = sum_k h_ijk c_ijk,   gN_ijk = h_ijk / (n_ij n_ik)
//   dL/dD2 = R - A / 2 (through the numerator) - S / D2 (through the side lengths n_ab)
// The triplet loop runs in parallel over j: every sum above is then owned by one thread, so the
// result does not depend on the thread count and needs no per-thread n x n buffers.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/rkd.h"
#include "cpu/kernels.h"

namespace kdfast {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Rows per task for the n x n passes: about 64k entries, so small groups run on one thread
// instead of paying a parallel region's start and barrier (which, on a busy machine, can cost
// more than the work).
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(16, (int64_t(1) << 16) / std::max<int64_t>(n, 1)); }

// |x_i - x_j|^2 for rows i0..i0+3 against rows j0..j0+3 (each row read once per 4 pairs), into out.
template <int64_t T>
void sq_dist_tile(const double* x, int64_t dim, int64_t i0, int64_t j0, double (&out)[T][T]) {
  using V = Vectorized<double>;
  constexpr int64_t W = V::size();
  V acc[T][T];
  for (int64_t a = 0; a < T; ++a)
    for (int64_t b = 0; b < T; ++b) acc[a][b] = V(0.0);
  int64_t k = 0;
  auto step = [&](int64_t m) {
    V xi[T], xj[T];
    for (int64_t a = 0; a < T; ++a) {
      xi[a] = m == W ? V::loadu(x + (i0 + a) * dim + k) : V::loadu(x + (i0 + a) * dim + k, m);
      xj[a] = m == W ? V::loadu(x + (j0 + a) * dim + k) : V::loadu(x + (j0 + a) * dim + k, m);
    }
    for (int64_t a = 0; a < T; ++a)
      for (int64_t b = 0; b < T; ++b) {
        const V d = xi[a] - xj[b];
        acc[a][b] = at::vec::fmadd(d, d, acc[a][b]);
      }
  };
  for (; k + W <= dim; k += W) step(W);
  if (k < dim) step(dim - k);
  // lane sums through memory: ATen's horizontal reduction goes through the stack anyway
  double lanes[T][T][W];
  for (int64_t a = 0; a < T; ++a)
    for (int64_t b = 0; b < T; ++b) acc[a][b].store(lanes[a][b]);
  for (int64_t a = 0; a < T; ++a)
    for (int64_t b = 0; b < T; ++b) {
      double s = 0;
      for (int64_t l = 0; l < W; ++l) s += lanes[a][b][l];
      out[a][b] = s;
    }
}

// D2 over 4 x 4 tiles of the upper triangle; the lower one is its mirror (the same bits:
// (a - b)^2 = (b - a)^2). Rows past n (in the last tile) repeat row n - 1 and are not stored.
void sq_dists_impl(const SqDistArgs& p) {
  constexpr int64_t T = 4;
  const double* x = p.points;
  double* D = p.d2;
  const int64_t n = p.n, dim = p.dim, nt = (n + T - 1) / T;
  const int64_t tiles = nt * (nt + 1) / 2;
  // the last tile's missing rows read from a copy padded with its last row
  std::vector<double> pad;
  const double* xp = x;
  if (n % T != 0) {
    pad.resize(nt * T * dim);
    std::copy(x, x + n * dim, pad.begin());
    for (int64_t r = n; r < nt * T; ++r) std::copy(x + (n - 1) * dim, x + n * dim, pad.begin() + r * dim);
    xp = pad.data();
  }
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(T * T * dim, 1));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    int64_t I = 0, rem = t0;  // tile t0 -> (I, J) with J >= I, row by row
    while (rem >= nt - I) rem -= nt - I, ++I;
    int64_t J = I + rem;
    for (int64_t t = t0; t < t1; ++t) {
      double v[T][T];
      sq_dist_tile<T>(xp, dim, I * T, J * T, v);
      for (int64_t a = 0; a < T; ++a)
        for (int64_t b = 0; b < T; ++b) {
          const int64_t i = I * T + a, j = J * T + b;
          if (i >= n || j >= n) continue;
          const double d = i == j ? 0.0 : v[a][b];
          D[i * n + j] = d, D[j * n + i] = d;
        }
      if (++J == nt) ++I, J = I;
    }
  });
}

void pdist_impl(PdistArgs& p) {
  const double* D2 = p.d2;
  double* D = p.dist;
  const int64_t n = p.n;
  const double eps = p.eps;
  std::vector<double> rsum(n);
  std::vector<int64_t> rcnt(n);
  at::parallel_for(0, n, row_grain(n), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double s = 0;
      int64_t c = 0;
      for (int64_t j = 0; j < n; ++j) {
        double d = 0;
        if (j != i) {
          double v = D2[i * n + j];
          v = v < eps ? eps : v;  // clamp(min=eps) as torchdistill's pdist; NaN stays NaN
          d = p.squared ? v : std::sqrt(v);
        }
        D[i * n + j] = d;
        if (!(d <= 0)) s += d, ++c;  // a NaN distance makes the mean NaN, as torch's sum
      }
      rsum[i] = s, rcnt[i] = c;
    }
  });
  p.pos_sum = 0, p.pos_count = 0;
  for (int64_t i = 0; i < n; ++i) p.pos_sum += rsum[i], p.pos_count += rcnt[i];
}

void pdist_backward_impl(const PdistBackwardArgs& p) {
  const double* D2 = p.d2;
  const double* D = p.dist;
  const double* gout = p.grad_out;
  double* M = p.grad_d2;
  const int64_t n = p.n;
  // psi = d / mean(positive d): d psi_kl / d d_ab = [kl = ab] / mean - [d_ab > 0] psi_kl / (mean cnt)
  double k = 0;
  if (p.normalize) {
    double acc = 0;
    for (int64_t i = 0; i < n * n; ++i) acc += gout[i] * D[i];
    // one mean at a time: a group scaled far down (huge points, eps clamp) has a mean whose square underflows
    k = acc / p.mean / (p.mean * static_cast<double>(p.pos_count));
  }
  const double inv_mean = p.normalize ? 1.0 / p.mean : 1.0;
  // psi is undefined where the mean is NaN (no positive distance: 0 / 0; or a NaN distance): NaN
  // values, and NaN gradients for all the group's points (not gradients that look fine)
  const bool undefined = p.normalize && std::isnan(p.mean);
  at::parallel_for(0, n, row_grain(n), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t ij = i * n + j;
        const double gd = gout[ij] * inv_mean - (D[ij] > 0 ? k : 0.0);
        if (j != i) M[ij] += rkd::pdist_grad_d2(D2[ij], D[ij], gd, p.eps, p.squared, undefined);
      }
    }
  });
}

void distance_huber_impl(DistanceHuberArgs& p) {
  const double* Ds = p.dist_s;
  const double* Dt = p.dist_t;
  double* gs = p.grad_psi_s;
  double* gt = p.grad_psi_t;
  const int64_t n = p.n;
  const double ims = p.inv_mean_s, imt = p.inv_mean_t, delta = p.delta, coef = p.coef;
  std::vector<double> part(n);
  at::parallel_for(0, n, row_grain(n), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double s = 0;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t ij = i * n + j;
        const double x = Ds[ij] * ims - Dt[ij] * imt;
        s += rkd::huber(x, delta);
        const double g = coef * rkd::huber_grad(x, delta);
        if (gs) gs[ij] = g;
        if (gt) gt[ij] = -g;
      }
      part[i] = s;
    }
  });
  p.loss = 0;
  for (int64_t i = 0; i < n; ++i) p.loss += part[i];
}

// Adds d loss / d D2 of the angle term from A, R, S of one side to M (see the top of the file).
template <typename acc_t>
void add_angle_grad(const double* D2, const acc_t* A, const acc_t* R, const acc_t* S, int64_t n, double eps,
                    double* M) {
  at::parallel_for(0, n, row_grain(n), [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      for (int64_t b = 0; b < n; ++b) {
        const int64_t ab = a * n + b;
        if (a == b) continue;  // D2_aa is no variable
        double g = static_cast<double>(R[ab]) - 0.5 * static_cast<double>(A[ab]);
        // n_ab = sqrt(D2_ab) where it is above eps: dL/dD2_ab = -S_ab / D2_ab (twice S / 2: the
        // side appears as n_ij and as n_ik, and the two sums are equal by symmetry).
        if (rkd::side_unclamped(D2[ab], eps)) g -= static_cast<double>(S[ab]) / D2[ab];
        M[ab] += g;
      }
    }
  });
}

// A group whose squared side lengths span at most this factor needs no lo parts: the float
// rounding of H then costs the cosines at most 1.5 * 4 float ulps, as the float Gram formulation did.
constexpr double kSplitSpan = 4;

// One side's n x n inputs of the angle loop: H = -D2 / 2 (as hi + lo when split) and the inverse
// side lengths.
template <typename acc_t>
struct AngleSide {
  std::unique_ptr<acc_t[]> hi, lo, inv;  // every entry written: no zero fill
  // X: null, or the points whose differences give D2's low parts (AngleArgs::x_s)
  AngleSide(const double* D2, const double* X, int64_t dim, int64_t n, double eps, double mx, bool split)
      : hi(new acc_t[n * n]), lo(split ? new acc_t[n * n] : nullptr), inv(new acc_t[n * n]) {
    const double q = rkd::h_quantum(0.5 * mx);
    at::parallel_for(0, n, row_grain(n), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t e = i * n; e < (i + 1) * n; ++e) {
          const double d2_lo = X ? rkd::d2_low_part(X + i * dim, X + (e - i * n) * dim, dim, D2[e]) : 0.0;
          if (split) rkd::split_h(D2[e], q, hi[e], lo[e], d2_lo);
          else hi[e] = static_cast<acc_t>(-0.5 * D2[e]);
          inv[e] = static_cast<acc_t>(rkd::inv_side(D2[e], eps));
        }
      }
    });
  }
};

template <typename acc_t>
void angle_typed(AngleArgs& p, bool split, double mx_s, double mx_t) {
  using V = Vectorized<acc_t>;
  const int64_t n = p.n;
  const acc_t delta = static_cast<acc_t>(p.delta);
  const acc_t coef = static_cast<acc_t>(p.coef);
  const bool want = p.grad_d2_s || p.grad_d2_t;

  const AngleSide<acc_t> ss(p.d2_s, p.x_s, p.dim_s, n, p.eps_s, mx_s, split);
  const AngleSide<acc_t> st(p.d2_t, p.x_t, p.dim_t, n, p.eps_t, mx_t, split);
  const acc_t *Hs = ss.hi.get(), *Ls = ss.lo.get(), *Ht = st.hi.get(), *Lt = st.lo.get();
  std::vector<acc_t> As, At, Rs, Rt, Ss, St;
  if (want) {
    for (auto* m : {&As, &At, &Rs, &Rt, &Ss, &St}) m->assign(n * n, acc_t(0));
  }
  std::vector<double> part(n, 0.0);
  const V vdelta(delta), vndelta(-delta), vhalf(acc_t(0.5)), vzero(acc_t(0));
  constexpr int64_t W = V::size();

  // A block of jb values of j shares each row i of H and 1/n while it is in L1; the block's own
  // rows (H_j and the A_j sums, both sides) stay in L2. Every block streams the i rows once, so
  // larger blocks mean less memory traffic: size them to about 512 KB of j rows.
  constexpr int64_t kMaxJB = 32;
  const int64_t jb = std::max<int64_t>(4, std::min<int64_t>(kMaxJB, (int64_t(512) << 10) / (6 * n * int64_t(sizeof(acc_t)))));
  auto run = [&](auto split_tag) {
  constexpr bool kLo = decltype(split_tag)::value;
  at::parallel_for(0, (n + jb - 1) / jb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t jb0 = blk * jb, jb1 = std::min(n, jb0 + jb);
      double lsum[kMaxJB] = {};
      for (int64_t i = 0; i < n; ++i) {
        const acc_t* hsi = Hs + i * n;
        const acc_t* lsi = kLo ? Ls + i * n : nullptr;
        const acc_t* hti = Ht + i * n;
        const acc_t* lti = kLo ? Lt + i * n : nullptr;
        const acc_t* isi = ss.inv.get() + i * n;
        const acc_t* iti = st.inv.get() + i * n;
        for (int64_t j = jb0; j < jb1; ++j) {
          const acc_t as = isi[j], at_ = iti[j];
          if (as == 0 && at_ == 0) continue;  // every cosine of this (i, j) is 0 on both sides
          const acc_t* hsj = Hs + j * n;
          const acc_t* lsj = kLo ? Ls + j * n : nullptr;
          const acc_t* htj = Ht + j * n;
          const acc_t* ltj = kLo ? Lt + j * n : nullptr;
          // numerator H_jk - H_ik - H_ij: the hi parts sum exactly, then the lo parts are added
          const V vbs(-hsi[j]), vbt(-hti[j]), vas(as), vat(at_);
          const V vls(kLo ? -lsi[j] : acc_t(0)), vlt(kLo ? -lti[j] : acc_t(0));
          V vloss(0), vr_s(0), vr_t(0), vs_s(0), vs_t(0);
          auto body = [&](const V& hj_s, const V& lj_s, const V& hi_s, const V& li_s, const V& in_s, const V& hj_t,
                          const V& lj_t, const V& hi_t, const V& li_t, const V& in_t, V& ga_s, V& ga_t) {
            V ws = vas * in_s, wt = vat * in_t;
            V cs, ct;
            if constexpr (kLo) {
              cs = ((hj_s - hi_s + vbs) + (lj_s - li_s + vls)) * ws;
              ct = ((hj_t - hi_t + vbt) + (lj_t - li_t + vlt)) * wt;
            } else {
              cs = (hj_s - hi_s + vbs) * ws;
              ct = (hj_t - hi_t + vbt) * wt;
            }
            V x = cs - ct;
            V ax = x.abs();
            // Huber_delta(x) = m (|x| - m / 2) with m = min(|x|, delta): no select, and a NaN
            // propagates through |x| (clamp_max and clamp return their NaN operand: 2 instructions
            // where the NaN-checking minimum / maximum take 6).
            V mm = at::vec::clamp_max(ax, vdelta);
            vloss = at::vec::fmadd(mm, at::vec::fnmadd(vhalf, mm, ax), vloss);
            if (want) {
              V h = at::vec::clamp(x, vndelta, vdelta) * V(coef);
              V gns = h * ws, gnt = vzero - h * wt;
              ga_s = gns, ga_t = gnt;
              vr_s = vr_s + gns, vr_t = vr_t + gnt;
              vs_s = vs_s + h * cs, vs_t = vs_t - h * ct;
            }
          };
          acc_t* asj = want ? As.data() + j * n : nullptr;
          acc_t* atj = want ? At.data() + j * n : nullptr;
          int64_t k = 0;
          for (; k + W <= n; k += W) {
            V ga_s, ga_t;
            auto lo = [&](const acc_t* ptr) { return kLo ? V::loadu(ptr + k) : V(acc_t(0)); };
            body(V::loadu(hsj + k), lo(lsj), V::loadu(hsi + k), lo(lsi), V::loadu(isi + k), V::loadu(htj + k), lo(ltj),
                 V::loadu(hti + k), lo(lti), V::loadu(iti + k), ga_s, ga_t);
            if (want) {
              (V::loadu(asj + k) + ga_s).store(asj + k);
              (V::loadu(atj + k) + ga_t).store(atj + k);
            }
          }
          if (k < n) {  // partial vector: padded lanes have weight 0 and contribute nothing
            const int64_t m = n - k;
            V ga_s, ga_t;
            auto lo = [&](const acc_t* ptr) { return kLo ? V::loadu(ptr + k, m) : V(acc_t(0)); };
            body(V::loadu(hsj + k, m), lo(lsj), V::loadu(hsi + k, m), lo(lsi), V::loadu(isi + k, m),
                 V::loadu(htj + k, m), lo(ltj), V::loadu(hti + k, m), lo(lti), V::loadu(iti + k, m), ga_s, ga_t);
            if (want) {
              (V::loadu(asj + k, m) + ga_s).store(asj + k, m);
              (V::loadu(atj + k, m) + ga_t).store(atj + k, m);
            }
          }
          auto sum = [](V& x, V& y) { return x + y; };
          lsum[j - jb0] += at::vec::vec_reduce_all<acc_t>(sum, vloss);
          if (want) {
            Rs[i * n + j] = at::vec::vec_reduce_all<acc_t>(sum, vr_s);
            Rt[i * n + j] = at::vec::vec_reduce_all<acc_t>(sum, vr_t);
            Ss[i * n + j] = at::vec::vec_reduce_all<acc_t>(sum, vs_s);
            St[i * n + j] = at::vec::vec_reduce_all<acc_t>(sum, vs_t);
          }
        }
      }
      for (int64_t j = jb0; j < jb1; ++j) part[j] = lsum[j - jb0];
    }
  });
  };
  if (split) run(std::true_type{});
  else run(std::false_type{});
  p.loss = 0;
  for (int64_t j = 0; j < n; ++j) p.loss += part[j];
  if (p.grad_d2_s) add_angle_grad(p.d2_s, As.data(), Rs.data(), Ss.data(), n, p.eps_s, p.grad_d2_s);
  if (p.grad_d2_t) add_angle_grad(p.d2_t, At.data(), Rt.data(), St.data(), n, p.eps_t, p.grad_d2_t);
}

}  // namespace

void sq_dists(const SqDistArgs& p) { sq_dists_impl(p); }
void pdist(PdistArgs& p) { pdist_impl(p); }
void pdist_backward(const PdistBackwardArgs& p) { pdist_backward_impl(p); }
void distance_huber(DistanceHuberArgs& p) { distance_huber_impl(p); }
void angle(AngleArgs& p) {
  rkd::D2Span ss, st;
  for (int64_t e = 0; e < p.n * p.n; ++e) ss.add(p.d2_s[e]), st.add(p.d2_t[e]);
  const double mx_s = ss.mx, mn_s = ss.mn, mx_t = st.mx, mn_t = st.mn;
  const bool split = !(mx_s <= kSplitSpan * mn_s && mx_t <= kSplitSpan * mn_t) && (mx_s > 0 || mx_t > 0);
  // The gradient's terms through D2 are of size h / n_ij each and cancel to h sin(theta) / n_ij
  // (exactly 0 for collinear points), so their rounding is amplified by the ratio of the long
  // sides to the short ones. Float holds that only for groups of similar side lengths; others
  // take their gradient in double (the value alone is accurate in float through hi + lo).
  const bool wide = split && (p.grad_d2_s || p.grad_d2_t);
  if (p.dtype == DType::Double || wide) angle_typed<double>(p, split, mx_s, mx_t);
  else angle_typed<float>(p, split, mx_s, mx_t);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast
