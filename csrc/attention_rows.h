// The row primitives of attention (csrc/attention.cpp), one set per ISA path, for a KV cache of
// fp32 or of bf16 (raw uint16 bits: fp32's top half, widened in registers, exactly):
//   scores:   s[j] = scale * q . k[j] for n keys (k: rows of d, contiguous; q fp32)
//   softmax:  s[j] = exp(s[j] - max(s)) in place; returns the sum, *max_out = max(s)
//   weighted: out[c] = (out[c] if accumulate else 0) + sum_j p[j] v[j, c], then times scale
//   softcap:  s[j] = cap * tanh(s[j] / cap) in place (Gemma 2's attention logit soft-cap)
// Included by attention.cpp only (the vector paths carry function target attributes).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "bf16.h"
#include "dispatch.h"
#include "vec_math.h"

#if XC_X86
#include <immintrin.h>
#endif

namespace xcompile {
namespace attention_rows {

using bf16 = uint16_t;

// ---- scalar: the plain path the others are held to (double sums) -----------------------------
inline float widen(float x) { return x; }
inline float widen(bf16 x) { return bf16_to_f32(x); }

template <typename T>
void scores_scalar(const float* q, const T* k, int64_t n, int64_t d, float scale, float* s) {
  for (int64_t j = 0; j < n; ++j) {
    double dot = 0.0;
    for (int64_t c = 0; c < d; ++c) dot += double(q[c]) * double(widen(k[j * d + c]));
    s[j] = float(dot) * scale;
  }
}

inline float softmax_scalar(float* s, int64_t n, float* max_out) {
  const float max = *std::max_element(s, s + n);
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - max));
  *max_out = max;
  return float(sum);
}

inline void softcap_scalar(float* s, int64_t n, float cap) {
  for (int64_t j = 0; j < n; ++j) s[j] = cap * std::tanh(s[j] / cap);
}

// Called once per head over all its keys (key_block is unbounded for this path).
template <typename T>
void weighted_scalar(const float* p, const T* v, int64_t n, int64_t d, bool accumulate,
                     float scale, float* out) {
  for (int64_t c = 0; c < d; ++c) {
    double acc = accumulate ? out[c] : 0.0;
    for (int64_t j = 0; j < n; ++j) acc += double(p[j]) * double(widen(v[j * d + c]));
    out[c] = float(acc) * scale;
  }
}

