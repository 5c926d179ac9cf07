// Decode matmul on weight-only INT8 / INT4 weights in ONNX Runtime's com.microsoft MatMulNBits
// layout, and the dequantization prefill uses before torch's matmul:
//   x (M, K) fp32, bias (N) fp32 or null, out (M, N) fp32
//   B (N, k_blocks, blob) uint8, blob = block_size * bits / 8, k_blocks = ceil(K / block_size);
//     INT4: element 2j of a block is the low nibble of byte j, 2j + 1 the high nibble
//   scales (N, k_blocks) fp32
//   zero_points (nbits.h's ZeroPoints) packed uint8: INT8 (N, k_blocks), INT4 (N, ceil(k_blocks /
//     2)) with block 2j in the low nibble; or fp32 (N, k_blocks), not packed; or none: 2^(bits-1)
//   W[n, k] = (q[n, k] - zp[n, k / block_size]) * scales[n, k / block_size]
//   out[m, n] = sum_k x[m, k] * W[n, k] + bias[n]
// Same shape of work as gemv.cpp: threads split N into blocks of R weight rows, each task streams
// its rows once for all M. Weights are dequantized to fp32 in registers, 16 (AVX-512) or 8 (AVX2)
// at a time, to exactly the reference's values ((float(q) - zp) * scale, two fp32 roundings; the
// first is exact for integer zero points), and FMA'd with x. block_size is a power of two >= 16,
// so a block is whole vector steps except the last block's tail past K, where x and w are masked;
// the AVX-512 INT4 pairs kernels instead read x zero-padded to whole blocks (padding weights are
// finite, so they add 0).
// INT4 on AVX-512 dequantizes by table lookup (vpermps), INT8 by widen, convert, subtract, scale.
// Not done: an AVX-512 VNNI path on int8-quantized activations. Rounding x to 8 bits per row costs
// ~1e-2 relative error in out (0.9% at K=2048, Gaussian x), ~100x the 1e-4 every path is held to.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "dispatch.h"
#include "kernels.h"
#include "nbits.h"
#include "threads.h"
#include "x_row_chunks.h"

#if XC_X86
#include <immintrin.h>
#endif

