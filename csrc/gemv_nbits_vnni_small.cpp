// INT8 / INT4 on int8-quantized activations (gemv_nbits_vnni.cpp's scheme) where several blocks
// share one 64-byte chunk of a weight row: INT8 blocks of 16 or 32, INT4 blocks of 16, 32 or 64
// (the --int4 default is 32 with float zero points). x's unit is then the block, as llama.cpp's
// Q8_0 and ONNX Runtime's accuracy_level 4 quantize it.
//
// A chunk is G = 64 / blob blocks back to back, and vpdpbusd's lane l sums bytes 4l .. 4l + 3,
// all in one block: lanes 16/G * j .. 16/G * (j + 1) - 1 belong to the chunk's block j (INT4:
// the two vpdpbusd of the low and high nibbles keep that mapping, since byte i of a chunk holds
// its elements 2i and 2i + 1 whatever the block size, which is why x's permutation in groups of
// 128 serves every INT4 block size). So no lane is summed across blocks: each chunk's int32 dots
// are converted and multiplied lane by lane by its blocks' scale products s[b] * sx[b], spread
// from a vector of 16 blocks' products by one vpermps:
//   out[m, n] = sum_lanes sum_chunks cvt(dot) * spread(s * sx)  -  sum_b s[b] zp[b] c[m, b]
// Weights go one row at a time, each thread's rows one linear stream (as in row_vnni); the rows
// of x (batched decode: up to 4) share each chunk's load and unpacking, so M = 4 adds only its
// vpdpbusd and scaling work. 16 blocks are a group: their scales, zero points and x scales are
// one vector each; a row's last group is masked (its last chunk loaded with a byte mask, so
// nothing past the row is read; x is zero-padded to whole chunks by quantize_x).
// Plain reference: gemv_nbits_vnni.cpp's task_scalar (the same formula in double).
#include <algorithm>
#include <cstdint>

#include "dispatch.h"
#include "prefetch.h"
#include "nbits.h"
#include "quantize_x.h"

#if XC_X86
#include <immintrin.h>

