// INT8 / INT4 decode matmul on int8-quantized activations (MatMulNBits' accuracy_level 4), with
// AVX512_VNNI's vpdpbusd: 64 u8 x s8 multiply-adds an instruction, where the fp32 path
// (gemv_nbits.cpp) spends three instructions on every 16 weights to widen, convert and scale
// them. With two hyperthreads of one core that path is compute-bound (~10 G weights/s); this
// one reads weights as fast as memory delivers them.
//
// Activations are quantized per row in units of U elements (U = min(block_size, 64 for INT8, 128
// for INT4: one vpdpbusd's worth; 256 flipped greedy tokens of the test models, 64 did not):
//   sx[m, u] = max|x[m, unit u]| / 127,  xq[m, k] = rint(x[m, k] / sx[m, u]) in [-127, 127]
// The weights stay as stored (q unsigned, zero point zp per block, packed uint8 or fp32), so
//   out[m, n] = sum_b s[n, b] * ( sum_{u in b} sx[m, u] * dot_u  -  zp[n, b] * c[m, b] )
//   dot_u = sum_{k in u} q[n, k] * xq[m, k]   (int32, exact)
//   c[m, b] = sum_{u in b} sx[m, u] * sum_{k in u} xq[m, k]   (per x row, shared by all n)
// x is zero-padded to whole blocks: padding weights (zeros) and padding activations add 0.
// INT4 bytes hold element 2j in the low nibble and 2j + 1 in the high one: 64 bytes give the 64
// even then the 64 odd elements of 128, so xq is stored permuted to match, in groups of 128.
// Blocks smaller than one vpdpbusd's unit (several to a 64-byte chunk: INT8 16/32, INT4 16/32/64)
// go to gemv_nbits_vnni_small.cpp; x's unit is then the block.
// Plain reference: task_scalar / row_scalar, the same formula in double, for every block size;
// the Python reference in runtime/kernels.py computes it from torch ops.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#include "dispatch.h"
#include "prefetch.h"
#include "kernels.h"
#include "nbits.h"
#include "quantize_x.h"
#include "threads.h"

#if XC_X86
#include <immintrin.h>
#endif

namespace xcompile {
namespace {

constexpr int R = 4;  // weight rows per task
constexpr int64_t kParallelMinElems = int64_t(1) << 16;
// bytes ahead in the weight stream: 512 left the kernel at 0.59-0.73 of the read bandwidth,
// 2048-8192 at 0.86-0.91 (INT8) and 0.76-0.80 (INT4)
constexpr int64_t kPrefetch = 4096;


#if XC_X86
// One whole unit (x[k0 .. k0 + n), n a multiple of 16) of a row quantized as quantize_x's loop
// does it, 16 at a time, into the row's q: the same amax (NaN ignored: max(|v|, amax) keeps
// amax), the same product rounded half to even (vcvtps2dq under the default rounding mode), the
// same clamp. INT4 (permute): each 16 go to their evens' and odds' places in their group of 128
// (a unit smaller than 128 fills part of one). Returns sum(q); *scale.
XC_TARGET_AVX512 int32_t quantize_unit_avx512(const float* xrow, int64_t k0, int64_t n, int8_t* q,
                                              bool permute, float* scale) {
  const float* x = xrow + k0;
  __m512 amax = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) amax = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + i)), amax);
  const float a = _mm512_reduce_max_ps(amax);
  *scale = a / 127.0f;
  const __m512 inv = _mm512_set1_ps(a > 0.0f ? 127.0f / a : 0.0f);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  const __m512i evens_first = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 16) {
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv));
    v = _mm512_max_epi32(_mm512_min_epi32(v, hi), lo);
    sum = _mm512_add_epi32(sum, v);
    const int64_t k = k0 + i;
    if (!permute) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(v));
    } else {  // k within its group of 128: evens to k/2.., odds to 64 + k/2..
      const __m128i b = _mm512_cvtepi32_epi8(_mm512_permutexvar_epi32(evens_first, v));
      int8_t* group = q + (k & ~int64_t(127));
      const int64_t at = (k & 127) / 2;
      _mm_storel_epi64(reinterpret_cast<__m128i*>(group + at), b);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(group + 64 + at), _mm_unpackhi_epi64(b, b));
    }
  }
  return _mm512_reduce_add_epi32(sum);
}
#endif


