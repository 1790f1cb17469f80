#pragma once
// Relational KD math shared by the CPU and CUDA kernels. Everything is expressed through the Gram
// matrix G = Xc Xc^T of centred points Xc (the caller centres: distances and angles do not move when
// all points move together, and centring keeps G's cancellation small):
//   D2_ij = G_ii + G_jj - 2 G_ij                       (squared distance)
//   <x_j - x_i, x_k - x_i> = G_jk - G_ij - G_ik + G_ii  (numerator of the angle at vertex i)
#include <cmath>

#include "common/macros.h"

namespace kdfast {
namespace rkd {

// Squared distance from the Gram matrix. A value inside the rounding noise of the Gram formula
// (relative to the two squared norms) is a duplicate point: exactly 0, as the direct difference
// torchdistill takes would give.
template <typename acc_t>
KDFAST_HD acc_t sq_dist(acc_t gii, acc_t gjj, acc_t gij, acc_t noise) {
  acc_t d2 = gii + gjj - acc_t(2) * gij;
  return d2 <= noise * (gii + gjj) ? acc_t(0) : d2;
}

// Relative rounding noise of a Gram-matrix squared distance, per accumulation type.
template <typename acc_t>
KDFAST_HD acc_t gram_noise();
template <>
KDFAST_HD float gram_noise<float>() { return 64.f * 1.1920929e-7f; }
template <>
KDFAST_HD double gram_noise<double>() { return 64.0 * 2.220446049250313e-16; }

// 1 / max(|x_j - x_i|, eps) as F.normalize divides, and 0 for a zero-length side, so that every
// triplet with such a side has cosine 0.
template <typename acc_t>
KDFAST_HD acc_t inv_side(acc_t d2, acc_t eps) {
  using std::sqrt;
  if (d2 <= acc_t(0)) return acc_t(0);
  acc_t n = sqrt(d2);
  return acc_t(1) / (n > eps ? n : eps);
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