namespace xcompile {
namespace {

constexpr int64_t kChunk = 64;  // weight bytes per vpdpbusd (INT4: per two)
// bytes ahead in the weight stream; the scales' and float zero points' streams are prefetched as
// many blocks ahead. 1.1B decode, INT4 at Q4_0's blocks (threads in runs, threads.h): 4096 bytes
// 22.45-22.92 ms a token, 3072 21.97-22.21 (2560 and 3584 between; row_vnni saw no difference)
constexpr int64_t kPrefetch = 3072;
constexpr int64_t kShortRow = 512;  // INT4 row bytes: rows_small_x4 up to this, rows_small beyond

// Accumulators of one weight row times MB rows of x
template <int MB>
struct RowSums {
  static constexpr int NA = MB == 1 ? 2 : 1;  // per x row: MB rows hide the FMA latency
  __m512 acc[MB][NA];
  __m512 corrections[MB];  // s * zp * c, lane by lane
};

// Blocks b .. b + 15 of weight row `row` (TAIL: the row's last, fewer, `live` ones) times x rows
// m0 .. m0 + MB - 1, blocks of G to a chunk.
//   xq (MB, padded) int8 (INT4: permuted), sx / c (MB, k_blocks): x's unit is the block
template <int BITS, int G, int MB, bool TAIL>
XC_TARGET_VNNI __attribute__((always_inline)) inline void group_small(
    const QuantizedX& qx, const NBits& w, const Row& row, const int8_t* xq, const float* sx,
    const float* cx, int64_t b, __mmask16 live, RowSums<MB>& sums) {
  constexpr int64_t xs = unit_for(BITS);  // x bytes per chunk: 64 (INT8), 128 (INT4)
  constexpr int chunks = 16 / G;          // per group of 16 blocks
  constexpr int lanes = 16 / G;           // per block
  constexpr int NA = RowSums<MB>::NA;
  const int64_t row_bytes = w.k_blocks * w.blob, ahead = kPrefetch / w.blob;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lane_block = _mm512_srli_epi32(lane, __builtin_ctz(lanes));  // chunk's block
  prefetch_stream(row.s.address(b + ahead));
  if (row.zf) prefetch_stream(row.zf.address(b + ahead));
  const __m512 s = floats16(row.s, b, live);
  const __m512 zs = _mm512_mul_ps(s, zero_points16<BITS>(row, b, live));
  __m512 p[MB];  // s * sx per block, x row m
  for (int m = 0; m < MB; ++m) {
    p[m] = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(live, sx + m * qx.units + b));
    sums.corrections[m] = _mm512_fmadd_ps(
        zs, _mm512_maskz_loadu_ps(live, cx + m * qx.k_blocks + b), sums.corrections[m]);
  }
#pragma GCC unroll 8
  for (int j = 0; j < chunks; ++j) {
    const int64_t at = (b / G + j) * kChunk;  // the chunk's first byte in the row
    if (TAIL && at >= row_bytes) break;
    const uint8_t* wq = row.q + at;
    __m512i packed;
    if (TAIL && at + kChunk > row_bytes) {  // the row's last chunk, short of G blocks
      packed = _mm512_maskz_loadu_epi8((uint64_t(1) << (row_bytes - at)) - 1, wq);
    } else {
      prefetch_stream(reinterpret_cast<const char*>(wq + kPrefetch));
      packed = _mm512_loadu_si512(wq);
    }
    __m512i lo = packed, hi = packed;
    if constexpr (BITS == 4) {
      lo = _mm512_and_si512(packed, low4);
      hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
    }
    const __m512i spread = _mm512_add_epi32(lane_block, _mm512_set1_epi32(G * j));
    for (int m = 0; m < MB; ++m) {
      const int8_t* xm = xq + m * qx.padded + (b / G + j) * xs;
      __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512(xm));
      if constexpr (BITS == 4) dot = _mm512_dpbusd_epi32(dot, hi, _mm512_load_si512(xm + 64));
      __m512& acc = sums.acc[m][j % NA];
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(spread, p[m]), acc);
    }
  }
}

// Weight rows n0 .. n1 - 1, one after the other (one stream), times x rows m0 .. m0 + MB - 1
// into out (stride N)
template <int BITS, int G, int MB>
XC_TARGET_VNNI void rows_small(const QuantizedX& qx, const NBits& w, int64_t m0, int64_t n0,
                               int64_t n1, const float* bias, float* out, int64_t N) {
  const int8_t* xq = qx.q.data() + m0 * qx.padded;
  const float* sx = qx.scale.data() + m0 * qx.units;
  const float* cx = qx.c.data() + m0 * qx.k_blocks;
  const int64_t whole = w.k_blocks / 16 * 16;  // blocks in whole groups
  const __mmask16 tail = __mmask16((1u << (w.k_blocks - whole)) - 1);
  for (int64_t n = n0; n < n1; ++n) {
    const Row row = w.row(n);
    RowSums<MB> sums;
    for (int m = 0; m < MB; ++m) {
      for (int a = 0; a < RowSums<MB>::NA; ++a) sums.acc[m][a] = _mm512_setzero_ps();
      sums.corrections[m] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < whole; b += 16)
      group_small<BITS, G, MB, false>(qx, w, row, xq, sx, cx, b, 0xFFFF, sums);
    if (tail) group_small<BITS, G, MB, true>(qx, w, row, xq, sx, cx, whole, tail, sums);
    for (int m = 0; m < MB; ++m) {
      __m512 sum = sums.acc[m][0];
      if constexpr (RowSums<MB>::NA == 2) sum = _mm512_add_ps(sum, sums.acc[m][1]);
      out[(m0 + m) * N + n] = _mm512_reduce_add_ps(_mm512_sub_ps(sum, sums.corrections[m])) +
                              (bias ? bias[n] : 0.0f);
    }
  }
}