// ---- scalar: the plain path the VNNI kernel is held to ----------------------------------------
template <int BITS>
void row_scalar(const QuantizedX& qx, const NBits& w, int64_t m, int64_t n, const float* bias,
                float* out) {
  const Row row = w.row(n);
  const int8_t* xq = qx.q.data() + m * qx.padded;
  double total = 0.0;
  for (int64_t b = 0; b < w.k_blocks; ++b) {
    const uint8_t* blk = row.q + b * w.blob;
    double block_sum = 0.0;
    for (int64_t u0 = 0; u0 < w.block_size; u0 += qx.unit) {
      int64_t dot = 0;
      for (int64_t i = u0; i < u0 + qx.unit; ++i) {
        const int64_t k = b * w.block_size + i;
        int q;
        int64_t at = k;
        if constexpr (BITS == 8) {
          q = blk[i];
        } else {  // element i of the block, and where its activation sits in the permuted xq
          q = (i & 1) ? blk[i / 2] >> 4 : blk[i / 2] & 0xF;
          at = (k & ~int64_t(127)) + (k & 1) * 64 + (k & 127) / 2;
        }
        dot += int64_t(q) * xq[at];
      }
      block_sum += double(qx.scale[m * qx.units + (b * w.block_size + u0) / qx.unit]) * double(dot);
    }
    block_sum -= double(zero_point<BITS>(row, b)) * double(qx.c[m * qx.k_blocks + b]);
    total += double(row.s[b]) * block_sum;
  }
  *out = float(total) + (bias ? *bias : 0.0f);
}

template <int BITS>
void task_scalar(const QuantizedX& qx, const NBits& w, int64_t M, int64_t n0, int64_t rows,
                 const float* bias, float* out, int64_t N) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n0 + rows; ++n)
      row_scalar<BITS>(qx, w, m, n, bias ? bias + n : nullptr, out + m * N + n);
}

#if XC_X86
// ---- AVX512_VNNI -------------------------------------------------------------------------------
// One row of x (decode) times one weight row: the general kernel's work without its MB x RB
// bookkeeping. A unit is one vpdpbusd (INT8: 64 weights) or two (INT4: 128), and a block holds
// per_block units. The general kernel spent ~45 instructions per INT4 block (24 cycles, 0.7 of
// the read bandwidth on 2 threads); this one ~12, two accumulators to hide the FMA latency.
template <int BITS>
XC_TARGET_VNNI __attribute__((always_inline)) inline __m512i unit_dot(const uint8_t* wq, const int8_t* xq, __m512i low4) {
  const __m512i packed = _mm512_loadu_si512(wq);
  if constexpr (BITS == 8) {
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), packed, _mm512_loadu_si512(xq));
  } else {
    const __m512i even = _mm512_and_si512(packed, low4);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), even, _mm512_loadu_si512(xq));
    return _mm512_dpbusd_epi32(dot, odd, _mm512_loadu_si512(xq + 64));
  }
}

// unit_dot as fp32 lanes, prefetching the weight stream ahead
template <int BITS>
XC_TARGET_VNNI __attribute__((always_inline)) inline __m512 unit_dot_ps(const uint8_t* wq, const int8_t* xq, __m512i low4) {
  prefetch_stream(wq + kPrefetch);
  return _mm512_cvtepi32_ps(unit_dot<BITS>(wq, xq, low4));
}