#if XC_X86
// ---- AVX2 + FMA: 8 lanes, masked (vmaskmov) tails ---------------------------------------------
XC_TARGET_AVX2 inline __m256i lanes_below_avx2(int64_t count) {  // lane i set when i < count
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(count, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 values from `at` as fp32; Masked: only the first `lanes` (< 8, set in mask) read, the rest 0.
template <bool Masked>
XC_TARGET_AVX2 inline __m256 load_avx2(const float* at, __m256i mask, int64_t) {
  if constexpr (Masked) return _mm256_maskload_ps(at, mask);
  else return _mm256_loadu_ps(at);
}

XC_TARGET_AVX2 inline __m256 widen_avx2(__m128i h) {  // 8 bf16 -> 8 fp32: each into the top half
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// AVX2 has no 16-bit masked load: a tail goes through a zeroed stack copy (one per row at most).
template <bool Masked>
XC_TARGET_AVX2 inline __m256 load_avx2(const bf16* at, __m256i, int64_t lanes) {
  if constexpr (Masked) {
    bf16 part[8] = {};
    std::memcpy(part, at, sizeof(bf16) * lanes);
    return widen_avx2(_mm_loadu_si128(reinterpret_cast<const __m128i*>(part)));
  } else {
    return widen_avx2(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
  }
}

// The four horizontal sums of a, b, c, d as one vector (a, b, c, d).
XC_TARGET_AVX2 inline __m128 hsum4_avx2(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

template <typename T>
XC_TARGET_AVX2 void scores_avx2(const float* q, const T* k, int64_t n, int64_t d, float scale,
                                float* s) {
  const int64_t full = d / 8 * 8, rest = d - full;
  const __m256i tail = lanes_below_avx2(rest);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {  // four keys at once: four independent FMA chains
    const T* k0 = k + j * d;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    for (int64_t c = 0; c < full; c += 8) {
      const __m256 qv = _mm256_loadu_ps(q + c);
      for (int r = 0; r < 4; ++r)
        acc[r] = _mm256_fmadd_ps(qv, load_avx2<false>(k0 + r * d + c, tail, 8), acc[r]);
    }
    if (rest) {
      const __m256 qv = _mm256_maskload_ps(q + full, tail);
      for (int r = 0; r < 4; ++r)
        acc[r] = _mm256_fmadd_ps(qv, load_avx2<true>(k0 + r * d + full, tail, rest), acc[r]);
    }
    const __m128 dots = hsum4_avx2(acc[0], acc[1], acc[2], acc[3]);
    _mm_storeu_ps(s + j, _mm_mul_ps(dots, _mm_set1_ps(scale)));
  }
  for (; j < n; ++j) {
    const T* kj = k + j * d;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < full; c += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load_avx2<false>(kj + c, tail, 8), acc);
    if (rest)
      acc = _mm256_fmadd_ps(_mm256_maskload_ps(q + full, tail),
                            load_avx2<true>(kj + full, tail, rest), acc);
    const __m256 zero = _mm256_setzero_ps();
    s[j] = _mm_cvtss_f32(hsum4_avx2(acc, zero, zero, zero)) * scale;
  }
}

XC_TARGET_AVX2 inline float softmax_avx2(float* s, int64_t n, float* max_out) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 vmax = neg_inf;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
  const __m256i tail = lanes_below_avx2(n - j);
  if (j < n)  // lanes past n count as -inf for the max
    vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(s + j, tail),
                                                 _mm256_castsi256_ps(tail)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  *max_out = _mm_cvtss_f32(m);
  const __m256 max = _mm256_broadcastss_ps(m);

  __m256 sum = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = vec_math::exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), max));
    _mm256_storeu_ps(s + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (j < n) {
    const __m256 e = vec_math::exp_avx2(_mm256_sub_ps(_mm256_maskload_ps(s + j, tail), max));
    _mm256_maskstore_ps(s + j, tail, e);
    sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(tail)));
  }
  const __m256 zero = _mm256_setzero_ps();
  return _mm_cvtss_f32(hsum4_avx2(sum, zero, zero, zero));
}

XC_TARGET_AVX2 inline void softcap_avx2(float* s, int64_t n, float cap) {
  const __m256 c = _mm256_set1_ps(cap);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(
        s + j, _mm256_mul_ps(c, vec_math::tanh_avx2(_mm256_div_ps(_mm256_loadu_ps(s + j), c))));
  if (j < n) {
    const __m256i tail = lanes_below_avx2(n - j);
    const __m256 x = _mm256_div_ps(_mm256_maskload_ps(s + j, tail), c);
    _mm256_maskstore_ps(s + j, tail, _mm256_mul_ps(c, vec_math::tanh_avx2(x)));
  }
}

// NV vectors of out (starting at column c0) accumulated over all n keys in registers, two keys per
// step (two accumulator sets: 2 * NV independent FMA chains). Masked: one vector, `lanes` lanes.
template <int NV, bool Masked, typename T>
XC_TARGET_AVX2 void weighted_block_avx2(const float* p, const T* v, int64_t n, int64_t d,
                                        bool accumulate, float scale, float* out, __m256i mask,
                                        int64_t lanes) {
  __m256 even[NV], odd[NV];
  for (int i = 0; i < NV; ++i) {
    even[i] = accumulate ? load_avx2<Masked>(out + 8 * i, mask, lanes) : _mm256_setzero_ps();
    odd[i] = _mm256_setzero_ps();
  }
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const __m256 p0 = _mm256_broadcast_ss(p + j), p1 = _mm256_broadcast_ss(p + j + 1);
    for (int i = 0; i < NV; ++i) {
      even[i] = _mm256_fmadd_ps(p0, load_avx2<Masked>(v + j * d + 8 * i, mask, lanes), even[i]);
      odd[i] =
          _mm256_fmadd_ps(p1, load_avx2<Masked>(v + (j + 1) * d + 8 * i, mask, lanes), odd[i]);
    }
  }
  if (j < n) {
    const __m256 p0 = _mm256_broadcast_ss(p + j);
    for (int i = 0; i < NV; ++i)
      even[i] = _mm256_fmadd_ps(p0, load_avx2<Masked>(v + j * d + 8 * i, mask, lanes), even[i]);
  }
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int i = 0; i < NV; ++i) {
    const __m256 r = _mm256_mul_ps(_mm256_add_ps(even[i], odd[i]), vscale);
    if (Masked) _mm256_maskstore_ps(out + 8 * i, mask, r);
    else _mm256_storeu_ps(out + 8 * i, r);
  }
}