// Four weight rows (adjacent in B, so still one linear stream) times one x row: a small
// model's rows are few chunks long (SmolLM2-135M's 576 columns at blocks of 32: 4.5 chunks of
// INT4), so one row at a time spent as much on a row's fixed work (its group's x scales and
// sums, the spread of blocks to lanes, the final reduction) as on its chunks. Here each chunk's
// x bytes and spread, and each group's x scales and sums, serve four rows, and the four sums are
// reduced together. Blocks b .. b + 15 as group_small. SmolLM2-135M INT4 at Q4_0's blocks, one
// thread, cache-resident 3072 x 576: 48.6 -> 39.9 us; in its decode step (2 threads) the MLP's
// gate/up 35 -> 32 us, QKV 13.2 -> 12. Only for short INT4 rows (kShortRow): at the 1.1B model's
// 1 KiB rows the four rows' streams slowed the DRAM-bound step (22.6 -> 27 ms a token), and the
// INT8 lm_head's 576-byte rows gained nothing.
template <int BITS, int G, bool TAIL>
XC_TARGET_VNNI __attribute__((always_inline)) inline void group_small_x4(
    const NBits& w, const Row (&rows)[4], const int8_t* xq, const float* sx, const float* cx,
    int64_t b, __mmask16 live, __m512 (&acc)[4], __m512 (&corrections)[4]) {
  constexpr int64_t xs = unit_for(BITS);
  constexpr int chunks = 16 / G, lanes = 16 / G;
  const int64_t row_bytes = w.k_blocks * w.blob, ahead = kPrefetch / w.blob;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lane_block = _mm512_srli_epi32(lane, __builtin_ctz(lanes));
  const __m512 sxb = _mm512_maskz_loadu_ps(live, sx + b), cxb = _mm512_maskz_loadu_ps(live, cx + b);
  __m512 p[4];  // s * sx per block, weight row r
  for (int r = 0; r < 4; ++r) {
    prefetch_stream(rows[r].s.address(b + ahead));
    if (rows[r].zf) prefetch_stream(rows[r].zf.address(b + ahead));
    const __m512 s = floats16(rows[r].s, b, live);
    p[r] = _mm512_mul_ps(s, sxb);
    corrections[r] = _mm512_fmadd_ps(_mm512_mul_ps(s, zero_points16<BITS>(rows[r], b, live)), cxb,
                                     corrections[r]);
  }
#pragma GCC unroll 8
  for (int j = 0; j < chunks; ++j) {
    const int64_t at = (b / G + j) * kChunk;
    if (TAIL && at >= row_bytes) break;
    const bool short_chunk = TAIL && at + kChunk > row_bytes;
    const int8_t* xj = xq + (b / G + j) * xs;
    const __m512i xlo = _mm512_load_si512(xj);
    const __m512i xhi = BITS == 4 ? _mm512_load_si512(xj + 64) : xlo;
    const __m512i spread = _mm512_add_epi32(lane_block, _mm512_set1_epi32(G * j));
    for (int r = 0; r < 4; ++r) {
      const uint8_t* wq = rows[r].q + at;
      __m512i packed;
      if (short_chunk) {
        packed = _mm512_maskz_loadu_epi8((uint64_t(1) << (row_bytes - at)) - 1, wq);
      } else {
        prefetch_stream(reinterpret_cast<const char*>(wq + kPrefetch));
        packed = _mm512_loadu_si512(wq);
      }
      __m512i dot;
      if constexpr (BITS == 4) {
        dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(packed, low4), xlo);
        dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4), xhi);
      } else {
        dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), packed, xlo);
      }
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(spread, p[r]), acc[r]);
    }
  }
}

// 16 lanes of each of four vectors summed: lane r of the result is v[r]'s sum
XC_TARGET_AVX512 __attribute__((always_inline)) inline __m128 sum4(const __m512 (&v)[4]) {
  __m256 h[4];
  for (int r = 0; r < 4; ++r)
    h[r] = _mm256_add_ps(_mm512_castps512_ps256(v[r]),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[r]), 1)));
  // hadd per 128-bit half: [a0 + a1, a2 + a3, b0 + b1, b2 + b3]
  const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
  return _mm_add_ps(_mm256_castps256_ps128(h0123), _mm256_extractf128_ps(h0123, 1));
}

// Weight rows n0 .. n1 - 1 times x row m0, four at a time (the rest one at a time, rows_small)
template <int BITS, int G>
XC_TARGET_VNNI void rows_small_x4(const QuantizedX& qx, const NBits& w, int64_t m0, int64_t n0,
                                  int64_t n1, const float* bias, float* out, int64_t N) {
  const int8_t* xq = qx.q.data() + m0 * qx.padded;
  const float* sx = qx.scale.data() + m0 * qx.units;
  const float* cx = qx.c.data() + m0 * qx.k_blocks;
  const int64_t whole = w.k_blocks / 16 * 16;
  const __mmask16 tail = __mmask16((1u << (w.k_blocks - whole)) - 1);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const Row rows[4] = {w.row(n), w.row(n + 1), w.row(n + 2), w.row(n + 3)};
    __m512 acc[4], corrections[4];
    for (int r = 0; r < 4; ++r) acc[r] = corrections[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < whole; b += 16)
      group_small_x4<BITS, G, false>(w, rows, xq, sx, cx, b, 0xFFFF, acc, corrections);
    if (tail) group_small_x4<BITS, G, true>(w, rows, xq, sx, cx, whole, tail, acc, corrections);
    for (int r = 0; r < 4; ++r) acc[r] = _mm512_sub_ps(acc[r], corrections[r]);
    __m128 sums = sum4(acc);
    if (bias) sums = _mm_add_ps(sums, _mm_loadu_ps(bias + n));
    _mm_storeu_ps(out + m0 * N + n, sums);
  }
  if (n < n1) rows_small<BITS, G, 1>(qx, w, m0, n, n1, bias, out, N);
}

template <int BITS, int G>
void rows_any(int64_t mb, const QuantizedX& qx, const NBits& w, int64_t m0, int64_t n0,
              int64_t n1, const float* bias, float* out, int64_t N) {
  switch (mb) {
    case 1:
      if (BITS == 4 && w.k_blocks * w.blob <= kShortRow)
        return rows_small_x4<BITS, G>(qx, w, m0, n0, n1, bias, out, N);
      return rows_small<BITS, G, 1>(qx, w, m0, n0, n1, bias, out, N);
    case 2:
      return rows_small<BITS, G, 2>(qx, w, m0, n0, n1, bias, out, N);
    case 3:
      return rows_small<BITS, G, 3>(qx, w, m0, n0, n1, bias, out, N);
    default:
      return rows_small<BITS, G, 4>(qx, w, m0, n0, n1, bias, out, N);
  }
}

// Decode and batched decode (M <= 4): every x row on each weight row as it streams by. A prompt:
// 4 x rows outside, the task's weight rows inside (they stay in L1 meanwhile).
template <int BITS, int G>
void task_small(const QuantizedX& qx, const NBits& w, int64_t M, int64_t n0, int64_t rows,
                const float* bias, float* out, int64_t N) {
  for (int64_t m = 0; m < M; m += 4)
    rows_any<BITS, G>(std::min<int64_t>(4, M - m), qx, w, m, n0, n0 + rows, bias, out, N);
}

}  // namespace

template <int BITS>
void task_vnni_small(const QuantizedX& qx, const NBits& w, int64_t M, int64_t n0, int64_t rows,
                     const float* bias, float* out, int64_t N) {
  switch (kChunk / w.blob) {
    case 2:
      return task_small<BITS, 2>(qx, w, M, n0, rows, bias, out, N);
    case 4:
      return task_small<BITS, 4>(qx, w, M, n0, rows, bias, out, N);
    default:
      return task_small<BITS, 8>(qx, w, M, n0, rows, bias, out, N);
  }
}

template void task_vnni_small<8>(const QuantizedX&, const NBits&, int64_t, int64_t, int64_t,
                                 const float*, float*, int64_t);
template void task_vnni_small<4>(const QuantizedX&, const NBits&, int64_t, int64_t, int64_t,
                                 const float*, float*, int64_t);

}  // namespace xcompile
#endif