// v[j] (16 int32 lanes each) -> lane j = the sum of v[j]'s lanes, by a transpose-and-add tree
// (45 shuffles and adds for 16 vectors, mostly on the shuffle port, where 16 conversions and
// FMAs would compete with vpdpbusd for port 0).
XC_TARGET_VNNI __attribute__((always_inline)) inline __m512i sum_lanes16(const __m512i* v) {
  __m512i t[8], u[4];
  for (int k = 0; k < 8; ++k)  // per 128-bit chunk: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[k] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * k], v[2 * k + 1]),
                            _mm512_unpackhi_epi32(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k)  // per chunk c: the chunk sums of v[4k .. 4k+3]
    u[k] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * k], t[2 * k + 1]),
                            _mm512_unpackhi_epi64(t[2 * k], t[2 * k + 1]));
  const __m512i w01 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x88),
                                       _mm512_shuffle_i32x4(u[0], u[1], 0xDD));
  const __m512i w23 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], 0x88),
                                       _mm512_shuffle_i32x4(u[2], u[3], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(w01, w23, 0x88),
                          _mm512_shuffle_i32x4(w01, w23, 0xDD));
}

// One row of x (decode) times weight rows n0 .. n0 + rows - 1, each row on its own (one linear
// stream). The unit is a compile-time constant (task_for: here blocks hold whole
// units), so x's units sit at fixed offsets; the per-row work outside the unit loop is the
// row's pointers and one horizontal sum.
template <int BITS>
XC_TARGET_VNNI void row_vnni(const QuantizedX& qx, const NBits& w, int64_t n0, int64_t rows,
                             const float* bias, float* out) {
  constexpr int64_t kUnitBytes = 64;  // weight bytes per unit, both widths
  constexpr int64_t unit = unit_for(BITS);
  const int8_t* xq = qx.q.data();
  const float* sx = qx.scale.data();
  const float* cx = qx.c.data();
  const int64_t per_block = w.block_size / unit, k_blocks = w.k_blocks;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
#define dot(u) unit_dot_ps<BITS>(wq + (u) * kUnitBytes, xq + (u) * unit, low4)
  for (int64_t n = n0; n < n0 + rows; ++n) {
    const Row row = w.row(n);
    const uint8_t* wq = row.q;
    // two accumulators, named (an array indexed by b & 1 went through the stack)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    // zero-point terms s * zp * c, lane by lane where a block is a unit (a scalar loop over every
    // block cost ~30 % of an INT4 row of K=2048); `correction` takes them for larger blocks
    __m512 corrections = _mm512_setzero_ps();
    float correction = 0.0f;
    if (per_block == 1) {  // a block is a unit: one scale product per unit
      int64_t b = 0;
      // 16 blocks at a time: their int32 dots summed into one vector (lane j: block b + j), then
      // one conversion and one FMA by the 16 scale products
      for (; b + 16 <= k_blocks; b += 16) {
        __m512i d[16];
        for (int j = 0; j < 16; ++j) {
          prefetch_stream(wq + (b + j) * kUnitBytes + kPrefetch);
          d[j] = unit_dot<BITS>(wq + (b + j) * kUnitBytes, xq + (b + j) * unit, low4);
        }
        const __m512 s = floats16(row.s, b);
        corrections = _mm512_fmadd_ps(_mm512_mul_ps(s, zero_points16<BITS>(row, b)),
                                      _mm512_loadu_ps(cx + b), corrections);
        const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(sx + b), s);
        if (b & 16)
          acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_lanes16(d)), scale, acc1);
        else
          acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_lanes16(d)), scale, acc0);
      }
      if (b < k_blocks) {  // the last, fewer than 16, blocks (all of a 576-column row's 9): their
        // scale products and zero-point terms on masked vectors (read one by one, fp16 scales
        // took a conversion each), the products then broadcast from a stack copy
        const __mmask16 live = __mmask16((1u << (k_blocks - b)) - 1);
        const __m512 s = floats16(row.s, b, live);
        corrections = _mm512_fmadd_ps(_mm512_mul_ps(s, zero_points16<BITS>(row, b, live)),
                                      _mm512_maskz_loadu_ps(live, cx + b), corrections);
        alignas(64) float p[16];
        _mm512_store_ps(p, _mm512_mul_ps(_mm512_maskz_loadu_ps(live, sx + b), s));
        for (int64_t j = 0, b0 = b; b0 + j < k_blocks; j += 2) {  // p[j]: block b0 + j's product
          acc0 = _mm512_fmadd_ps(dot(b0 + j), _mm512_set1_ps(p[j]), acc0);
          if (b0 + j + 1 < k_blocks)
            acc1 = _mm512_fmadd_ps(dot(b0 + j + 1), _mm512_set1_ps(p[j + 1]), acc1);
        }
      }
    } else {  // per_block is a power of two >= 2
      for (int64_t b = 0; b < k_blocks; ++b) {
        __m512 in0 = _mm512_setzero_ps(), in1 = _mm512_setzero_ps();
        for (int64_t u = b * per_block, end = u + per_block; u < end; u += 2) {
          in0 = _mm512_fmadd_ps(dot(u), _mm512_set1_ps(sx[u]), in0);
          in1 = _mm512_fmadd_ps(dot(u + 1), _mm512_set1_ps(sx[u + 1]), in1);
        }
        if (b & 1)
          acc1 = _mm512_fmadd_ps(_mm512_add_ps(in0, in1), _mm512_set1_ps(row.s[b]), acc1);
        else
          acc0 = _mm512_fmadd_ps(_mm512_add_ps(in0, in1), _mm512_set1_ps(row.s[b]), acc0);
        correction += row.s[b] * zero_point<BITS>(row, b) * cx[b];
      }
    }
    const __m512 sum = _mm512_sub_ps(_mm512_add_ps(acc0, acc1), corrections);
    out[n] = _mm512_reduce_add_ps(sum) - correction + (bias ? bias[n] : 0.0f);
  }
