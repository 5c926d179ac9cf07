// BF16-weight matmuls on vdpbf16ps (AVX512_BF16): x (M, K) fp32, w (N, K) bf16 as stored
// (nn.Linear layout), bias (N) fp32 or null, out (M, N) = x w^T + bias in fp32.
//
// x is carried as hi + lo, two bf16 (hi = bf16(x), lo = bf16(x - hi): 16 of fp32's 24
// significant bits, each product within 2^-16 of x w), both multiplied in: results within
// fp32-GEMV tolerances, where rounding x once to bf16 (llama.cpp's BF16 path) misses them by
// ~100x. The products of bf16 are exact in fp32, so only the accumulation rounds, as in an fp32
// FMA. That is two dot products per weight pair: vdpbf16ps does 32 multiply-adds an instruction,
// so the pair costs what one fp32 FMA does, without widening the weights first.
//   gemv (decode, a few rows): one weight row at a time, the weights streamed once
//   (gemm_dpbf16_body.h's row), the layout gemv.cpp's row_avx512 found fastest.
//   gemm (a prompt, 8 rows and more): panels of 64 weight rows rearranged per call into dp's
//   pair layout (no copy of the weights kept), 6 x 64 register tiles, x's pairs broadcast.
// The kernels are written once (gemm_dpbf16_body.h) for the instruction and for its C++ model
// (dpbf16.h), which the tests run on every CPU.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "bf16.h"
#include "dispatch.h"
#include "dpbf16.h"
#include "kernels.h"
#include "x_row_chunks.h"
#include "quantize_x.h"  // LineAligned
#include "threads.h"

namespace xcompile {
namespace {

constexpr int64_t kDpRows = 4;                   // decode: weight rows per task
constexpr int64_t kDpPrefetchBytes = 4096;       // decode: software prefetch distance
constexpr int64_t kDpParallelMinElems = 1 << 16;  // below this, waking the pool costs more
constexpr int kMR = 6;                           // prompt: rows of x per register tile
constexpr int64_t kPanelCols = 64;               // prompt: output columns per panel and tile

// x (M, K) fp32 as hi + lo bf16, each (M, Kp), Kp = K rounded up to 32, zeros past K
struct XHiLo {
  int64_t Kp = 0;
  std::vector<uint16_t, LineAligned<uint16_t>> hi, lo;
};

XHiLo zeros_for(int64_t M, int64_t K) {
  XHiLo s;
  s.Kp = (K + 31) / 32 * 32;
  s.hi.assign(size_t(M * s.Kp), 0);
  s.lo.assign(size_t(M * s.Kp), 0);
  return s;
}

// a prompt GEMM's packed panel, one per thread, kept between calls (pairs x 64 words: 256 KiB
// for K = 2048)
std::vector<uint32_t, LineAligned<uint32_t>>& panel_scratch() {
  static thread_local std::vector<uint32_t, LineAligned<uint32_t>> panel;
  return panel;
}

// the 32-bit word of bf16 pair p of w's row (K), zero past K
uint32_t pair_at(const uint16_t* row, int64_t K, int64_t p) {
  const uint32_t even = 2 * p < K ? row[2 * p] : 0, odd = 2 * p + 1 < K ? row[2 * p + 1] : 0;
  return even | odd << 16;
}

}  // namespace

namespace emulated {
namespace {
using Dp = EmulatedDp;
#include "gemm_dpbf16_body.h"

XHiLo split_x(const float* x, int64_t M, int64_t K) {
  XHiLo s = zeros_for(M, K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const float v = x[m * K + k];
      const uint16_t hi = bf16_round(v);
      s.hi[m * s.Kp + k] = hi;
      s.lo[m * s.Kp + k] = bf16_round(v - bf16_to_f32(hi));
    }
  return s;
}

void pack_panel(const uint16_t* w, int64_t cols, int64_t K, int64_t pairs, uint32_t* panel) {
  for (int64_t p = 0; p < pairs; ++p)
    for (int64_t j = 0; j < kPanelCols; ++j)
      panel[p * kPanelCols + j] = j < cols ? pair_at(w + j * K, K, p) : 0;
}
}  // namespace
}  // namespace emulated

#if XC_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,avx2,fma")
namespace hardware {
namespace {
using Dp = HardwareDp;
#include "gemm_dpbf16_body.h"

// bf16_round (bf16.h) on 16 floats: to nearest even, a NaN stays a NaN
__m256i round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, bits, _mm512_set1_epi32(0x400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// emulated::split_x's bits, 16 at a time (the scalar loop took ~2.5 ns an element: 1.3 ms of a
// 128 x 5632 prompt)
XHiLo split_x(const float* x, int64_t M, int64_t K) {
  XHiLo s = zeros_for(M, K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 16) {  // Kp is a multiple of 32: whole stores stay inside
      const __mmask16 valid = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(valid, x + m * K + k);
      const __m256i hi = round_bf16(v);
      const __m512 widened = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&s.hi[m * s.Kp + k]), hi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&s.lo[m * s.Kp + k]),
                          round_bf16(_mm512_sub_ps(v, widened)));
    }
  return s;
}

void dpbf16ps_once(const float* acc, const uint16_t* a, const uint16_t* b, float* out) {
  _mm512_storeu_ps(out, Dp::dp(_mm512_loadu_ps(acc), Dp::load(a), Dp::load(b)));
}

// 16 x 16 words (r[j] = 16 pairs of row j) -> r[i] = pair i of the 16 rows
void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: words 0, 1 (2, 3) of rows i, i + 1
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // per 128-bit lane: word q of rows i .. i + 3 in u[i + q]
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int q = 0; q < 4; ++q) {  // word 4L + q: lane L of u[q], u[4 + q], u[8 + q], u[12 + q]
    const __m512i a = _mm512_shuffle_i32x4(u[q], u[4 + q], 0x88);
    const __m512i b = _mm512_shuffle_i32x4(u[q], u[4 + q], 0xDD);
    const __m512i c = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0x88);
    const __m512i d = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0xDD);
    r[q] = _mm512_shuffle_i32x4(a, c, 0x88);
    r[4 + q] = _mm512_shuffle_i32x4(b, d, 0x88);
    r[8 + q] = _mm512_shuffle_i32x4(a, c, 0xDD);
    r[12 + q] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
}