// Column blocks of 32, then 8, then the masked rest: each V row is streamed once per block, and a
// 32-column block of a row is two cache lines (fp32), so V is read from memory about once in all.
template <typename T>
XC_TARGET_AVX2 void weighted_avx2(const float* p, const T* v, int64_t n, int64_t d,
                                  bool accumulate, float scale, float* out) {
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t c = 0;
  for (; c + 32 <= d; c += 32)
    weighted_block_avx2<4, false>(p, v + c, n, d, accumulate, scale, out + c, all, 8);
  for (; c + 8 <= d; c += 8)
    weighted_block_avx2<1, false>(p, v + c, n, d, accumulate, scale, out + c, all, 8);
  if (c < d)
    weighted_block_avx2<1, true>(p, v + c, n, d, accumulate, scale, out + c,
                                 lanes_below_avx2(d - c), d - c);
}

// ---- AVX-512 F/BW/VL: 16 lanes, masked tails --------------------------------------------------
XC_TARGET_AVX512 inline __mmask16 lanes_below_avx512(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1);
}

template <bool Masked>
XC_TARGET_AVX512 inline __m512 load_avx512(const float* at, __mmask16 mask) {
  if constexpr (Masked) return _mm512_maskz_loadu_ps(mask, at);
  else return _mm512_loadu_ps(at);
}

// 16 bf16 -> 16 fp32 (vpmovzxwd, then each into the top half); a masked tail with AVX512-BW's
// 16-bit masked load.
template <bool Masked>
XC_TARGET_AVX512 inline __m512 load_avx512(const bf16* at, __mmask16 mask) {
  __m256i h;
  if constexpr (Masked) h = _mm256_maskz_loadu_epi16(mask, at);
  else h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 -> 8 lanes, low half + high half (extractf64x4 is AVX-512 F; extractf32x8 would need DQ).
XC_TARGET_AVX512 inline __m256 fold_avx512(__m512 x) {
  return _mm256_add_ps(_mm512_castps512_ps256(x),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}

XC_TARGET_AVX512 inline __m128 hsum4_avx512(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(fold_avx512(a), fold_avx512(b)),
                                  _mm256_hadd_ps(fold_avx512(c), fold_avx512(d)));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

template <typename T>
XC_TARGET_AVX512 void scores_avx512_widen(const float* q, const T* k, int64_t n, int64_t d,
                                          float scale, float* s) {
  const int64_t full = d / 16 * 16;
  const __mmask16 tail = lanes_below_avx512(d - full);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* k0 = k + j * d;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (int64_t c = 0; c < full; c += 16) {
      const __m512 qv = _mm512_loadu_ps(q + c);
      for (int r = 0; r < 4; ++r)
        acc[r] = _mm512_fmadd_ps(qv, load_avx512<false>(k0 + r * d + c, tail), acc[r]);
    }
    if (full < d) {
      const __m512 qv = _mm512_maskz_loadu_ps(tail, q + full);
      for (int r = 0; r < 4; ++r)
        acc[r] = _mm512_fmadd_ps(qv, load_avx512<true>(k0 + r * d + full, tail), acc[r]);
    }
    const __m128 dots = hsum4_avx512(acc[0], acc[1], acc[2], acc[3]);
    _mm_storeu_ps(s + j, _mm_mul_ps(dots, _mm_set1_ps(scale)));
  }
  for (; j < n; ++j) {
    const T* kj = k + j * d;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; c += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), load_avx512<false>(kj + c, tail), acc);
    if (full < d)
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, q + full),
                            load_avx512<true>(kj + full, tail), acc);
    s[j] = _mm512_reduce_add_ps(acc) * scale;
  }
}

