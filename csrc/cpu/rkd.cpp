// Relational KD kernels on the CPU, one group (n points) at a time, from Gram matrices.
//
// Angle (n^3 triplets, O(n^2) memory): with c_ijk the cosine at vertex i and h_ijk = coef * Huber'
// of (c_s - c_t), the gradient needs only n x n sums, because c_ijk = c_ikj:
//   A_jk = sum_i gN_ijk,  R_ij = sum_k gN_ijk,  S_ij = sum_k h_ijk c_ijk,   gN_ijk = h_ijk / (n_ij n_ik)
//   dL/dG = A - 2R + diag(rowsum R) + [terms of the side lengths n_ij through D2, from S]
// The triplet loop runs in parallel over j: every sum above is then owned by one thread, so the
// result does not depend on the thread count and needs no per-thread n x n buffers.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
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

template <typename acc_t>
acc_t side_sq(const acc_t* G, int64_t n, int64_t i, int64_t j) {
  if (i == j) return acc_t(0);
  return rkd::sq_dist(G[i * n + i], G[j * n + j], G[i * n + j], rkd::gram_noise<acc_t>());
}

// gG += d/dG of sum_ab M_ab * D2_ab, with D2_ab = G_aa + G_bb - 2 G_ab.
template <typename acc_t>
void add_sqdist_grad(const acc_t* M, int64_t n, acc_t* gG) {
  std::vector<acc_t> col(n, acc_t(0));
  for (int64_t a = 0; a < n; ++a)  // column sums in a fixed order
    for (int64_t b = 0; b < n; ++b) col[b] += M[a * n + b];
  at::parallel_for(0, n, row_grain(n), [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      acc_t row = 0;
      for (int64_t b = 0; b < n; ++b) {
        row += M[a * n + b];
        gG[a * n + b] -= acc_t(2) * M[a * n + b];
      }
      gG[a * n + a] += row + col[a];
    }
  });
}

template <typename acc_t>
void pdist_typed(PdistArgs& p) {
  const acc_t* G = static_cast<const acc_t*>(p.gram);
  acc_t* D = static_cast<acc_t*>(p.dist);
  const int64_t n = p.n;
  const acc_t eps = static_cast<acc_t>(p.eps);
  std::vector<double> rsum(n);
  std::vector<int64_t> rcnt(n);
  at::parallel_for(0, n, row_grain(n), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double s = 0;
      int64_t c = 0;
      for (int64_t j = 0; j < n; ++j) {
        acc_t d = 0;
        if (j != i) {
          acc_t v = side_sq(G, n, i, j);
          v = v < eps ? eps : v;  // clamp(min=eps) as torchdistill's pdist; NaN stays NaN
          d = p.squared ? v : std::sqrt(v);
        }
        D[i * n + j] = d;
        if (d > 0) s += d, ++c;
      }
      rsum[i] = s, rcnt[i] = c;
    }
  });
  p.pos_sum = 0, p.pos_count = 0;
  for (int64_t i = 0; i < n; ++i) p.pos_sum += rsum[i], p.pos_count += rcnt[i];
}

template <typename acc_t>
void pdist_backward_typed(const PdistBackwardArgs& p) {
  const acc_t* G = static_cast<const acc_t*>(p.gram);
  const acc_t* D = static_cast<const acc_t*>(p.dist);
  const acc_t* gout = static_cast<const acc_t*>(p.grad_out);
  acc_t* gG = static_cast<acc_t*>(p.grad_gram);
  const int64_t n = p.n;
  const acc_t eps = static_cast<acc_t>(p.eps);
  // psi = d / mean(positive d): d psi_kl / d d_ab = [kl = ab] / mean - [d_ab > 0] psi_kl / (mean cnt)
  acc_t k = 0;
  if (p.normalize) {
    double acc = 0;
    for (int64_t i = 0; i < n * n; ++i) acc += static_cast<double>(gout[i]) * D[i];
    k = static_cast<acc_t>(acc / (p.mean * p.mean * static_cast<double>(p.pos_count)));
  }
  const acc_t inv_mean = p.normalize ? static_cast<acc_t>(1.0 / p.mean) : acc_t(1);
  std::vector<acc_t> M(n * n);
  at::parallel_for(0, n, row_grain(n), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t ij = i * n + j;
        acc_t gd = gout[ij] * inv_mean - (D[ij] > 0 ? k : acc_t(0));
        acc_t v = side_sq(G, n, i, j);
        // Only unclamped off-diagonal entries depend on G.
        M[ij] = (j != i && v > eps) ? (p.squared ? gd : gd / (acc_t(2) * D[ij])) : acc_t(0);
      }
    }
  });
  add_sqdist_grad(M.data(), n, gG);
}

