// Prompt matmul on int8-quantized activations (MatMulNBits' accuracy_level 4) for INT8 / INT4
// weights with AVX512_VNNI: x of kGemmMinRows rows and more (a prompt). The decode kernels
// (gemv_nbits_vnni.cpp) dot one weight row with one x row along K and spend a conversion and an
// FMA on every vpdpbusd (x's scale changes every unit); at 128 rows that left a 135M model's
// prefill at ~130 G int8 ops/s, a fifth of what the instruction does. Here the lanes are output
// columns instead:
//   a panel of 32 weight columns is repacked once per call into VNNI order, (K/4, 32, 4) bytes
//   (INT4 unpacked to one value a byte), by 16-lane gathers;
//   x's 4 bytes at k..k+3 are broadcast to every lane, so one vpdpbusd adds 4 products to each
//   of 16 columns, into int32; a unit of x (one scale) is unit/4 of them;
//   at the end of a unit, per x row and 16 columns: one conversion and one FMA by the unit's
//   scale; at the end of a block: one FMA by the columns' scales, one by their scale * zero point
//   times the block's sum of x.
// The formula is gemv_nbits_vnni.cpp's header's, with x quantized in the same units, so results
// agree with the decode kernels and their scalar reference up to fp32 summation order:
//   out[m, n] = sum_b s[n, b] * (sum_{u in b} sx[m, u] * dot_u - zp[n, b] * c[m, b])
// Threads take panels (dynamic); each packs its panel into its own buffer, then runs every x row
// over it, 4 rows at a time (4 x 2 int32 accumulators, 4 x 2 for the block, 4 x 2 for the sums).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dispatch.h"
#include "kernels.h"
#include "nbits.h"
#include "quantize_x.h"
#include "threads.h"

#if XC_X86
#include <immintrin.h>
#endif

namespace xcompile {

#if XC_X86
namespace {

constexpr int kPanel = 32;  // weight columns per panel: two vectors of 16 lanes
constexpr int kRows = 4;    // x rows per micro-kernel step

// One thread's panel: q (padded / 4, kPanel, 4) u8; s and zs (k_blocks, kPanel): the columns'
// scales and scale * zero point (0 past N)
struct Panel {
  std::vector<uint8_t, LineAligned<uint8_t>> q;
  std::vector<float, LineAligned<float>> s, zs;
};

// Columns n0 .. n0 + cols - 1 (cols <= kPanel) of w into p, K padded to whole blocks.
template <int BITS>
XC_TARGET_VNNI void pack_panel(const NBits& w, int64_t n0, int64_t cols, Panel& p) {
  const int64_t row_bytes = w.k_blocks * w.blob, padded = w.k_blocks * w.block_size;
  p.q.resize(size_t(padded * kPanel));
  p.s.assign(size_t(w.k_blocks * kPanel), 0.0f);
  p.zs.assign(size_t(w.k_blocks * kPanel), 0.0f);
  for (int half = 0; half < 2; ++half) {
    const int64_t first = half * 16, lanes = std::clamp<int64_t>(cols - first, 0, 16);
    if (lanes == 0) continue;
    const __mmask16 live = __mmask16((1u << lanes) - 1);
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                              11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(int(row_bytes)));
    const uint8_t* base = w.B + (n0 + first) * row_bytes;
    uint8_t* out = p.q.data() + half * 64;
    if constexpr (BITS == 8) {  // 4 bytes of each row: one (k4, 16 columns) group
      for (int64_t k = 0; k < padded; k += 4) {
        const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, rows,
                                                      base + k, 1);
        _mm512_store_si512(out + (k / 4) * 128, v);
      }
    } else {  // 4 bytes = 8 values of each row: two (k4, 16 columns) groups
      const __m512i low4 = _mm512_set1_epi8(0x0F);
      for (int64_t k = 0; k < padded; k += 8) {
        // element k of a row sits in byte k / 2 (blocks back to back, blob = block_size / 2)
        const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, rows,
                                                      base + k / 2, 1);
        const __m512i even = _mm512_and_si512(v, low4);                        // e0 e2 e4 e6
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);  // e1 e3 e5 e7
        // per 128-bit lane: columns c0, c1 as e0..e7 (lo), c2, c3 (hi)
        const __m512 lo = _mm512_castsi512_ps(_mm512_unpacklo_epi8(even, odd));
        const __m512 hi = _mm512_castsi512_ps(_mm512_unpackhi_epi8(even, odd));
        // e0..e3 of c0..c3, then e4..e7 of c0..c3
        const __m512 first4 = _mm512_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
        const __m512 next4 = _mm512_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
        _mm512_store_si512(out + (k / 4) * 128, _mm512_castps_si512(first4));
        _mm512_store_si512(out + (k / 4 + 1) * 128, _mm512_castps_si512(next4));
      }
    }
  }
  for (int64_t j = 0; j < cols; ++j) {
    const Row row = w.row(n0 + j);
    for (int64_t b = 0; b < w.k_blocks; ++b) {
      p.s[b * kPanel + j] = row.s[b];
      p.zs[b * kPanel + j] = row.s[b] * zero_point<BITS>(row, b);
    }
  }
}