namespace xcompile {
namespace {

constexpr int R = 4;  // weight rows per task, as in gemv.cpp
constexpr int64_t kParallelMinElems = int64_t(1) << 16;
// Software prefetch this far ahead in each weight row's stream: the dequantizing loops are slow
// enough that the hardware prefetcher alone lets them wait on DRAM (A/B runs on the 2-core dev
// VM, N=5632, K=2048: 0 to 19% faster with it, varying with the neighbours' load).
constexpr int64_t kPrefetch = 384;

// q of element i of a block.
template <int BITS>
inline int q_at(const uint8_t* blk, int64_t i) {
  if constexpr (BITS == 8) {
    return blk[i];
  } else {
    const uint8_t pair = blk[i / 2];
    return (i & 1) ? pair >> 4 : pair & 0xF;
  }
}

// A block kernel: MB rows of x (stride K; the pairs kernels: their permuted, padded x) times RB
// weight rows n0.. into out (stride N).
using BlockFn = void (*)(const float* x, const NBits& w, int64_t n0, const float* bias,
                         float* out, int64_t N);
// One weight row n into out (K).
using DequantFn = void (*)(const NBits& w, int64_t n, float* out);

// ---- scalar: the plain path the others are held to --------------------------------------------
template <int MB, int RB, int BITS>
void block_scalar(const float* x, const NBits& w, int64_t n0, const float* bias, float* out,
                  int64_t N) {
  Row row[RB];
  for (int r = 0; r < RB; ++r) row[r] = w.row(n0 + r);
  for (int m = 0; m < MB; ++m) {
    double sum[RB] = {};  // RB independent chains: the double adds' latency is the limit here
    for (int64_t b = 0; b < w.k_blocks; ++b) {
      const float* xb = x + m * w.K + b * w.block_size;
      for (int r = 0; r < RB; ++r) {
        const uint8_t* blk = row[r].q + b * w.blob;
        const float s = row[r].s[b];
        const float zp = zero_point<BITS>(row[r], b);
        for (int64_t i = 0, len = w.block_len(b); i < len; ++i)
          sum[r] += double(xb[i]) * double((float(q_at<BITS>(blk, i)) - zp) * s);
      }
    }
    for (int r = 0; r < RB; ++r) out[m * N + r] = float(sum[r]) + (bias ? bias[r] : 0.0f);
  }
}

template <int BITS>
void dequant_scalar(const NBits& w, int64_t n, float* out) {
  const Row row = w.row(n);
  for (int64_t b = 0; b < w.k_blocks; ++b) {
    const uint8_t* blk = row.q + b * w.blob;
    const float s = row.s[b];
    const float zp = zero_point<BITS>(row, b);
    float* ob = out + b * w.block_size;
    for (int64_t i = 0, len = w.block_len(b); i < len; ++i)
      ob[i] = (float(q_at<BITS>(blk, i)) - zp) * s;
  }
}

#if XC_X86
// Each weight row is a stream; fetch it kPrefetch bytes ahead of byte `offset` of each block.
template <int RB>
inline void prefetch_ahead(const uint8_t* const* blk, int64_t offset) {
  for (int r = 0; r < RB; ++r)
    _mm_prefetch(reinterpret_cast<const char*>(blk[r] + offset + kPrefetch), _MM_HINT_T0);
}

// ---- AVX2 + FMA: 8 lanes -----------------------------------------------------------------------
// q of elements i .. i + 7 of a block (i a multiple of 8) as int32.
template <int BITS>
XC_TARGET_AVX2 inline __m256i load_q8(const uint8_t* blk, int64_t i) {
  if constexpr (BITS == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + i)));
  } else {
    int32_t four;  // 8 nibbles, element j in byte j / 2, the low nibble first
    std::memcpy(&four, blk + i / 2, 4);
    // dword j takes byte j / 2 (pshufb within each 128-bit lane; 0x80: zero) ...
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(four),
        _mm256_set_epi32(int(0x80808003u), int(0x80808003u), int(0x80808002u), int(0x80808002u),
                         int(0x80808001u), int(0x80808001u), int(0x80808000u), int(0x80808000u)));
    // ... and odd dwords shift their high nibble down.
    const __m256i q = _mm256_srlv_epi32(spread, _mm256_set_epi32(4, 0, 4, 0, 4, 0, 4, 0));
    return _mm256_and_si256(q, _mm256_set1_epi32(0xF));
  }
}

XC_TARGET_AVX2 inline __m256 dequant8(__m256i q, __m256 zp, __m256 s) {
  return _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), zp), s);
}