template <typename T>
XC_TARGET_AVX512 void scores_avx512(const float* q, const T* k, int64_t n, int64_t d,
                                    float scale, float* s) {
  scores_avx512_widen(q, k, n, d, scale, s);
}

XC_TARGET_AVX512 inline float softmax_avx512(float* s, int64_t n, float* max_out) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = neg_inf;
  for (int64_t j = 0; j < n; j += 16)  // lanes past n load as -inf
    vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(neg_inf, lanes_below_avx512(n - j), s + j));
  *max_out = _mm512_reduce_max_ps(vmax);
  const __m512 max = _mm512_set1_ps(*max_out);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = lanes_below_avx512(n - j);
    const __m512 e = vec_math::exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s + j), max));
    _mm512_mask_storeu_ps(s + j, lanes, e);
    sum = _mm512_mask_add_ps(sum, lanes, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

XC_TARGET_AVX512 inline void softcap_avx512(float* s, int64_t n, float cap) {
  const __m512 c = _mm512_set1_ps(cap);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = lanes_below_avx512(n - j);
    const __m512 x = _mm512_div_ps(_mm512_maskz_loadu_ps(lanes, s + j), c);
    _mm512_mask_storeu_ps(s + j, lanes, _mm512_mul_ps(c, vec_math::tanh_avx512(x)));
  }
}

template <int NV, bool Masked, typename T>
XC_TARGET_AVX512 void weighted_block_avx512(const float* p, const T* v, int64_t n, int64_t d,
                                            bool accumulate, float scale, float* out,
                                            __mmask16 mask) {
  __m512 even[NV], odd[NV];
  for (int i = 0; i < NV; ++i) {
    even[i] = accumulate ? load_avx512<Masked>(out + 16 * i, mask) : _mm512_setzero_ps();
    odd[i] = _mm512_setzero_ps();
  }
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
    for (int i = 0; i < NV; ++i) {
      even[i] = _mm512_fmadd_ps(p0, load_avx512<Masked>(v + j * d + 16 * i, mask), even[i]);
      odd[i] = _mm512_fmadd_ps(p1, load_avx512<Masked>(v + (j + 1) * d + 16 * i, mask), odd[i]);
    }
  }
  if (j < n) {
    const __m512 p0 = _mm512_set1_ps(p[j]);
    for (int i = 0; i < NV; ++i)
      even[i] = _mm512_fmadd_ps(p0, load_avx512<Masked>(v + j * d + 16 * i, mask), even[i]);
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int i = 0; i < NV; ++i)
    _mm512_mask_storeu_ps(out + 16 * i, Masked ? mask : __mmask16(0xffff),
                          _mm512_mul_ps(_mm512_add_ps(even[i], odd[i]), vscale));
}

// Column blocks of 64 (one cache line of each fp32 V row per vector), then 16, then the rest.
// `width` columns of rows of d (the whole row but where a bf16 block path took the first ones).
template <typename T>
XC_TARGET_AVX512 void weighted_avx512_widen(const float* p, const T* v, int64_t n, int64_t d,
                                            bool accumulate, float scale, float* out,
                                            int64_t width) {
  int64_t c = 0;
  for (; c + 64 <= width; c += 64)
    weighted_block_avx512<4, false>(p, v + c, n, d, accumulate, scale, out + c, 0);
  for (; c + 16 <= width; c += 16)
    weighted_block_avx512<1, false>(p, v + c, n, d, accumulate, scale, out + c, 0);
  if (c < width)
    weighted_block_avx512<1, true>(p, v + c, n, d, accumulate, scale, out + c,
                                   lanes_below_avx512(width - c));
}

template <typename T>
XC_TARGET_AVX512 void weighted_avx512(const float* p, const T* v, int64_t n, int64_t d,
                                      bool accumulate, float scale, float* out) {
  weighted_avx512_widen(p, v, n, d, accumulate, scale, out, d);
}

// bf16 rows 32 values at a time: a 16-bit value at an even position is the low half of its 32-bit
// lane, so (lane << 16) is that value in fp32 and (lane & 0xffff0000) the odd one beside it: two
// plain ALU ops widen 32 values, where vpmovzxwd + shift take two ops per 16. The values come out
// split even / odd, so q (scores) and the output columns (weighted) are taken apart the same way.
XC_TARGET_AVX512 inline void split_bf16_avx512(const bf16* at, __m512& even, __m512& odd) {
  const __m512i raw = _mm512_loadu_si512(at);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(int(0xffff0000u))));
}

