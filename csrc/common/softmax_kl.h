#pragma once
// Per-row and per-element math of the temperature softmax-KL, shared by the CPU and CUDA kernels.
//
// With a = (s - max s) / T and b = (t - max t) / T, e_s = exp(a), e_t = exp(b), Z = sum of e,
// and A = sum over v of e_t * (b - a):
//   KL(p_t || p_s) = A / Z_t - log Z_t + log Z_s
//   dKL/ds = (p_s - p_t) / T
//   dKL/dt = p_t * ((b - a) - A / Z_t) / T
// so a row needs two exponentials per element and no temporaries of the row's size.
//
// Units. The kernels hold a, b and A multiplied by h = 2^-k (k from scale_exponent): finite fp32
// logits can lie up to 2 FLT_MAX apart, so s - max s can overflow, and A sums up to V such terms,
// so it can overflow where KL ~ A / Z_t (a p_t-weighted mean of b - a) is finite. A scaled
// argument is formed as fma(s, h, -max s * h) * (1 / T): both products are exact (h is a power of
// two) and the result cannot overflow. Scaling by a power of two commutes with rounding, so in
// range the results are bit for bit those of natural units; the exponentials take 1 / h back
// (folded into their first multiply), and so do the KL and the teacher gradient's coefficient.
#include <cmath>
#include <cstdint>

#include "common/exact.h"
#include "common/macros.h"

namespace kdfast {
namespace kl {

// The k of h = 2^-k for rows of V elements at inv_t = 1 / T: with |b - a| <= 2 FLT_MAX h inv_t
// log2(e) (CUDA works in base 2) and Z_t <= V, 2^k >= 8 V max(inv_t, 1) log2(e) keeps A, and the
// online rescale's intermediates, below FLT_MAX / 2. Capped so that h and m h stay normal floats
// for ordinary logits; the cap binds only for 1 / T above ~1e21 at V = 2^20, where A may overflow
// again.
constexpr int kMaxScaleExponent = 96;
inline int scale_exponent(int64_t V, double inv_t) {
  const double need = 8.0 * static_cast<double>(V > 1 ? V : 1) * (inv_t > 1.0 ? inv_t : 1.0) * 1.4426950408889634;
  int k = 1;
  while (k < kMaxScaleExponent && std::ldexp(1.0, k) < need) ++k;
  return k;
}

using kdfast::mul_rn;  // (common/exact.h)

// (x - m) / T in the kernel's units: x h - m h is exact in both products, so it rounds once (fused or
// not) and cannot overflow; neg_mh = -m h. (CUDA passes inv_t * log2(e) for inv_t.)
template <typename acc_t>
KDFAST_HD acc_t arg(acc_t x, acc_t h, acc_t neg_mh, acc_t inv_t) {
  return (x * h + neg_mh) * inv_t;
}

// e_t * (b - a), where a term with p_t = 0 is 0 even when a or b is -inf. (Tested as e_t != 0,
// not e_t > 0: a NaN e_t must reach the result, not be taken for a zero.)
template <typename acc_t>
KDFAST_HD acc_t term(acc_t et, acc_t a, acc_t b) {
  return et != acc_t(0) ? et * (b - a) : acc_t(0);
}

// a_sum in natural units (A / h, in double where A may be near FLT_MAX). Never below 0: rounding
// leaves rows of nearly equal softmaxes at -1e-7 (a bf16 student against an fp32 teacher); NaN stays.
template <typename acc_t>
KDFAST_HD acc_t row_value(acc_t zs, acc_t zt, acc_t a_sum) {
  using std::log;
  const acc_t v = a_sum / zt - log(zt) + log(zs);
  return v < acc_t(0) ? acc_t(0) : v;
}

// coef * (p_s - p_t), with each product rounded alike: exactly 0 where p_s = p_t by construction
// (V = 1, or a student row equal to the teacher's).
template <typename acc_t>
KDFAST_HD acc_t grad_student(acc_t coef, acc_t es, acc_t inv_zs, acc_t et, acc_t inv_zt) {
  return coef * (mul_rn(es, inv_zs) - mul_rn(et, inv_zt));
}

// a, b and shift = A / Z_t in the kernel's units (coef then carries 1 / h); A / Z_t = KL + log Z_t
// - log Z_s in natural units. A NaN coef (a row whose KL is NaN, see nan_row) makes
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
