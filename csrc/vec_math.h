// Vector exp for the fp32 kernels that need one (softmax in attention.cpp, SiLU and GELU in
// activations.cpp): Cephes' expf, i.e. exp(x) = 2^n * exp(r) with n = round(x / ln 2) and
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

}  // namespace vec_math
}  // namespace xcompile
#endif