void pack_panel(const uint16_t* w, int64_t cols, int64_t K, int64_t pairs, uint32_t* panel) {
  for (int64_t p0 = 0; p0 < pairs; p0 += 16) {  // 16 pairs = 32 columns of w
    const int64_t k0 = 2 * p0;
    const int n = int(std::min<int64_t>(32, K - k0));
    const int64_t np = std::min<int64_t>(16, pairs - p0);
    for (int64_t j0 = 0; j0 < kPanelCols; j0 += 16) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) {
        const uint16_t* src = w + (j0 + j) * K + k0;
        r[j] = j0 + j >= cols ? _mm512_setzero_si512()
               : n == 32      ? _mm512_loadu_si512(src)
                              : _mm512_maskz_loadu_epi16(__mmask32((1u << n) - 1), src);
      }
      transpose16(r);
      for (int64_t i = 0; i < np; ++i)
        _mm512_storeu_si512(panel + (p0 + i) * kPanelCols + j0, r[i]);
    }
  }
}
}  // namespace
}  // namespace hardware
#pragma GCC pop_options
#endif

bool dpbf16_usable() { return best_isa() >= Isa::avx512_bf16; }

namespace {

void check_unit(bool emulate) {
  if (!emulate && !dpbf16_usable())
    throw std::invalid_argument(
        "this CPU (or its OS) offers no AVX512_BF16; pass emulate=True to run the vdpbf16ps "
        "kernels on their C++ model");
}

}  // namespace

void dpbf16ps(const float* acc, const uint16_t* a, const uint16_t* b, float* out, bool emulate) {
  check_unit(emulate);
#if XC_X86
  if (!emulate) return hardware::dpbf16ps_once(acc, a, b, out);
#endif
  EmulatedDp::F32 c;
  std::memcpy(c.v, acc, sizeof c.v);
  c = EmulatedDp::dp(c, EmulatedDp::load(a), EmulatedDp::load(b));
  std::memcpy(out, c.v, sizeof c.v);
}

void gemv_bf16_dp(const float* x, const uint16_t* w, const float* bias, float* out, int64_t M,
                  int64_t N, int64_t K, bool emulate) {
  check_unit(emulate);
#if XC_X86
  if (!emulate) return hardware::gemv(hardware::split_x(x, M, K), w, bias, out, M, N, K);
#endif
  emulated::gemv(emulated::split_x(x, M, K), w, bias, out, M, N, K);
}

void gemm_bf16_dp(const float* x, const uint16_t* w, const float* bias, float* out, int64_t M,
                  int64_t N, int64_t K, bool emulate) {
  check_unit(emulate);
#if XC_X86
  if (!emulate) return hardware::gemm(hardware::split_x(x, M, K), w, bias, out, M, N, K);
#endif
  emulated::gemm(emulated::split_x(x, M, K), w, bias, out, M, N, K);
}

}  // namespace xcompile
