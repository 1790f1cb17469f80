#pragma once
// Per-row and per-element math of the temperature softmax-KL, shared by the CPU and CUDA kernels.
//
// With a = (s - max s) / T and b = (t - max t) / T, e_s = exp(a), e_t = exp(b), Z = sum of e,
// and A = sum over v of e_t * (b - a):
//   KL(p_t || p_s) = A / Z_t - log Z_t + log Z_s
//   dKL/ds = (p_s - p_t) / T
//   dKL/dt = p_t * ((b - a) - A / Z_t) / T
// so a row needs two exponentials per element and no temporaries of the row's size.
#include <cmath>

#include "common/macros.h"

namespace kdfast {
namespace kl {

// e_t * (b - a), where a term with p_t = 0 is 0 even when a or b is -inf. (Tested as e_t != 0,
// not e_t > 0: a NaN e_t must reach the result, not be taken for a zero.)
template <typename acc_t>
KDFAST_HD acc_t term(acc_t et, acc_t a, acc_t b) {
  return et != acc_t(0) ? et * (b - a) : acc_t(0);
}

template <typename acc_t>
KDFAST_HD acc_t row_value(acc_t zs, acc_t zt, acc_t a_sum) {
  using std::log;
  return a_sum / zt - log(zt) + log(zs);
}

template <typename acc_t>
KDFAST_HD acc_t grad_student(acc_t coef, acc_t es, acc_t inv_zs, acc_t et, acc_t inv_zt) {
  return coef * (es * inv_zs - et * inv_zt);
}

// shift = A / Z_t = KL + log Z_t - log Z_s. A NaN coef (a row whose KL is NaN, see nan_row) makes
// every element NaN, those with p_t = 0 included.
template <typename acc_t>
KDFAST_HD acc_t grad_teacher(acc_t coef, acc_t et, acc_t inv_zt, acc_t a, acc_t b, acc_t shift) {
  return (et != acc_t(0) || coef != coef) ? coef * (et * inv_zt) * ((b - a) - shift) : acc_t(0);
}

// Whether a row's KL is NaN (a NaN logit, or a teacher row without mass): its gradients are then NaN
// throughout, on both sides, as the reference gives them.
template <typename acc_t>
KDFAST_HD bool nan_row(acc_t zs, acc_t zt, acc_t a_sum) {
  const acc_t v = row_value(zs, zt, a_sum);
  return v != v;
}

}  // namespace kl
}  // namespace kdfast