template <typename acc_t>
void distance_huber_typed(DistanceHuberArgs& p) {
  const acc_t* Ds = static_cast<const acc_t*>(p.dist_s);
  const acc_t* Dt = static_cast<const acc_t*>(p.dist_t);
  acc_t* gs = static_cast<acc_t*>(p.grad_psi_s);
  acc_t* gt = static_cast<acc_t*>(p.grad_psi_t);
  const int64_t n = p.n;
  const acc_t ims = p.inv_mean_s, imt = p.inv_mean_t, delta = p.delta, coef = p.coef;
  std::vector<double> part(n);
  at::parallel_for(0, n, row_grain(n), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double s = 0;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t ij = i * n + j;
        acc_t x = Ds[ij] * ims - Dt[ij] * imt;
        s += rkd::huber(x, delta);
        acc_t g = coef * rkd::huber_grad(x, delta);
        if (gs) gs[ij] = g;
        if (gt) gt[ij] = -g;
      }
      part[i] = s;
    }
  });
  p.loss = 0;
  for (int64_t i = 0; i < n; ++i) p.loss += part[i];
}

// Turns A, R, S of one side into dL/dG (written over A).
template <typename acc_t>
void compose_angle_grad(const acc_t* G, const acc_t* inv, acc_t* A, const acc_t* R, acc_t* S, int64_t n,
                        acc_t eps) {
  at::parallel_for(0, n, row_grain(n), [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      acc_t rrow = 0;
      for (int64_t b = 0; b < n; ++b) {
        const int64_t ab = a * n + b;
        rrow += R[ab];
        A[ab] -= acc_t(2) * R[ab];
        // n_ab = sqrt(D2_ab) where it is above eps: dL/dD2_ab = -S_ab (1/n_ab)^2 (twice S: the
        // side appears as n_ij and as n_ik, and the two sums are equal by symmetry).
        acc_t d2 = side_sq(G, n, a, b);
        S[ab] = (d2 > 0 && std::sqrt(d2) > eps) ? -S[ab] * inv[ab] * inv[ab] : acc_t(0);
      }
      A[a * n + a] += rrow;
    }
  });
  add_sqdist_grad(S, n, A);
}

template <typename acc_t>
void add_to(const std::vector<acc_t>& x, acc_t* out) {
  for (size_t i = 0; i < x.size(); ++i) out[i] += x[i];
}

