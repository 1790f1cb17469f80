#pragma once
// Per-element math of the divergences of the softmax-KL op other than KL (JSD, skew KL, TVD),
// shared by the CPU and CUDA kernels. (KL itself keeps its one-pass form, common/softmax_kl.h; the
// reverse forms are the forward ones with student and teacher swapped, done by the op's glue.)
//
// With P = softmax(t / T) (teacher) and Q = softmax(s / T) (student) per row, each divergence is
// a sum over the row of a term f(P_v, Q_v). Through the softmaxes its gradients are
//   dD/ds_j = cq / T * Q_j (u_j - sum_v Q_v u_v),   cq u = df/dQ
//   dD/dt_j = cp / T * P_j (w_j - sum_v P_v w_v),   cp w = df/dP
// (constants added to u or w cancel). So a row needs its maxima and softmax sums (KL's first
// pass), one pass for F = sum f, SU = sum Q u and SW = sum P w, and one for the gradients:
//
//   JSD(beta), M = beta P + (1 - beta) Q: f = beta P log(P/M) + (1 - beta) Q log(Q/M)
//     u = log(Q/M), cq = 1 - beta;  w = log(P/M), cp = beta
//     (the other terms of df/dQ cancel, as beta P/M + (1 - beta) Q/M = 1)
//   skew KL(alpha) = KL(P || M), M = alpha P + (1 - alpha) Q, r = P/M: f = P log r
//     u = r - 1, cq = -(1 - alpha);  w = log r + alpha (1 - r), cp = 1
//     (written to vanish at r = 1, so that P = Q, and alpha = 1, give gradients of exactly 0)
//   TVD: f = |P - Q| / 2, sigma = sign(P - Q): u = sigma, cq = -1/2;  w = sigma, cp = 1/2
//
// Numerics. The mixture is formed from probabilities, not log-probabilities, and the log taken is
// of the ratio P/M, so near P = Q it is accurate to a few ulps of 1 rather than of log P. A
// side with probability 0 adds nothing, also where its log would be -inf (u or w is set to 0
// there; the gradient's factor Q_j or P_j is 0 anyway). The ratios are clamped at their exact
// bounds (log(Q/M) <= log(1 / (1 - beta)), P/M <= 1 / beta, r <= 1 / alpha), which also covers a mixture
// that underflowed to 0 beside a positive probability. Every JSD term is >= 0 (x log x is convex)
// and the row value is clamped at 0 (row_value), so rounding never gives a negative divergence.
// NaN propagates: the tests are != 0 and the clamp keeps a NaN.
#include <cmath>

#include "common/args.h"
#include "common/macros.h"

namespace kdfast {
namespace div {

using kernel::Divergence;

// The constants the terms read, as scalars (acc_t) or broadcast to vectors (the CPU's X).
template <typename X>
struct Consts {
  X m, one_m;      // mix (beta or alpha) and 1 - mix
  X max_p;         // JSD: 1 / beta, the bound of P/M; skew: 1 / alpha
  X log_max_q;     // JSD: log(1 / (1 - beta)), the bound of log(Q/M)
};

// The per-call constants of a divergence (acc_t: float or double), with the gradient factors.
template <typename acc_t>
struct Params : Consts<acc_t> {
  acc_t cq, cp;  // the gradient factors of u and w
};

template <typename acc_t>
inline Params<acc_t> params(Divergence d, double mix) {
  Params<acc_t> p{};
  p.m = static_cast<acc_t>(mix);
  p.one_m = static_cast<acc_t>(1.0 - mix);
  switch (d) {
    case Divergence::JSD:
      p.max_p = static_cast<acc_t>(1.0 / mix);
      p.log_max_q = static_cast<acc_t>(-std::log1p(-mix));
      p.cq = p.one_m, p.cp = p.m;
      break;
    case Divergence::SkewKL:
      p.max_p = static_cast<acc_t>(1.0 / mix);
      p.cq = -p.one_m, p.cp = 1;
      break;
    default:  // TVD
      p.cq = static_cast<acc_t>(-0.5), p.cp = static_cast<acc_t>(0.5);
      break;
  }
  return p;
}

// The scalar operations the terms need; the CPU's vector build supplies its own with the same
// names (csrc/cpu/softmax_kl.cpp), so one definition of each term serves both.
template <typename X>
struct ScalarOps {
  static KDFAST_HD X log(X x) {
    using std::log;
    return log(x);
  }
  static KDFAST_HD X abs(X x) {
    using std::fabs;
    return fabs(x);
  }
  // c != 0 ? x : 0 (a NaN c keeps x)
  static KDFAST_HD X if_nonzero(X c, X x) { return c != X(0) ? x : X(0); }
  // min(x, hi), keeping a NaN x
  static KDFAST_HD X clamp_hi(X x, X hi) { return x > hi ? hi : x; }
  // sign(x) in {-1, 0, 1}; NaN for NaN
  static KDFAST_HD X sign(X x) { return x != x ? x : X((x > X(0)) - (x < X(0))); }
};

// f, u and w of one element (or one vector of elements) from P, Q and lpq = log(P/Q), the
// difference of the scaled logits plus log Z_s - log Z_t (JSD reads it: log(Q/M) = log(P/M) - lpq
// takes one log per element instead of two; where P underflowed to 0 beside a finite lpq the
// clamp at log(1 / (1 - beta)) gives the limit, M = (1 - beta) Q). X is the scalar or vector type.
template <Divergence D, typename Ops, typename X>
KDFAST_HD void terms(X p, X q, X lpq, const Consts<X>& k, X& f, X& u, X& w) {
  if constexpr (D == Divergence::JSD) {
    const X mix = k.m * p + k.one_m * q;
    const X lp = Ops::if_nonzero(p, Ops::log(Ops::clamp_hi(p / mix, k.max_p)));
    const X lq = Ops::if_nonzero(q, Ops::clamp_hi(lp - lpq, k.log_max_q));
    f = k.m * (p * lp) + k.one_m * (q * lq);
    u = lq, w = lp;
  } else if constexpr (D == Divergence::SkewKL) {
    const X mix = k.m * p + k.one_m * q;
    const X r = Ops::if_nonzero(p, Ops::clamp_hi(p / mix, k.max_p));
    const X lr = Ops::if_nonzero(p, Ops::log(r));
    f = p * lr;
    u = r - X(1), w = lr + k.m * (X(1) - r);
  } else {  // TVD
    const X d = p - q;
    f = X(0.5) * Ops::abs(d);
    u = Ops::sign(d), w = u;
  }
}

// The row's divergence from its sums, never below 0 (a NaN stays NaN).
template <typename acc_t>
KDFAST_HD acc_t row_value(acc_t f_sum) {
  return f_sum < acc_t(0) ? acc_t(0) : f_sum;
}

// One side's gradient element: coef * prob * (u - sum), 0 where prob is 0 (u may be a clamp's
// stand-in there).
template <typename Ops, typename X>
KDFAST_HD X grad(const X& coef, X prob, X u, const X& sum) {
  return Ops::if_nonzero(prob, coef * (prob * (u - sum)));
}

}  // namespace div
}  // namespace kdfast