#undef dot
}

// MB rows of x times RB weight rows: each weight unit is loaded and unpacked once for all MB
// rows, each x unit and its scale once for all RB weight rows. Arrays are indexed by the unrolled
// m and r only (kept in registers). RB = 1 for a few rows (batched decode: the weight stream
// stays linear), RB = 4 with MB = 2 for prefill (fewer loads and broadcasts per multiply-add).
template <int BITS, int MB, int RB>
XC_TARGET_VNNI void rows_vnni(const QuantizedX& qx, const NBits& w, int64_t m0, int64_t n0,
                              const float* bias, float* out, int64_t N) {
  constexpr int64_t kUnitBytes = 64;
  Row row[RB];
  for (int r = 0; r < RB; ++r) row[r] = w.row(n0 + r);
  const int8_t* xq = qx.q.data() + m0 * qx.padded;
  const float* sx = qx.scale.data() + m0 * qx.units;
  const float* cx = qx.c.data() + m0 * qx.k_blocks;
  const int64_t per_block = w.block_size / qx.unit, unit = qx.unit;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MB][RB];
  float correction[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps(), correction[m][r] = 0.0f;
  for (int64_t b = 0, u = 0; b < w.k_blocks; ++b) {
    __m512 in_block[MB][RB];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < RB; ++r) in_block[m][r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < per_block; ++j, ++u) {
      __m512i lo[RB], hi[RB];
      for (int r = 0; r < RB; ++r) {
        const uint8_t* wq = row[r].q + u * kUnitBytes;
        prefetch_stream(wq + kPrefetch);
        lo[r] = hi[r] = _mm512_loadu_si512(wq);
        if constexpr (BITS == 4) {
          hi[r] = _mm512_and_si512(_mm512_srli_epi16(lo[r], 4), low4);
          lo[r] = _mm512_and_si512(lo[r], low4);
        }
      }
      for (int m = 0; m < MB; ++m) {
        const int8_t* xm = xq + m * qx.padded + u * unit;
        const __m512i x_lo = _mm512_loadu_si512(xm);
        __m512i x_hi = x_lo;
        if constexpr (BITS == 4) x_hi = _mm512_loadu_si512(xm + 64);
        const __m512 scale = _mm512_set1_ps(sx[m * qx.units + u]);
        for (int r = 0; r < RB; ++r) {
          __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], x_lo);
          if constexpr (BITS == 4) dot = _mm512_dpbusd_epi32(dot, hi[r], x_hi);
          in_block[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, in_block[m][r]);
        }
      }
    }
    for (int r = 0; r < RB; ++r) {
      const float zp_s = row[r].s[b] * zero_point<BITS>(row[r], b);
      for (int m = 0; m < MB; ++m) {
        acc[m][r] = _mm512_fmadd_ps(in_block[m][r], _mm512_set1_ps(row[r].s[b]), acc[m][r]);
        correction[m][r] += zp_s * cx[m * qx.k_blocks + b];
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r)
      out[(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(acc[m][r]) - correction[m][r] +
                                   (bias ? bias[n0 + r] : 0.0f);
}

// Weight rows one at a time, so each thread reads its share of B as one linear stream (rows are
// contiguous), which the prefetchers follow; interleaving 4 rows (4 short streams) read INT8 at
// 0.73 and INT4 at 0.36 of the machine's read bandwidth, one row at a time at 0.87 and 0.78
// (benchmarks/gemv_nbits.py, N=5632 K=2048, 2 threads).
template <int BITS>
void task_vnni(const QuantizedX& qx, const NBits& w, int64_t M, int64_t n0, int64_t rows,
               const float* bias, float* out, int64_t N) {
  if (M == 1) {
    row_vnni<BITS>(qx, w, n0, rows, bias, out);
    return;
  }
  if (M <= 4) {  // batched decode: one weight row at a time, all of x's rows on it
    for (int64_t n = n0; n < n0 + rows; ++n) {
      if (M == 4) rows_vnni<BITS, 4, 1>(qx, w, 0, n, bias, out, N);
      else if (M == 3) rows_vnni<BITS, 3, 1>(qx, w, 0, n, bias, out, N);
      else rows_vnni<BITS, 2, 1>(qx, w, 0, n, bias, out, N);
    }
    return;
  }
  // Prefill: pairs of x's rows outside, the task's R weight rows inside (both stay in L1 while
  // they meet; sweeping all of x per weight row read a 128-token prefill's x from L2 each time)
  for (int64_t m = 0; m < M; m += 2) {
    const bool pair = m + 2 <= M;
    if (rows == R) {
      if (pair) rows_vnni<BITS, 2, R>(qx, w, m, n0, bias, out, N);
      else rows_vnni<BITS, 1, R>(qx, w, m, n0, bias, out, N);
    } else {
      for (int64_t n = n0; n < n0 + rows; ++n) {
        if (pair) rows_vnni<BITS, 2, 1>(qx, w, m, n, bias, out, N);
        else rows_vnni<BITS, 1, 1>(qx, w, m, n, bias, out, N);
      }
    }
  }
}
#endif

using TaskFn = void (*)(const QuantizedX&, const NBits&, int64_t, int64_t, int64_t, const float*,
                        float*, int64_t);

TaskFn task_for(int bits, int64_t block_size) {
#if XC_X86
  if (current_isa() >= Isa::avx512_vnni) {
    if (block_size < unit_for(bits)) return bits == 8 ? task_vnni_small<8> : task_vnni_small<4>;
    return bits == 8 ? task_vnni<8> : task_vnni<4>;
  }
#endif
  return bits == 8 ? task_scalar<8> : task_scalar<4>;
}

}  // namespace

QuantizedX quantize_x(const float* x, int64_t M, const NBits& w, int bits, bool natural) {
  const bool permute = bits == 4 && !natural;
  QuantizedX qx;
  qx.k_blocks = w.k_blocks;
  const int64_t chunk = unit_for(bits);
  qx.padded = (w.k_blocks * w.block_size + chunk - 1) / chunk * chunk;
  qx.unit = std::min<int64_t>(w.block_size, chunk);
  qx.units = w.k_blocks * w.block_size / qx.unit;
  qx.q.assign(size_t(M * qx.padded), 0);
  qx.scale.assign(size_t(M * qx.units), 0.0f);
  qx.c.assign(size_t(M * qx.k_blocks), 0.0f);
  const int64_t per_block = w.block_size / qx.unit;
#if XC_X86
  const bool vector = current_isa() >= Isa::avx512 && qx.unit % 16 == 0;
#endif
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * w.K;
    int8_t* qm = qx.q.data() + m * qx.padded;
    for (int64_t u = 0; u < qx.units; ++u) {
      const int64_t k0 = u * qx.unit, k1 = std::min(k0 + qx.unit, w.K);
#if XC_X86
      if (vector && k1 - k0 == qx.unit) {  // a whole unit: the same numbers, 16 at a time
        float& s = qx.scale[m * qx.units + u];
        const int32_t sum = quantize_unit_avx512(xm, k0, qx.unit, qm, permute, &s);
        qx.c[m * qx.k_blocks + u / per_block] += s * float(sum);
        continue;
      }
#endif
      float amax = 0.0f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(xm[k]));
      const float s = amax / 127.0f;
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int32_t sum = 0;
      for (int64_t k = k0; k < k1; ++k) {
        // round half to even, as rint under the default rounding mode, without a libm call:
        // |x * inv| <= 127, far inside the range where adding 1.5 * 2^23 rounds exactly
        const int32_t v = int32_t((xm[k] * inv + 12582912.0f) - 12582912.0f);
        const int8_t q = int8_t(std::clamp(v, -127, 127));
        sum += q;
        // INT4: position of element k in its group of 128 -> evens first, then odds
        const int64_t at = !permute ? k : (k & ~int64_t(127)) + (k & 1) * 64 + (k & 127) / 2;
        qm[at] = q;
      }
      qx.scale[m * qx.units + u] = s;
      qx.c[m * qx.k_blocks + u / per_block] += s * float(sum);
    }
  }
  return qx;
}