template <typename acc_t>
void angle_typed(AngleArgs& p) {
  using V = Vectorized<acc_t>;
  const acc_t* Gs = static_cast<const acc_t*>(p.gram_s);
  const acc_t* Gt = static_cast<const acc_t*>(p.gram_t);
  const int64_t n = p.n;
  const acc_t eps = static_cast<acc_t>(p.eps), delta = static_cast<acc_t>(p.delta);
  const acc_t coef = static_cast<acc_t>(p.coef);
  const bool want = p.grad_gram_s || p.grad_gram_t;

  std::vector<acc_t> inv_s(n * n), inv_t(n * n);
  at::parallel_for(0, n, row_grain(n), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = 0; j < n; ++j) {
        inv_s[i * n + j] = rkd::inv_side(side_sq(Gs, n, i, j), eps);
        inv_t[i * n + j] = rkd::inv_side(side_sq(Gt, n, i, j), eps);
      }
  });
  std::vector<acc_t> As, At, Rs, Rt, Ss, St;
  if (want) {
    for (auto* m : {&As, &At, &Rs, &Rt, &Ss, &St}) m->assign(n * n, acc_t(0));
  }
  std::vector<double> part(n, 0.0);
  const V vdelta(delta), vndelta(-delta), vhalf(acc_t(0.5)), vzero(acc_t(0));
  constexpr int64_t W = V::size();

  // A block of jb values of j shares each row i of G and 1/n while it is in L1; the block's own
  // rows (G_j and the A_j sums, both sides) stay in L2. Every block streams the i rows once, so
  // larger blocks mean less memory traffic: size them to about 512 KB of j rows.
  constexpr int64_t kMaxJB = 32;
  const int64_t jb = std::max<int64_t>(4, std::min<int64_t>(kMaxJB, (int64_t(512) << 10) / (4 * n * int64_t(sizeof(acc_t)))));
  at::parallel_for(0, (n + jb - 1) / jb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t jb0 = blk * jb, jb1 = std::min(n, jb0 + jb);
      double lsum[kMaxJB] = {};
      for (int64_t i = 0; i < n; ++i) {
        const acc_t* gsi = Gs + i * n;
        const acc_t* gti = Gt + i * n;
        const acc_t* isi = inv_s.data() + i * n;
        const acc_t* iti = inv_t.data() + i * n;
        for (int64_t j = jb0; j < jb1; ++j) {
          const acc_t as = isi[j], at_ = iti[j];
          if (as == 0 && at_ == 0) continue;  // every cosine of this (i, j) is 0 on both sides
          const acc_t* gsj = Gs + j * n;
          const acc_t* gtj = Gt + j * n;
          const V vbs(gsi[i] - gsi[j]), vbt(gti[i] - gti[j]), vas(as), vat(at_);
          V vloss(0), vr_s(0), vr_t(0), vs_s(0), vs_t(0);
          auto body = [&](const V& gj_s, const V& gi_s, const V& in_s, const V& gj_t, const V& gi_t,
                          const V& in_t, V& ga_s, V& ga_t) {
            V ws = vas * in_s, wt = vat * in_t;
            V cs = (gj_s - gi_s + vbs) * ws;
            V ct = (gj_t - gi_t + vbt) * wt;
            V x = cs - ct;
            V ax = x.abs();
            // Huber_delta(x) = m (|x| - m / 2) with m = min(|x|, delta): no select, and a NaN
            // propagates through |x| (clamp_max and clamp return their NaN operand: 2 instructions
            // where the NaN-checking minimum / maximum take 6). N^3 loop, N = 256: ~10% less time.
            V m = at::vec::clamp_max(ax, vdelta);
            vloss = at::vec::fmadd(m, at::vec::fnmadd(vhalf, m, ax), vloss);
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
            body(V::loadu(gsj + k), V::loadu(gsi + k), V::loadu(isi + k), V::loadu(gtj + k),
                 V::loadu(gti + k), V::loadu(iti + k), ga_s, ga_t);
            if (want) {
              (V::loadu(asj + k) + ga_s).store(asj + k);
              (V::loadu(atj + k) + ga_t).store(atj + k);
            }
          }
          if (k < n) {  // partial vector: padded lanes have weight 0 and contribute nothing
            const int64_t m = n - k;
            V ga_s, ga_t;
            body(V::loadu(gsj + k, m), V::loadu(gsi + k, m), V::loadu(isi + k, m), V::loadu(gtj + k, m),
                 V::loadu(gti + k, m), V::loadu(iti + k, m), ga_s, ga_t);
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
  p.loss = 0;
  for (int64_t j = 0; j < n; ++j) p.loss += part[j];
  if (p.grad_gram_s) {
    compose_angle_grad(Gs, inv_s.data(), As.data(), Rs.data(), Ss.data(), n, eps);
    add_to(As, static_cast<acc_t*>(p.grad_gram_s));
  }
  if (p.grad_gram_t) {
    compose_angle_grad(Gt, inv_t.data(), At.data(), Rt.data(), St.data(), n, eps);
    add_to(At, static_cast<acc_t*>(p.grad_gram_t));
  }
}

}  // namespace

void pdist(PdistArgs& p) {
  p.dtype == DType::Double ? pdist_typed<double>(p) : pdist_typed<float>(p);
}
void pdist_backward(const PdistBackwardArgs& p) {
  p.dtype == DType::Double ? pdist_backward_typed<double>(p) : pdist_backward_typed<float>(p);
}
void distance_huber(DistanceHuberArgs& p) {
  p.dtype == DType::Double ? distance_huber_typed<double>(p) : distance_huber_typed<float>(p);
}
void angle(AngleArgs& p) {
  p.dtype == DType::Double ? angle_typed<double>(p) : angle_typed<float>(p);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast
