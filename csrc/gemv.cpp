// Decode matmul for a few rows (M small), weights in nn.Linear layout:
//   x (M, K) fp32, w (N, K) fp32 or bf16, bias (N) fp32 or null, out (M, N) fp32
//   out[m, n] = sum_k x[m, k] * w[n, k] + bias[n]
// Decode is memory-bound: the whole point is to stream w from DRAM once. Each thread streams a
// contiguous run of rows (threads.h Runs); each task takes R weight rows and, for them, every row
// of x, so a weight row is read from memory once for all M (for M > MB the R-row block is re-read
// from cache, not DRAM). Accumulation is fp32 in the vector paths (bf16 weights widened in registers),
// double in the scalar reference path.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "dispatch.h"
#include "prefetch.h"
#include "kernels.h"
#include "threads.h"
#include "x_row_chunks.h"

#if XC_X86
#include <immintrin.h>
#endif

namespace xcompile {
namespace {

constexpr int R = 4;  // weight rows per task: R independent FMA chains per x row, R read streams

// Below this many weight elements a gemv takes a few microseconds; waking the pool costs more.
constexpr int64_t kParallelMinElems = int64_t(1) << 16;

// From this many rows of x on, gemv_bf16 hands a BF16 matmul to a prompt's GEMM rather than
// streaming the weights once per 4 rows: vdpbf16ps from 8 (2048 x 2048, one thread: at 4 rows
// the GEMV did 58 GFLOP/s, the GEMM 49; at 8, 52 and 59; at 16, 51 and 76); AMX tiles from 4 (a
// batched decode step too: the tile unit has the work of 16 rows to spare; 2 threads, 11264 x
// 2048: 4 rows 1.82 ms on tiles, 1.92 on the GEMV; 8 rows 1.68 and 4.44).
constexpr int64_t kTileMinRows = 4, kDpPromptRows = 8;

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }

// A block kernel: MB rows of x (stride K) times RB rows of w (stride K) into out (stride N).
template <typename WT>
using BlockFn = void (*)(const float* x, const WT* w, const float* bias, float* out, int64_t N,
                         int64_t K);

// ---- scalar: the plain path the others are held to --------------------------------------------
template <int MB, int RB, typename WT>
void block_scalar(const float* x, const WT* w, const float* bias, float* out, int64_t N,
                  int64_t K) {
  for (int r = 0; r < RB; ++r) {
    for (int m = 0; m < MB; ++m) {
      double sum = 0.0;
      for (int64_t k = 0; k < K; ++k) sum += double(x[m * K + k]) * double(to_f32(w[r * K + k]));
      out[m * N + r] = float(sum) + (bias ? bias[r] : 0.0f);
    }
  }
}

#if XC_X86
// ---- AVX2 + FMA: 8 lanes, scalar K tail -------------------------------------------------------
XC_TARGET_AVX2 inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
XC_TARGET_AVX2 inline __m256 load8(const uint16_t* w) {
  // bf16 -> fp32: zero-extend each 16-bit value to 32 bits, then shift it into the high half.
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

XC_TARGET_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// MB * RB accumulators + RB weight vectors + 1 x vector must fit 16 ymm registers: MB <= 2.
template <int MB, int RB, typename WT>
XC_TARGET_AVX2 void block_avx2(const float* x, const WT* w, const float* bias, float* out,
                               int64_t N, int64_t K) {
  __m256 acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = load8(w + r * K + k);
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < RB; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < RB; ++r) {
      float sum = hsum8(acc[m][r]);
      for (int64_t t = k; t < K; ++t) sum += x[m * K + t] * to_f32(w[r * K + t]);
      out[m * N + r] = sum + (bias ? bias[r] : 0.0f);
    }
  }
}

// ---- AVX-512 F/BW/VL: 16 lanes, masked K tail -------------------------------------------------
XC_TARGET_AVX512 inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
XC_TARGET_AVX512 inline __m512 load16(const uint16_t* w) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
XC_TARGET_AVX512 inline __m512 load16(const float* w, __mmask16 tail) {
  return _mm512_maskz_loadu_ps(tail, w);
}
XC_TARGET_AVX512 inline __m512 load16(const uint16_t* w, __mmask16 tail) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(tail, w));  // BW + VL
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// One weight row at a time, with four accumulators per x row and a software prefetch 4 KiB ahead:
// a thread's share of w is then one linear stream, which the prefetchers follow. Interleaving
// R = 4 rows (the kernel this replaced) read a 5632 x 2048 bf16 matrix at ~0.85-0.90 of the read bandwidth.
constexpr int64_t kPrefetchBytes = 4096;

template <int MB, typename WT>
XC_TARGET_AVX512 void row_avx512(const float* x, const WT* w, const float* bias, float* out,
                                 int64_t N, int64_t K) {
  (void)N;
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  const char* ahead = reinterpret_cast<const char*>(w) + kPrefetchBytes;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    for (size_t line = 0; line < 64 * sizeof(WT); line += 64)  // each 64-byte line of w
      prefetch_stream(ahead + k * sizeof(WT) + line);
    for (int j = 0; j < 4; ++j) {
      const __m512 wv = load16(w + k + 16 * j);
      for (int m = 0; m < MB; ++m)
        acc[m][j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k + 16 * j), wv, acc[m][j]);
    }
  }
  for (; k < K; k += 16) {  // masked lanes load as 0 in both x and w, so they add nothing
    const __mmask16 tail = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    const __m512 wv = load16(w + k, tail);
    for (int m = 0; m < MB; ++m)
      acc[m][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x + m * K + k), wv, acc[m][0]);
  }
  for (int m = 0; m < MB; ++m) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                     _mm512_add_ps(acc[m][2], acc[m][3]));
    out[m * N] = _mm512_reduce_add_ps(sum) + (bias ? bias[0] : 0.0f);
  }
}

template <int MB, typename WT>
XC_TARGET_AVX512 void rows_avx512(const float* x, const WT* w, const float* bias, float* out,
                                  int64_t N, int64_t K) {
  for (int r = 0; r < R; ++r) row_avx512<MB, WT>(x, w + r * K, bias ? bias + r : nullptr, out + r, N, K);
}
#endif

// The block kernels of one ISA: full[mb - 1] takes R weight rows, one[mb - 1] a single row
// (the N % R leftovers), for mb = 1..max_mb rows of x.
template <typename WT>
struct BlockTable {
  int max_mb;
  BlockFn<WT> full[4];
  BlockFn<WT> one[4];
};

template <typename WT>
BlockTable<WT> block_table() {
  switch (current_isa()) {
#if XC_X86
    case Isa::amx:
    case Isa::avx512_bf16:
    case Isa::avx512_vnni:
    case Isa::avx512:
      return {4,
              {rows_avx512<1, WT>, rows_avx512<2, WT>, rows_avx512<3, WT>, rows_avx512<4, WT>},
              {row_avx512<1, WT>, row_avx512<2, WT>, row_avx512<3, WT>, row_avx512<4, WT>}};
    case Isa::avx2:
      return {2,
              {block_avx2<1, R, WT>, block_avx2<2, R, WT>},
              {block_avx2<1, 1, WT>, block_avx2<2, 1, WT>}};
#endif
    default:
      return {1, {block_scalar<1, R, WT>}, {block_scalar<1, 1, WT>}};
  }
}

template <typename WT>
void gemv(const float* x, const WT* w, const float* bias, float* out, int64_t M, int64_t N,
          int64_t K) {
  const BlockTable<WT> table = block_table<WT>();
  const int threads = num_threads();
  const bool parallel = threads > 1 && N > R && N * K >= kParallelMinElems;
  const int64_t blocks = (N + R - 1) / R;
  const int64_t grain = chunk_tasks(R * K, blocks, threads);
  for_runs(blocks, threads, grain, parallel, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * R;
      const int64_t rows = std::min<int64_t>(R, N - n0);
      x_row_chunks(M, table.max_mb, [&](int64_t m0, int mb) {
        const float* xm = x + m0 * K;
        float* om = out + m0 * N;
        if (rows == R) {
          table.full[mb - 1](xm, w + n0 * K, bias ? bias + n0 : nullptr, om + n0, N, K);
        } else {
          for (int64_t n = n0; n < n0 + rows; ++n)
            table.one[mb - 1](xm, w + n * K, bias ? bias + n : nullptr, om + n, N, K);
        }
      });
    }
  });
}

}  // namespace

void gemv_f32(const float* x, const float* w, const float* bias, float* out, int64_t M, int64_t N,
              int64_t K) {
  gemv<float>(x, w, bias, out, M, N, K);
}

void gemv_bf16(const float* x, const uint16_t* w, const float* bias, float* out, int64_t M,
               int64_t N, int64_t K) {
  const Isa isa = current_isa();
  if (isa == Isa::amx && M >= kTileMinRows && gemm_bf16_tiles_supported(N, K))
    return gemm_bf16_tiles(x, w, bias, out, M, N, K, /*emulate=*/false);
  if (isa >= Isa::avx512_bf16)  // vdpbf16ps, x as hi + lo bf16 (gemm_dpbf16.cpp)
    return (M >= kDpPromptRows ? gemm_bf16_dp : gemv_bf16_dp)(x, w, bias, out, M, N, K, false);
  gemv<uint16_t>(x, w, bias, out, M, N, K);
}

}  // namespace xcompile