bool gemv_nbits_q8_supported(int bits, int64_t block_size) {
  return (bits == 8 || bits == 4) && block_size >= 16;
}

void gemv_nbits_q8(const float* x, const uint8_t* B, BlockFloats scales,
                   ZeroPoints zero_points, const float* bias, float* out, int64_t M, int64_t N,
                   int64_t K, int bits, int64_t block_size) {
  // AMX tiles for a prompt, or a batched decode step of 5 rows and more; up to 4 rows the VNNI
  // kernel streams one weight row at a time, prefetched into L2 (the tiles read 16 rows at once).
  // 2 threads, weights from DRAM, 4 rows: INT8 per channel 11264 x 2048 tiles 1239 us, VNNI 981
  // (one row: 893); 2048 x 5632 525 / 520. Cache-resident (session 9) INT8 blocks of 64 / 2048,
  // 8 rows: tiles 531 / 275 us against VNNI 1243 / 726; INT4 blocks of 128, 4 rows 371 on tiles,
  // 328 VNNI; 8 rows 392 against 684.
  constexpr int64_t tile_rows = 5;
  if (current_isa() == Isa::amx && M >= tile_rows && N % 16 == 0 && block_size >= unit_for(bits))
    return gemm_nbits_q8_tiles(x, B, scales, zero_points, bias, out, M, N, K, bits, block_size,
                               /*emulate=*/false);
  if (M >= kGemmMinRows && gemm_nbits_vnni_supported(bits, block_size))  // a prompt, VNNI
    return gemm_nbits_vnni(x, B, scales, zero_points, bias, out, M, N, K, bits, block_size);
  const NBits w(B, scales, zero_points, K, bits, block_size);
  const QuantizedX qx = quantize_x(x, M, w, bits);
  const TaskFn task = task_for(bits, block_size);
  const int threads = num_threads();
  const int64_t tasks = (N + R - 1) / R;
  const bool pool = threads > 1 && N > R && N * K >= kParallelMinElems;
  const int64_t grain = chunk_tasks(R * w.k_blocks * w.block_size, tasks, threads);
  for_runs(tasks, threads, grain, pool, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * R;
      task(qx, w, M, n0, std::min<int64_t>(R, N - n0), bias, out, N);
    }
  });
}

}  // namespace xcompile