// 32 fp32 at `at` -> their even positions, their odd ones; and back.
XC_TARGET_AVX512 inline void deinterleave_avx512(const float* at, __m512& even, __m512& odd) {
  const __m512 a = _mm512_loadu_ps(at), b = _mm512_loadu_ps(at + 16);
  const __m512i evens =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  even = _mm512_permutex2var_ps(a, evens, b);
  odd = _mm512_permutex2var_ps(a, _mm512_add_epi32(evens, _mm512_set1_epi32(1)), b);
}

XC_TARGET_AVX512 inline void interleave_avx512(__m512 even, __m512 odd, float* at) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  _mm512_storeu_ps(at, _mm512_permutex2var_ps(even, lo, odd));
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  _mm512_storeu_ps(at + 16, _mm512_permutex2var_ps(even, hi, odd));
}

// scores over a bf16 cache, d a multiple of 32 and <= 256 (else the general path): q split once.
template <>
XC_TARGET_AVX512 inline void scores_avx512<bf16>(const float* q, const bf16* k, int64_t n,
                                                 int64_t d, float scale, float* s) {
  if (d % 32 || d > 256) return scores_avx512_widen(q, k, n, d, scale, s);
  __m512 qe[8], qo[8];
  for (int64_t c = 0; c < d; c += 32) deinterleave_avx512(q + c, qe[c / 32], qo[c / 32]);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (int64_t c = 0; c < d; c += 32)
      for (int r = 0; r < 4; ++r) {
        __m512 even, odd;
        split_bf16_avx512(k + (j + r) * d + c, even, odd);
        acc[r] = _mm512_fmadd_ps(qo[c / 32], odd, _mm512_fmadd_ps(qe[c / 32], even, acc[r]));
      }
    _mm_storeu_ps(s + j, _mm_mul_ps(hsum4_avx512(acc[0], acc[1], acc[2], acc[3]),
                                    _mm_set1_ps(scale)));
  }
  for (; j < n; ++j) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 32) {
      __m512 even, odd;
      split_bf16_avx512(k + j * d + c, even, odd);
      acc = _mm512_fmadd_ps(qo[c / 32], odd, _mm512_fmadd_ps(qe[c / 32], even, acc));
    }
    s[j] = _mm512_reduce_add_ps(acc) * scale;
  }
}

// weighted over a bf16 cache: 64 columns a block (two split vectors of 32), accumulated even /
// odd and put back in order at the end; the rest of the columns on the general path.
template <>
XC_TARGET_AVX512 inline void weighted_avx512<bf16>(const float* p, const bf16* v, int64_t n,
                                                   int64_t d, bool accumulate, float scale,
                                                   float* out) {
  int64_t c = 0;
  for (; c + 64 <= d; c += 64) {
    __m512 acc[4];  // even, odd of columns c .. c + 31, then of c + 32 .. c + 63
    for (int h = 0; h < 2; ++h) {
      if (accumulate) deinterleave_avx512(out + c + 32 * h, acc[2 * h], acc[2 * h + 1]);
      else
        acc[2 * h] = acc[2 * h + 1] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < n; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j]);
      for (int h = 0; h < 2; ++h) {
        __m512 even, odd;
        split_bf16_avx512(v + j * d + c + 32 * h, even, odd);
        acc[2 * h] = _mm512_fmadd_ps(pj, even, acc[2 * h]);
        acc[2 * h + 1] = _mm512_fmadd_ps(pj, odd, acc[2 * h + 1]);
      }
    }
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int h = 0; h < 2; ++h)
      interleave_avx512(_mm512_mul_ps(acc[2 * h], vscale), _mm512_mul_ps(acc[2 * h + 1], vscale),
                        out + c + 32 * h);
  }
  if (c < d) weighted_avx512_widen(p, v + c, n, d, accumulate, scale, out + c, d - c);
}

#endif

}  // namespace attention_rows
}  // namespace xcompile