XC_TARGET_AVX2 inline __m256i tail_mask8(int64_t n) {  // lanes < n all ones
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

XC_TARGET_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// MB * RB accumulators, MB x vectors, and one w at a time: MB <= 2 within 16 ymm registers.
template <int MB, int RB, int BITS>
XC_TARGET_AVX2 void block_avx2(const float* x, const NBits& w, int64_t n0, const float* bias,
                               float* out, int64_t N) {
  const int64_t K = w.K;
  Row row[RB];
  for (int r = 0; r < RB; ++r) row[r] = w.row(n0 + r);
  __m256 acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.k_blocks; ++b) {
    const uint8_t* blk[RB];
    __m256 s[RB];
    __m256 zp[RB];
    for (int r = 0; r < RB; ++r) {
      blk[r] = row[r].q + b * w.blob;
      s[r] = _mm256_set1_ps(row[r].s[b]);
      zp[r] = _mm256_set1_ps(zero_point<BITS>(row[r], b));
    }
    const float* xb = x + b * w.block_size;
    const int64_t len = w.block_len(b);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
      prefetch_ahead<RB>(blk, i * BITS / 8);
      __m256 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(xb + m * K + i);
      for (int r = 0; r < RB; ++r) {
        const __m256 wv = dequant8(load_q8<BITS>(blk[r], i), zp[r], s[r]);
        for (int m = 0; m < MB; ++m) acc[m][r] = _mm256_fmadd_ps(xv[m], wv, acc[m][r]);
      }
    }
    if (i < len) {  // K's tail inside the last block: padding lanes are zeroed in x and w
      const __m256i tail = tail_mask8(len - i);
      __m256 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = _mm256_maskload_ps(xb + m * K + i, tail);
      for (int r = 0; r < RB; ++r) {
        const __m256 wv = _mm256_and_ps(dequant8(load_q8<BITS>(blk[r], i), zp[r], s[r]),
                                        _mm256_castsi256_ps(tail));
        for (int m = 0; m < MB; ++m) acc[m][r] = _mm256_fmadd_ps(xv[m], wv, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) out[m * N + r] = hsum8(acc[m][r]) + (bias ? bias[r] : 0.0f);
}

template <int BITS>
XC_TARGET_AVX2 void dequant_avx2(const NBits& w, int64_t n, float* out) {
  const Row row = w.row(n);
  for (int64_t b = 0; b < w.k_blocks; ++b) {
    const uint8_t* blk = row.q + b * w.blob;
    const __m256 s = _mm256_set1_ps(row.s[b]);
    const __m256 zp = _mm256_set1_ps(zero_point<BITS>(row, b));
    float* ob = out + b * w.block_size;
    const int64_t len = w.block_len(b);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) _mm256_storeu_ps(ob + i, dequant8(load_q8<BITS>(blk, i), zp, s));
    if (i < len)
      _mm256_maskstore_ps(ob + i, tail_mask8(len - i), dequant8(load_q8<BITS>(blk, i), zp, s));
  }
}

// ---- AVX-512 F/BW/VL: 16 lanes, masked tail ----------------------------------------------------
// INT8: q widened to int32, converted, minus zp, times the scale. INT4: a block's 16 possible
// weights (i - zp) * s, i = 0..15, fill one zmm, so dequantizing 16 elements is one vpermps
// indexed by their nibbles (it reads only the low 4 bits of each index).
template <int BITS>
struct Dequant512 {
  __m512 zp, s;
  XC_TARGET_AVX512 void set(float zero_point, float scale) {
    zp = _mm512_set1_ps(zero_point);
    s = _mm512_set1_ps(scale);
  }
  // Weights i .. i + 15 of the block at blk (i a multiple of 16).
  XC_TARGET_AVX512 __m512 operator()(const uint8_t* blk, int64_t i) const {
    const __m512i q =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + i)));
    return _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), zp), s);
  }
};

template <>
struct Dequant512<4> {
  __m512 table;
  XC_TARGET_AVX512 void set(float zero_point, float scale) {
    const __m512 levels = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    table = _mm512_mul_ps(_mm512_sub_ps(levels, _mm512_set1_ps(zero_point)),
                          _mm512_set1_ps(scale));
  }
  XC_TARGET_AVX512 __m512 operator()(const uint8_t* blk, int64_t i) const {
    uint64_t eight;  // 16 nibbles, element j in byte j / 2, the low nibble first
    std::memcpy(&eight, blk + i / 2, 8);
    // Every 128-bit lane gets all 8 bytes; dword j takes byte j / 2 (pshufb index; 0x80: zero) ...
    constexpr auto byte = [](unsigned j) { return int(0x80808000u | j); };
    const __m512i spread = _mm512_shuffle_epi8(
        _mm512_set1_epi64(int64_t(eight)),
        _mm512_set_epi32(byte(7), byte(7), byte(6), byte(6), byte(5), byte(5), byte(4), byte(4),
                         byte(3), byte(3), byte(2), byte(2), byte(1), byte(1), byte(0), byte(0)));
    // ... and odd dwords shift their high nibble down; bits above the low 4 are left over.
    const __m512i q = _mm512_srlv_epi32(
        spread, _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0));
    return _mm512_permutexvar_ps(q, table);
  }
};

// MB * RB accumulators + MB x vectors + one w: MB <= 4 within 32 zmm registers.
template <int MB, int RB, int BITS>
XC_TARGET_AVX512 void block_avx512(const float* x, const NBits& w, int64_t n0, const float* bias,
                                   float* out, int64_t N) {
  const int64_t K = w.K;
  Row row[RB];
  for (int r = 0; r < RB; ++r) row[r] = w.row(n0 + r);
  __m512 acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < w.k_blocks; ++b) {
    const uint8_t* blk[RB];
    Dequant512<BITS> dq[RB];
    for (int r = 0; r < RB; ++r) {
      blk[r] = row[r].q + b * w.blob;
      dq[r].set(zero_point<BITS>(row[r], b), row[r].s[b]);
    }
    const float* xb = x + b * w.block_size;
    const int64_t len = w.block_len(b);
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      prefetch_ahead<RB>(blk, i * BITS / 8);
      __m512 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_ps(xb + m * K + i);
      for (int r = 0; r < RB; ++r) {
        const __m512 wv = dq[r](blk[r], i);
        for (int m = 0; m < MB; ++m) acc[m][r] = _mm512_fmadd_ps(xv[m], wv, acc[m][r]);
      }
    }
    if (i < len) {  // K's tail inside the last block: padding lanes are zeroed in x and w
      const __mmask16 tail = __mmask16((1u << (len - i)) - 1);
      __m512 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = _mm512_maskz_loadu_ps(tail, xb + m * K + i);
      for (int r = 0; r < RB; ++r) {
        const __m512 wv = _mm512_maskz_mov_ps(tail, dq[r](blk[r], i));
        for (int m = 0; m < MB; ++m) acc[m][r] = _mm512_fmadd_ps(xv[m], wv, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r)
      out[m * N + r] = _mm512_reduce_add_ps(acc[m][r]) + (bias ? bias[r] : 0.0f);
}

// INT4 with block_size >= 32: 32 elements per step from one 16-byte load, whose bytes widen to 16
// dwords holding elements 2j (low nibble) and, shifted, 2j + 1: three shuffles per 32 elements
// where Dequant512<4> takes four. x comes permuted to match (permute_x_pairs) and zero-padded to
// whole blocks, so there is no tail to mask.
template <int MB, int RB>
XC_TARGET_AVX512 void block_avx512_int4_pairs(const float* xp, const NBits& w, int64_t n0,
                                              const float* bias, float* out, int64_t N) {
  const int64_t stride = w.k_blocks * w.block_size;  // of the padded, permuted x
  Row row[RB];
  for (int r = 0; r < RB; ++r) row[r] = w.row(n0 + r);
  __m512 acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < w.k_blocks; ++b) {
    const uint8_t* blk[RB];
    Dequant512<4> dq[RB];
    for (int r = 0; r < RB; ++r) {
      blk[r] = row[r].q + b * w.blob;
      dq[r].set(zero_point<4>(row[r], b), row[r].s[b]);
    }
    const float* xb = xp + b * w.block_size;
    const int64_t len = w.block_len(b);
    for (int64_t i = 0; i < len; i += 32) {
      prefetch_ahead<RB>(blk, i / 2);
      __m512 x_even[MB], x_odd[MB];
      for (int m = 0; m < MB; ++m) {
        x_even[m] = _mm512_loadu_ps(xb + m * stride + i);
        x_odd[m] = _mm512_loadu_ps(xb + m * stride + i + 16);
      }
      for (int r = 0; r < RB; ++r) {
        const __m512i q = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk[r] + i / 2)));
        const __m512 w_even = _mm512_permutexvar_ps(q, dq[r].table);
        const __m512 w_odd = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), dq[r].table);
        for (int m = 0; m < MB; ++m) {
          acc[m][r] = _mm512_fmadd_ps(x_even[m], w_even, acc[m][r]);
          acc[m][r] = _mm512_fmadd_ps(x_odd[m], w_odd, acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r)
      out[m * N + r] = _mm512_reduce_add_ps(acc[m][r]) + (bias ? bias[r] : 0.0f);
}

template <int BITS>
XC_TARGET_AVX512 void dequant_avx512(const NBits& w, int64_t n, float* out) {
  const Row row = w.row(n);
  for (int64_t b = 0; b < w.k_blocks; ++b) {
    const uint8_t* blk = row.q + b * w.blob;
    Dequant512<BITS> dq;
    dq.set(zero_point<BITS>(row, b), row.s[b]);
    float* ob = out + b * w.block_size;
    const int64_t len = w.block_len(b);
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) _mm512_storeu_ps(ob + i, dq(blk, i));
    if (i < len) _mm512_mask_storeu_ps(ob + i, __mmask16((1u << (len - i)) - 1), dq(blk, i));
  }
}
#endif

// The kernels of one ISA and bit width: full[mb - 1] takes R weight rows, one[mb - 1] a single
// row (the N % R leftovers), for mb = 1..max_mb rows of x.
struct Table {
  int max_mb;
  BlockFn full[4];
  BlockFn one[4];
  DequantFn dequant;
  bool pairs = false;  // the kernels take x from permute_x_pairs
};

