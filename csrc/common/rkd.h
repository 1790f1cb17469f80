#pragma once
// Relational KD math shared by the CPU and CUDA kernels.
//
// Everything is expressed through the exact squared distances D2_ij = |x_i - x_j|^2, summed from
// the differences in double (not from a Gram matrix, whose cancellation error eps |x|^2 swamps
// the short sides of a point set with one far point). The angle numerator comes from them by the
// law of cosines, <x_j - x_i, x_k - x_i> = H_jk - H_ik - H_ij with H = -D2 / 2, and the
// gradients go back to the points as dL/dD2 (see grad_points in ops/rkd_common.h).
//
// The angle loop runs in the accumulation type (float for float inputs). H_ik and H_jk can be far
// larger than their difference (k far from i and j), so H is held as hi + lo: hi a multiple of a
// per-group quantum q with |hi| <= 2^21 q, so that the sum of three hi values is exact in float,
// and lo = H - hi (|lo| <= q / 2) in float. The numerator (hi sum) + (lo sum) is then as accurate
// as the inputs' float rounding allows, whatever the ratio of the far and near distances.
//
// The caller scales each group by a power of 2 (exact) so that its largest centred coordinate
// lies in [0.5, 1): any finite input then has finite D2, and the eps clamps are scaled with it.
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/exact.h"
#include "common/macros.h"

namespace kdfast {
namespace rkd {

// The quantum q of the hi parts for a group whose largest |H| is max_h: q = 2^(e - 21) with
// max_h < 2^e, so |hi| / q <= 2^21 and three of them sum exactly in float (24-bit significand).
KDFAST_HD double h_quantum(double max_h) {
  using std::frexp;
  using std::ldexp;
  int e = 0;
  frexp(max_h, &e);  // max_h = m 2^e, m in [0.5, 1); e = 0 for max_h = 0
  return ldexp(1.0, e - 21);
}

// A squared-distance ratio (largest over smallest positive, per group) beyond which the angle
// term's numerators need D2's low parts: the law of cosines H_jk - H_ik - H_ij subtracts squared
// sides of size far^2 to get a number of size near * far, so D2's own rounding (eps_64 far^2) costs a
// cosine eps_64 x ratio, which its gradient's 1 / near^2 terms amplify to eps_64 x ratio^2 of one
// point's share. Below it (a distance ratio of 1e3) that is under 1e-10; with the low parts, a
// cosine carries ~eps_64 x 2^-21 x ratio. The same groups take the product back to points from
// differences (ops/rkd.h), whose Gram form would cost eps_64 |W| |x|, again ~ratio^2.
constexpr double kLowPartsSpan = 1e6;

// The range of a group's squared sides, fed one entry at a time (or merged from parts).
struct D2Span {
  double mx = 0, mn = std::numeric_limits<double>::infinity();  // the largest entry, the smallest positive one
  bool finite = true;
  KDFAST_HD void add(double v) {
    finite = finite && v - v == 0;  // false for inf and NaN
    if (v > mx) mx = v;
    if (v > 0 && v < mn) mn = v;
  }
  KDFAST_HD void merge(const D2Span& o) {
    finite = finite && o.finite;
    if (o.mx > mx) mx = o.mx;
    if (o.mn < mn) mn = o.mn;
  }
  // Whether the group needs the low parts: a NaN or inf point keeps the plain form's NaN semantics,
  // and a group without a positive side has nothing to span.
  KDFAST_HD bool wide() const { return finite && mx > kLowPartsSpan * mn; }
};

// D2's low part of one pair, |x_i - x_j|^2 - d2, with the left side exact to double-double (each
// difference and square with its rounding error, summed with TwoSum) from the points as given
// (their differences are exact where centred coordinates are not); d2 is the rounded sum of the
// same squares in any order, so s - d2 is exact (Sterbenz).
KDFAST_HD double d2_low_part(const double* xi, const double* xj, int64_t dim, double d2) {
  using std::fma;
  double s = 0, l = 0;
  for (int64_t k = 0; k < dim; ++k) {
    const double d = xi[k] - xj[k];
    const double bb = d - xi[k];
    const double ed = (xi[k] - (d - bb)) - (xj[k] + bb);  // xi - xj = d + ed exactly
    const double p = mul_rn(d, d);
    two_sum_add(s, l, p);
    l += fma(d, d, -p) + 2.0 * d * ed;  // d^2 - p, and the cross term of (d + ed)^2
  }
  return (s - d2) + l;
}

// H = -d2 / 2 split into hi (a multiple of q, exact in acc_t) and lo = H - hi rounded to acc_t.
// d2_lo: D2's own low part (0 where it was not taken), so that hi + lo is -D2 / 2 as exact as the
// inputs' differences.
template <typename acc_t>
KDFAST_HD void split_h(double d2, double q, acc_t& hi, acc_t& lo, double d2_lo = 0.0) {
  using std::nearbyint;
  const double h = -0.5 * d2;
  const double r = nearbyint(h / q) * q;
  hi = static_cast<acc_t>(r);
  lo = static_cast<acc_t>((h - r) - 0.5 * d2_lo);
}

// 1 / max(|x_j - x_i|, eps) as F.normalize divides, and 0 for a zero-length side, so that every
// triplet with such a side has cosine 0 (and no gradient). NaN for a NaN or infinite side (only a
// NaN or inf point gives one: the points are scaled into [-1, 1)), so that its cosines and their
// gradients are NaN, as float64's unit vector inf / inf is.
KDFAST_HD double inv_side(double d2, double eps) {
  using std::sqrt;
  if (d2 <= 0.0) return 0.0;
  if (!(d2 <= std::numeric_limits<double>::max())) return std::numeric_limits<double>::quiet_NaN();
  const double n = sqrt(d2);
  return 1.0 / (n < eps ? eps : n);
}

// Whether a side's length is above its eps clamp (below it, the side is a constant eps and
// carries no gradient; at it, a kink, either side's gradient is right: this is torch 2.14's
// clamp, 2.13's passes it). A NaN side is not clamped: its NaN reaches the gradient.
KDFAST_HD bool side_unclamped(double d2, double eps) {
  using std::sqrt;
  return !(d2 <= 0.0) && !(sqrt(d2) <= eps);
}

// d loss / d D2 of one off-diagonal distance entry max(D2, eps2) (or its square root) whose
// upstream gradient is gd: 0 where clamped (at or below eps2), unless gd is NaN (float64's clamp passes NaN * 0);
// NaN where D2 is NaN or inf (only from a NaN or inf point: no gradient there could look fine;
// float64's is NaN or inf in the point's coordinates) or where psi is undefined (a group with no
// positive distance: 0 / 0).
KDFAST_HD double pdist_grad_d2(double d2, double dist, double gd, double eps2, bool squared, bool undefined) {
  if (undefined || gd != gd || !(d2 <= std::numeric_limits<double>::max()))
    return std::numeric_limits<double>::quiet_NaN();
  if (!(d2 > eps2)) return 0.0;
  return squared ? gd : gd / (2 * dist);
}

template <typename acc_t>
KDFAST_HD acc_t huber(acc_t x, acc_t delta) {
  acc_t a = x < acc_t(0) ? -x : x;
  return a <= delta ? acc_t(0.5) * x * x : delta * (a - acc_t(0.5) * delta);
}

template <typename acc_t>
KDFAST_HD acc_t huber_grad(acc_t x, acc_t delta) {
  return x > delta ? delta : (x < -delta ? -delta : x);
}

}  // namespace rkd
}  // namespace kdfast
