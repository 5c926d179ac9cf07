// Vector exp for the fp32 kernels that need one (softmax in attention.cpp, SiLU and GELU in
// activations.cpp), and tanh built on it (attention's soft-cap): Cephes' expf, i.e. exp(x) = 2^n * exp(r) with n = round(x / ln 2) and
// r = x - n ln 2 (ln 2 split in two so r is exact), exp(r) a degree-7 polynomial on |r| <= ln2/2.
// A couple of ulp: SiLU built on it (one exp, one division) measures within 3 ulp of float64
// over |x| < 20 on both vector paths.
//
// Inputs are clamped to [ln 2^-126, ln 2^127] so that 2^n stays a normal float built by shifting n
// into the exponent field: exp underflows to 2^-126 (~1e-38) instead of 0 and overflows to ~1.7e38
// instead of inf. Every caller either subtracts a max first (softmax: the largest term is 1) or
// divides by 1 + exp (sigmoid), where that makes no difference in fp32. NaN propagates (the clamps
// take x as their second operand, which min/max return when either is NaN).
#pragma once

#include "dispatch.h"

#if XC_X86
#include <immintrin.h>

namespace xcompile {
namespace vec_math {

constexpr float kExpLo = -87.33654475f;  // ln 2^-126
constexpr float kExpHi = 88.02969193f;   // ln 2^127
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;  // exact in 9 bits: n * kLn2Hi is exact for |n| <= 127
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

XC_TARGET_AVX2 inline __m256 exp_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(kExpHi), _mm256_max_ps(_mm256_set1_ps(kExpLo), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
  const __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

XC_TARGET_AVX512 inline __m512 exp_avx512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(kExpHi), _mm512_max_ps(_mm512_set1_ps(kExpLo), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
  const __m512 y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  // scalef computes y * 2^n directly (AVX-512 F), no integer exponent arithmetic needed.
  return _mm512_scalef_ps(y, n);
}

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|), for |x| >= 1/8 (there 1 - e >= 0.22, so
// exp's couple of ulp cost a few ulp of tanh at most); below 1/8, where 1 - e would cancel, the
// odd series x - x^3/3 + 2x^5/15 - 17x^7/315 (the next term is < 2e-9 x). Large |x|: e clamps to
// 2^-126 and tanh is +-1. NaN propagates (through exp, and the < 1/8 test is false for it).
constexpr float kTanhSeries = 0.125f;
constexpr float kT3 = -1.0f / 3.0f, kT5 = 2.0f / 15.0f, kT7 = -17.0f / 315.0f;

XC_TARGET_AVX2 inline __m256 tanh_avx2(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
  const __m256 ax = _mm256_andnot_ps(sign, x);
  const __m256 e = exp_avx2(_mm256_mul_ps(ax, _mm256_set1_ps(-2.0f)));
  const __m256 far = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  const __m256 x2 = _mm256_mul_ps(ax, ax);
  __m256 p = _mm256_fmadd_ps(x2, _mm256_set1_ps(kT7), _mm256_set1_ps(kT5));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(kT3));
  const __m256 near = _mm256_fmadd_ps(_mm256_mul_ps(p, x2), ax, ax);
  const __m256 small = _mm256_cmp_ps(ax, _mm256_set1_ps(kTanhSeries), _CMP_LT_OQ);
  return _mm256_or_ps(_mm256_blendv_ps(far, near, small), _mm256_and_ps(sign, x));
}

XC_TARGET_AVX512 inline __m512 tanh_avx512(__m512 x) {
  const __m512i sign = _mm512_set1_epi32(int(0x80000000u));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 e = exp_avx512(_mm512_mul_ps(ax, _mm512_set1_ps(-2.0f)));
  const __m512 far = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  const __m512 x2 = _mm512_mul_ps(ax, ax);
  __m512 p = _mm512_fmadd_ps(x2, _mm512_set1_ps(kT7), _mm512_set1_ps(kT5));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(kT3));
  const __m512 near = _mm512_fmadd_ps(_mm512_mul_ps(p, x2), ax, ax);
  const __mmask16 small = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(kTanhSeries), _CMP_LT_OQ);
  const __m512i r = _mm512_castps_si512(_mm512_mask_blend_ps(small, far, near));
  return _mm512_castsi512_ps(
      _mm512_or_si512(r, _mm512_and_si512(_mm512_castps_si512(x), sign)));
}

}  // namespace vec_math
}  // namespace xcompile
#endif
