#pragma once
// exp(x) for x <= 0 (softmax arguments relative to their maximum), NaN propagating.
// On AVX-512, 2^n * p(f) with n = round(x log2 e), f = x log2 e - n taken by one vreduceps, p a
// degree-5 minimax polynomial and one vscalefps (10 uops), with a relative error of 2.1e-7 in
// float32 arithmetic (checked against float64 in the tests); 0 below exp(-87) ~ 1.6e-38.
// Elsewhere ATen's exp_u20.
#include <ATen/cpu/vec/vec.h>

namespace kdfast {
namespace cpu {
inline namespace CPU_CAPABILITY {

inline at::vec::Vectorized<float> exp_nonpos(const at::vec::Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = x;
  // Lanes below -87 (-inf included) give 0 without being computed: exp there is below float's
  // smallest normal, and producing a subnormal costs a microcode assist of ~100 cycles a vector
  // (masked vocabularies and padded row tails hit it on every element). NaN lanes stay live.
  const __mmask16 live = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-87.f), _CMP_NLT_UQ);
  const __m512 t = _mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f));  // x * log2(e)
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // t - round(t)
  const __m512 n = _mm512_sub_ps(t, f);
  // 2^f on [-0.5, 0.5]: minimax for relative error (Remez, 7.5e-8 in exact arithmetic).
  __m512 p = _mm512_set1_ps(1.3276472454890609e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6755409613251686e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507130920886993e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120237350464e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314694404602051e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_maskz_scalef_ps(live, p, n);
#else
  return x.exp_u20();
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast
