// vdpbf16ps (AVX512_BF16), two ways: the instruction on 512-bit registers (HardwareDp) and a
// plain C++ model of it (EmulatedDp) that runs on any CPU. The BF16-weight kernels
// (gemm_dpbf16.cpp) are written once against this interface and instantiated for both, so their
// blocking, packing and tails are tested everywhere, and on a CPU with AVX512_BF16 the two are
// held to each other bit for bit (tests/csrc/test_dpbf16.py).
//
// A vector of the interface: F32 is 16 fp32 lanes; Bf16 is 32 bf16, lane i's pair being
// elements 2i and 2i + 1. dp(acc, a, b), per lane i, as the SDM's operation section has it:
//   acc[i] = acc[i] + a[2i + 1] * b[2i + 1]      one FMA, rounded to nearest even
//   acc[i] = acc[i] + a[2i]     * b[2i]          a second one, on that result
// bf16 inputs (and the fp32 accumulator) that are denormal count as zero; denormal results flush
// to zero; MXCSR is neither read nor written. NaN priorities are not modelled (the kernels' data
// have none).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "dispatch.h"
#include "prefetch.h"

#if XC_X86
#include <immintrin.h>
#endif

namespace xcompile {

// Whether this CPU has AVX512_BF16 and the OS enables AVX-512: the best ISA is avx512_bf16 or amx.
bool dpbf16_usable();

// ---- the model ---------------------------------------------------------------------------------
struct EmulatedDp {
  struct F32 {
    float v[16];
  };
  struct Bf16 {
    uint16_t v[32];
  };

  static F32 zero() { return F32{}; }
  static Bf16 load(const uint16_t* p) {
    Bf16 r;
    std::memcpy(r.v, p, sizeof r.v);
    return r;
  }
  static Bf16 load_first(const uint16_t* p, int n) {  // p[0 .. n - 1], the rest zero; n < 32
    Bf16 r{};
    std::memcpy(r.v, p, size_t(n) * 2);
    return r;
  }
  static Bf16 broadcast_pair(const uint32_t* p) {  // the pair at p in every lane
    Bf16 r;
    for (int i = 0; i < 16; ++i) std::memcpy(&r.v[2 * i], p, 4);
    return r;
  }
  static F32 dp(F32 acc, const Bf16& a, const Bf16& b) {
    for (int i = 0; i < 16; ++i) {
      float c = daz(acc.v[i]);
      c = ftz(std::fma(bf16(a.v[2 * i + 1]), bf16(b.v[2 * i + 1]), c));
      acc.v[i] = ftz(std::fma(bf16(a.v[2 * i]), bf16(b.v[2 * i]), c));
    }
    return acc;
  }
  static F32 add(F32 a, const F32& b) {
    for (int i = 0; i < 16; ++i) a.v[i] += b.v[i];
    return a;
  }
  static F32 load_f32(const float* p, int n) {  // p[0 .. n - 1], the rest zero
    F32 r{};
    std::memcpy(r.v, p, size_t(n) * 4);
    return r;
  }
  static void store_f32(float* p, const F32& v, int n) { std::memcpy(p, v.v, size_t(n) * 4); }
  // the 16 lanes' sum, in the order HardwareDp::sum adds them
  static float sum(const F32& v) {
    float s8[8], s4[4];
    for (int i = 0; i < 8; ++i) s8[i] = v.v[i] + v.v[i + 8];
    for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
  }
  static void prefetch(const void*) {}

 private:
  static float bf16(uint16_t h) { return daz(bf16_to_f32(h)); }
  static float daz(float f) { return std::fpclassify(f) == FP_SUBNORMAL ? f * 0.0f : f; }
  static float ftz(float f) { return daz(f); }
};

#if XC_X86
// ---- the hardware ------------------------------------------------------------------------------
#define XC_DP_INLINE XC_TARGET_BF16 __attribute__((always_inline)) inline
struct HardwareDp {
  using F32 = __m512;
  using Bf16 = __m512i;

  XC_DP_INLINE static F32 zero() { return _mm512_setzero_ps(); }
  XC_DP_INLINE static Bf16 load(const uint16_t* p) { return _mm512_loadu_si512(p); }
  XC_DP_INLINE static Bf16 load_first(const uint16_t* p, int n) {
    return _mm512_maskz_loadu_epi16(__mmask32((1u << n) - 1), p);
  }
  XC_DP_INLINE static Bf16 broadcast_pair(const uint32_t* p) {
    return _mm512_set1_epi32(int(*p));
  }
  XC_DP_INLINE static F32 dp(F32 acc, Bf16 a, Bf16 b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
  XC_DP_INLINE static F32 add(F32 a, F32 b) { return _mm512_add_ps(a, b); }
  XC_DP_INLINE static F32 load_f32(const float* p, int n) {
    return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p);
  }
  XC_DP_INLINE static void store_f32(float* p, F32 v, int n) {
    _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), v);
  }
  XC_DP_INLINE static float sum(F32 v) {  // lanes i + 8, then i + 4, i + 2, i + 1
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), high);
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
  }
  XC_DP_INLINE static void prefetch(const void* p) {
    prefetch_stream(p);
  }
};
#undef XC_DP_INLINE
#endif

}  // namespace xcompile