// MB (<= kRows) rows of x, from m0, times the packed panel -> out's columns n0 .. n0 + cols - 1.
template <int MB>
XC_TARGET_VNNI void rows_panel(const QuantizedX& qx, const Panel& p, int64_t m0, int64_t n0,
                               int64_t cols, int64_t block_size, const float* bias, float* out,
                               int64_t N) {
  const int64_t steps = qx.unit / 4, per_block = block_size / qx.unit;
  const int32_t* x[MB];
  for (int m = 0; m < MB; ++m)
    x[m] = reinterpret_cast<const int32_t*>(qx.q.data() + (m0 + m) * qx.padded);
  __m512 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const uint8_t* wq = p.q.data();
  for (int64_t b = 0, u = 0, k4 = 0; b < qx.k_blocks; ++b) {
    __m512 block[MB][2];
    for (int m = 0; m < MB; ++m) block[m][0] = block[m][1] = _mm512_setzero_ps();
    for (int64_t j = 0; j < per_block; ++j, ++u) {
      __m512i dot[MB][2];
      for (int m = 0; m < MB; ++m) dot[m][0] = dot[m][1] = _mm512_setzero_si512();
      for (int64_t t = 0; t < steps; ++t, ++k4) {
        const __m512i w0 = _mm512_load_si512(wq + k4 * 128);
        const __m512i w1 = _mm512_load_si512(wq + k4 * 128 + 64);
        for (int m = 0; m < MB; ++m) {
          const __m512i xb = _mm512_set1_epi32(x[m][k4]);
          dot[m][0] = _mm512_dpbusd_epi32(dot[m][0], w0, xb);
          dot[m][1] = _mm512_dpbusd_epi32(dot[m][1], w1, xb);
        }
      }
      for (int m = 0; m < MB; ++m) {
        const __m512 sx = _mm512_set1_ps(qx.scale[(m0 + m) * qx.units + u]);
        block[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m][0]), sx, block[m][0]);
        block[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m][1]), sx, block[m][1]);
      }
    }
    const float* s = p.s.data() + b * kPanel;
    const float* zs = p.zs.data() + b * kPanel;
    for (int h = 0; h < 2; ++h) {
      const __m512 sv = _mm512_load_ps(s + 16 * h), zv = _mm512_load_ps(zs + 16 * h);
      for (int m = 0; m < MB; ++m) {
        acc[m][h] = _mm512_fmadd_ps(block[m][h], sv, acc[m][h]);
        acc[m][h] = _mm512_fnmadd_ps(zv, _mm512_set1_ps(qx.c[(m0 + m) * qx.k_blocks + b]),
                                     acc[m][h]);
      }
    }
  }
  for (int h = 0; h < 2; ++h) {
    const int64_t first = 16 * h, lanes = std::clamp<int64_t>(cols - first, 0, 16);
    if (lanes == 0) continue;
    const __mmask16 live = __mmask16((1u << lanes) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(live, bias + n0 + first) : _mm512_setzero_ps();
    for (int m = 0; m < MB; ++m)
      _mm512_mask_storeu_ps(out + (m0 + m) * N + n0 + first, live, _mm512_add_ps(acc[m][h], bv));
  }
}

template <int BITS>
void gemm(const QuantizedX& qx, const NBits& w, const float* bias, float* out, int64_t M,
          int64_t N) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int threads = num_threads();
#pragma omp parallel num_threads(threads) if (threads > 1 && panels > 1)
  {
    Panel p;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < panels; ++i) {
      const int64_t n0 = i * kPanel, cols = std::min<int64_t>(kPanel, N - n0);
      pack_panel<BITS>(w, n0, cols, p);
      int64_t m = 0;
      for (; m + kRows <= M; m += kRows)
        rows_panel<kRows>(qx, p, m, n0, cols, w.block_size, bias, out, N);
      switch (M - m) {
        case 3: rows_panel<3>(qx, p, m, n0, cols, w.block_size, bias, out, N); break;
        case 2: rows_panel<2>(qx, p, m, n0, cols, w.block_size, bias, out, N); break;
        case 1: rows_panel<1>(qx, p, m, n0, cols, w.block_size, bias, out, N); break;
        default: break;
      }
    }
  }
}

}  // namespace
#endif

bool gemm_nbits_vnni_supported(int bits, int64_t block_size) {
#if XC_X86
  return current_isa() >= Isa::avx512_vnni && gemv_nbits_q8_supported(bits, block_size);
#else
  (void)bits, (void)block_size;
  return false;
#endif
}

void gemm_nbits_vnni(const float* x, const uint8_t* B, BlockFloats scales,
                     ZeroPoints zero_points, const float* bias, float* out, int64_t M, int64_t N,
                     int64_t K, int bits, int64_t block_size) {
#if XC_X86
  const NBits w(B, scales, zero_points, K, bits, block_size);
  // x in the decode kernels' units, in natural order (the lanes here are columns, not K)
  const QuantizedX qx = quantize_x(x, M, w, bits, /*natural=*/true);
  if (bits == 8)
    gemm<8>(qx, w, bias, out, M, N);
  else
    gemm<4>(qx, w, bias, out, M, N);
#else
  (void)x, (void)B, (void)scales, (void)zero_points, (void)bias, (void)out, (void)M, (void)N,
      (void)K, (void)bits, (void)block_size;
#endif
}

}  // namespace xcompile