template <int BITS>
Table table_for() {
  switch (current_isa()) {
#if XC_X86
    case Isa::amx:
    case Isa::avx512_bf16:
    case Isa::avx512_vnni:
    case Isa::avx512:
      return {4,
              {block_avx512<1, R, BITS>, block_avx512<2, R, BITS>, block_avx512<3, R, BITS>,
               block_avx512<4, R, BITS>},
              {block_avx512<1, 1, BITS>, block_avx512<2, 1, BITS>, block_avx512<3, 1, BITS>,
               block_avx512<4, 1, BITS>},
              dequant_avx512<BITS>};
    case Isa::avx2:
      return {2,
              {block_avx2<1, R, BITS>, block_avx2<2, R, BITS>},
              {block_avx2<1, 1, BITS>, block_avx2<2, 1, BITS>},
              dequant_avx2<BITS>};
#endif
    default:
      return {1, {block_scalar<1, R, BITS>}, {block_scalar<1, 1, BITS>}, dequant_scalar<BITS>};
  }
}

Table table_for(int bits, int64_t block_size) {
#if XC_X86
  if (bits == 4 && block_size >= 32 && current_isa() >= Isa::avx512)
    return {4,
            {block_avx512_int4_pairs<1, R>, block_avx512_int4_pairs<2, R>,
             block_avx512_int4_pairs<3, R>, block_avx512_int4_pairs<4, R>},
            {block_avx512_int4_pairs<1, 1>, block_avx512_int4_pairs<2, 1>,
             block_avx512_int4_pairs<3, 1>, block_avx512_int4_pairs<4, 1>},
            dequant_avx512<4>,
            true};
#endif
  return bits == 8 ? table_for<8>() : table_for<4>();
}

// x (M, K) -> (M, padded): in each group of 32, the 16 even elements then the 16 odd ones (the
// order block_avx512_int4_pairs multiplies weights in); zeros past K.
std::vector<float> permute_x_pairs(const float* x, int64_t M, int64_t K, int64_t padded) {
  std::vector<float> xp(size_t(M * padded), 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k)
      xp[m * padded + (k & ~int64_t(31)) + (k & 1) * 16 + (k & 31) / 2] = x[m * K + k];
  return xp;
}

bool use_pool(int threads, int64_t N, int64_t K) {
  return threads > 1 && N > R && N * K >= kParallelMinElems;
}

}  // namespace

void gemv_nbits(const float* x, const uint8_t* B, BlockFloats scales, ZeroPoints zero_points,
                const float* bias, float* out, int64_t M, int64_t N, int64_t K, int bits,
                int64_t block_size) {
  const NBits w(B, scales, zero_points, K, bits, block_size);
  const Table table = table_for(bits, block_size);
  std::vector<float> xp;
  int64_t x_stride = K;
  if (table.pairs) {
    x_stride = w.k_blocks * block_size;
    xp = permute_x_pairs(x, M, K, x_stride);
    x = xp.data();
  }
  const int threads = num_threads();
  const int64_t tasks = (N + R - 1) / R;
#pragma omp parallel for schedule(static) num_threads(threads) if (use_pool(threads, N, K))
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t n0 = t * R;
    const int64_t rows = std::min<int64_t>(R, N - n0);
    x_row_chunks(M, table.max_mb, [&](int64_t m0, int mb) {  // each re-dequantizes the rows
      const float* xm = x + m0 * x_stride;
      float* om = out + m0 * N;
      if (rows == R) {
        table.full[mb - 1](xm, w, n0, bias ? bias + n0 : nullptr, om + n0, N);
      } else {
        for (int64_t n = n0; n < n0 + rows; ++n)
          table.one[mb - 1](xm, w, n, bias ? bias + n : nullptr, om + n, N);
      }
    });
  }
}

void dequantize_nbits(const uint8_t* B, BlockFloats scales, ZeroPoints zero_points, float* out,
                      int64_t N, int64_t K, int bits, int64_t block_size) {
  const NBits w(B, scales, zero_points, K, bits, block_size);
  const DequantFn dequant = table_for(bits, block_size).dequant;
  const int threads = num_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (use_pool(threads, N, K))
  for (int64_t n = 0; n < N; ++n) dequant(w, n, out + n * K);
}

}  // namespace xcompile
