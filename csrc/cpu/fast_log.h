#pragma once
// log(x) for x >= 0 on float vectors (the divergence kernels take one per element, where ATen's
// Sleef log would cost most of a row's time): x = 2^e m with m in [0.75, 1.5), and
// log x = e log(2) + f g(f), f = m - 1, g a degree-8 polynomial fitted to log1p(f) / f on
// [-0.25, 0.5] (relative error 1.5e-7 in float32 arithmetic, checked against float64 in the
// tests). So log is accurate relative to its value near x = 1, where the divergences' log-ratios
// are small. 0 gives -inf, inf gives inf, NaN stays NaN; subnormals count as 0 (the kernels run
// with denormals flushed).
#include <ATen/cpu/vec/vec.h>

#include <limits>

namespace kdfast {
namespace cpu {
inline namespace CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// g(f), highest degree first.
constexpr float kLog1pPoly[9] = {5.4111819714e-02f, -1.2076728046e-01f, 1.4994499087e-01f,
                                 -1.6824311018e-01f, 1.9975912571e-01f, -2.4993218482e-01f,
                                 3.3333593607e-01f, -5.0000065565e-01f, 1.0000000000e+00f};
constexpr float kLn2 = 0.693147180559945309f;
#endif

inline at::vec::Vectorized<float> log_nonneg(const at::vec::Vectorized<float>& xv) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = xv;
  // getmant gives m in [0.75, 1.5); where m < 1 the value's exponent is getexp's + 1. getexp of 0
  // is -inf (log 0 = -inf), of inf inf; NaN passes through both.
  const __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
  const __m512 e0 = _mm512_getexp_ps(x);
  const __m512 e = _mm512_mask_add_ps(e0, _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.f), _CMP_LT_OQ), e0,
                                      _mm512_set1_ps(1.f));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.f));
  __m512 p = _mm512_set1_ps(kLog1pPoly[0]);
  for (int i = 1; i < 9; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kLog1pPoly[i]));
  return _mm512_fmadd_ps(e, _mm512_set1_ps(kLn2), _mm512_mul_ps(f, p));
#elif defined(CPU_CAPABILITY_AVX2)
  // The same split from the bits: m in [1, 2) halved where >= 1.5. 0, inf and NaN are patched at
  // the end (their exponent fields are 0 and 255).
  const __m256 x = xv;
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i mant = _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                       _mm256_set1_epi32(0x3f800000));
  __m256 m = _mm256_castsi256_ps(mant);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.5f), _CMP_GE_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_add_ps(e, _mm256_and_ps(big, _mm256_set1_ps(1.f)));
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.f));
  __m256 p = _mm256_set1_ps(kLog1pPoly[0]);
  for (int i = 1; i < 9; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kLog1pPoly[i]));
  __m256 r = _mm256_fmadd_ps(e, _mm256_set1_ps(kLn2), _mm256_mul_ps(f, p));
  const __m256 fmax = _mm256_set1_ps(std::numeric_limits<float>::max());
  r = _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, fmax, _CMP_NLE_UQ));  // inf, NaN: themselves
  r = _mm256_blendv_ps(r, _mm256_set1_ps(-std::numeric_limits<float>::infinity()),
                       _mm256_cmp_ps(x, _mm256_set1_ps(std::numeric_limits<float>::min()), _CMP_LT_OQ));
  return r;
#else
  return xv.log();
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast
