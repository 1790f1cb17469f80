#pragma once
// Per-row math of the feature-matching losses, shared by the CPU and CUDA kernels.
//
// Squared error of a row: L = sum (s - t)^2, dL/ds = 2 (s - t) = -dL/dt.
// Cosine distance of a row, with n_s = max(|s|, eps), n_t = max(|t|, eps) (F.cosine_similarity's
// clamp) and c = <s, t> / (n_s n_t):
//   L = 1 - c,  dL/ds = (-t / n_t + c s / |s|) / n_s,  dL/dt = (-s / n_s + c t / |t|) / n_t.
// For a norm above eps, |s| = n_s and this is the exact derivative. At or below it, it is PyTorch's:
// F.cosine_similarity clamps the norms in place without recording it, so the norm's own gradient
// s / |s| still flows (and is 0 for a zero vector). A row needs one pass for <s, t>, |s|^2 and
// |t|^2 and one more to write the gradients.
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace kdfast {
namespace feature {

// A gradient row is scale * (cross * other + self * own): with these factors every one is a normal
// float32 for any norm between eps and ~1e19 (w / (n_s n_t) alone underflows for large norms).
template <typename acc_t>
struct CosineSide {
  acc_t scale, cross, self;
};

template <typename acc_t>
struct CosineRow {
  acc_t loss;  // 1 - c
  CosineSide<acc_t> s, t;
};

// The row's sums taken over s / m_s and t / m_t: dot = <s, t> / (m_s m_t), ss = |s|^2 / m_s^2,
// tt = |t|^2 / m_t^2, with m = 1 normally and the row's largest magnitude where the plain sums
// overflow. w = the row's gradient weight. dim = the row's length.
template <typename acc_t>
KDFAST_HD CosineRow<acc_t> cosine_row(acc_t dot, acc_t ss, acc_t tt, acc_t m_s, acc_t m_t, acc_t eps, acc_t w,
                                      int64_t dim) {
  using std::sqrt;
  const acc_t ls = m_s * sqrt(ss), lt = m_t * sqrt(tt);
  // Clamps and guards that let a NaN norm through: a NaN in a row makes its loss and every element
  // of both its gradients NaN (through scale on its own side, cross and self on the other).
  const acc_t ns = ls < eps ? eps : ls, nt = lt < eps ? eps : lt;
  // One norm at a time: the product of two large norms can overflow where c cannot.
  acc_t c = dot * (m_s / ns) * (m_t / nt);
  // In a one-element row, c depends on a side whose norm is unclamped only through its sign: that
  // side's gradient is 0 exactly (which the factors below miss by a rounding: s * fl(1 / |s|) is
  // not 1), and with both unclamped c is sign(s t) exactly.
  const bool flat_s = dim == 1 && ls >= eps && ls > acc_t(0) && ls - ls == acc_t(0);
  const bool flat_t = dim == 1 && lt >= eps && lt > acc_t(0) && lt - lt == acc_t(0);
  if (flat_s && flat_t) c = dot < acc_t(0) ? acc_t(-1) : acc_t(1);
  CosineRow<acc_t> r;
  r.loss = acc_t(1) - c;
  r.s = {w / ns, flat_s ? acc_t(0) : acc_t(-1) / nt, flat_s || ls == acc_t(0) ? acc_t(0) : c / ls};
  r.t = {w / nt, flat_t ? acc_t(0) : acc_t(-1) / ns, flat_t || lt == acc_t(0) ? acc_t(0) : c / lt};
  return r;
}

template <typename to_t, typename acc_t>
KDFAST_HD CosineSide<to_t> side_as(const CosineSide<acc_t>& x) {
  return {static_cast<to_t>(x.scale), static_cast<to_t>(x.cross), static_cast<to_t>(x.self)};
}

// The gradient element of one side from its own input and the other side's.
template <typename acc_t>
KDFAST_HD acc_t cosine_grad(const CosineSide<acc_t>& k, acc_t own, acc_t other) {
  return k.scale * (k.cross * other + k.self * own);
}

}  // namespace feature
}  // namespace kdfast
