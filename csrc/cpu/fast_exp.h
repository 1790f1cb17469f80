#pragma once
// exp(x / h) for x <= 0 (softmax arguments relative to their maximum, in the kernel's units: h a
// power of two, see common/softmax_kl.h), NaN propagating. The scale is an argument made by
// exp_scale(1 / h).
// On AVX-512, 2^n * p(f) with n = round(x log2(e) / h), f = x log2(e) / h - n taken by one
// vreduceps, p a degree-5 minimax polynomial and one vscalefps (10 uops; 1 / h rides on the first
// multiply), with a relative error of 2.1e-7 in float32 arithmetic (checked against float64 in the
// tests); 0 below exp(-87) ~ 1.6e-38. On AVX2 the same polynomial with 2^n from integer exponent
// arithmetic (1 / h folded likewise). Elsewhere ATen's exp_u20 of x / h (one multiply more).
#include <ATen/cpu/vec/vec.h>

namespace kdfast {
namespace cpu {
inline namespace CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// 2^f on [-0.5, 0.5]: minimax for relative error (Remez, 7.5e-8 in exact arithmetic), highest
// degree first, for both vector builds.
constexpr float kExp2Poly[6] = {1.3276472454890609e-3f, 9.6755409613251686e-3f, 5.5507130920886993e-2f,
                                2.4022120237350464e-1f, 6.9314694404602051e-1f, 1.0000001192092896f};
#endif

// The scale argument of exp_nonpos for arguments in units of h, given inv_h = 1 / h.
inline at::vec::Vectorized<float> exp_scale(float inv_h) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return at::vec::Vectorized<float>(1.44269504088896341f * inv_h);  // log2(e) / h, exact: a power of two
#else
  return at::vec::Vectorized<float>(inv_h);
#endif
}

inline at::vec::Vectorized<float> exp_nonpos(const at::vec::Vectorized<float>& x,
                                             const at::vec::Vectorized<float>& scale) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 t = _mm512_mul_ps(x, scale);  // x log2(e) / h
  // Lanes below -87 log2(e) (-inf included) give 0 without being computed: exp there is below
  // float's smallest normal, and producing a subnormal costs a microcode assist of ~100 cycles a
  // vector (masked vocabularies and padded row tails hit it on every element). NaN lanes stay live.
  const __mmask16 live = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-87.f * 1.44269504088896341f), _CMP_NLT_UQ);
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // t - round(t)
  const __m512 n = _mm512_sub_ps(t, f);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
  return _mm512_maskz_scalef_ps(live, p, n);
#elif defined(CPU_CAPABILITY_AVX2)
  // The same 2^n p(f), with 2^n built in the exponent field: n >= -127 after the clamp (a NaN lane
  // clamps too, as in ATen's exp_u20: the AVX2 build carries NaN through the row maximum), and the
  // biased exponent 0 of n = -127 gives 0.
  const __m256 t = _mm256_max_ps(_mm256_mul_ps(x, scale), _mm256_set1_ps(-127.f));  // x log2(e) / h
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
#else
  return (x * scale).exp_u20();
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast
