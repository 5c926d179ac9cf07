// RMSNorm over the last dimension, fp32 (transformers' LlamaRMSNorm):
//   out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight
// x (rows, cols), weight (cols), out (rows, cols); out may alias x (each row is fully read for its
// sum of squares before any element of it is written).
//
// And the residual form (ONNX Runtime's com.microsoft SkipSimplifiedLayerNormalization, no bias):
//   sum_out[r, :] = x[r, :] + skip[r, :];  out[r, :] = rmsnorm(sum_out[r, :]) * weight
// sum_out may alias x or skip (elementwise: each sum is written where its operands were just
// read); out may alias x or skip too, since the second pass reads only sum_out. out must not alias
// sum_out (both are results).
#include <omp.h>

#include <cmath>
#include <cstdint>

#include "dispatch.h"
#include "kernels.h"
#include "threads.h"

#if XC_X86
#include <immintrin.h>
#endif

namespace xcompile {
namespace {

using RowFn = void (*)(const float* x, const float* weight, float* out, int64_t cols, float eps);
using SkipRowFn = void (*)(const float* x, const float* skip, const float* weight, float* out,
                           float* sum_out, int64_t cols, float eps);

// Reference path: double sum of squares, so it is at least as accurate as the vector paths.
void apply_scalar(const float* x, const float* weight, float* out, int64_t cols, double sum_sq,
                  float eps) {
  const float scale = float(1.0 / std::sqrt(sum_sq / double(cols) + double(eps)));
  for (int64_t k = 0; k < cols; ++k) out[k] = (x[k] * scale) * weight[k];
}

void row_scalar(const float* x, const float* weight, float* out, int64_t cols, float eps) {
  double sum_sq = 0.0;
  for (int64_t k = 0; k < cols; ++k) sum_sq += double(x[k]) * double(x[k]);
  apply_scalar(x, weight, out, cols, sum_sq, eps);
}

void skip_row_scalar(const float* x, const float* skip, const float* weight, float* out,
                     float* sum_out, int64_t cols, float eps) {
  double sum_sq = 0.0;
  for (int64_t k = 0; k < cols; ++k) {
    const float s = x[k] + skip[k];  // rounded to fp32 first, as torch's x + skip is
    sum_out[k] = s;
    sum_sq += double(s) * double(s);
  }
  apply_scalar(sum_out, weight, out, cols, sum_sq, eps);
}

#if XC_X86
XC_TARGET_AVX2 float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Loads x[k:k+8], or x[k:k+8] + skip[k:k+8] (also stored to sum_out) when Skip.
template <bool Skip>
XC_TARGET_AVX2 inline __m256 load_avx2(const float* x, const float* skip, float* sum_out,
                                       int64_t k) {
  if (!Skip) return _mm256_loadu_ps(x + k);
  const __m256 s = _mm256_add_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(skip + k));
  _mm256_storeu_ps(sum_out + k, s);
  return s;
}

template <bool Skip>
XC_TARGET_AVX2 float sum_sq_avx2(const float* x, const float* skip, float* sum_out, int64_t cols) {
  // Four accumulators: the FMA latency (4 cycles) would otherwise serialise the sum.
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  int64_t k = 0;
  for (; k + 32 <= cols; k += 32) {
    const __m256 v0 = load_avx2<Skip>(x, skip, sum_out, k);
    const __m256 v1 = load_avx2<Skip>(x, skip, sum_out, k + 8);
    const __m256 v2 = load_avx2<Skip>(x, skip, sum_out, k + 16);
    const __m256 v3 = load_avx2<Skip>(x, skip, sum_out, k + 24);
    acc0 = _mm256_fmadd_ps(v0, v0, acc0);
    acc1 = _mm256_fmadd_ps(v1, v1, acc1);
    acc2 = _mm256_fmadd_ps(v2, v2, acc2);
    acc3 = _mm256_fmadd_ps(v3, v3, acc3);
  }
  for (; k + 8 <= cols; k += 8) {
    const __m256 v = load_avx2<Skip>(x, skip, sum_out, k);
    acc0 = _mm256_fmadd_ps(v, v, acc0);
  }
  float sum_sq = hsum_avx2(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; k < cols; ++k) {
    const float v = Skip ? x[k] + skip[k] : x[k];
    if (Skip) sum_out[k] = v;
    sum_sq += v * v;
  }
  return sum_sq;
}

XC_TARGET_AVX2 void apply_avx2(const float* x, const float* weight, float* out, int64_t cols,
                               float sum_sq, float eps) {
  const float scale = 1.0f / std::sqrt(sum_sq / float(cols) + eps);
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t k = 0;
  for (; k + 8 <= cols; k += 8) {
    const __m256 normed = _mm256_mul_ps(_mm256_loadu_ps(x + k), vscale);
    _mm256_storeu_ps(out + k, _mm256_mul_ps(normed, _mm256_loadu_ps(weight + k)));
  }
  for (; k < cols; ++k) out[k] = (x[k] * scale) * weight[k];
}

XC_TARGET_AVX2 void row_avx2(const float* x, const float* weight, float* out, int64_t cols,
                             float eps) {
  apply_avx2(x, weight, out, cols, sum_sq_avx2<false>(x, nullptr, nullptr, cols), eps);
}

XC_TARGET_AVX2 void skip_row_avx2(const float* x, const float* skip, const float* weight,
                                  float* out, float* sum_out, int64_t cols, float eps) {
  apply_avx2(sum_out, weight, out, cols, sum_sq_avx2<true>(x, skip, sum_out, cols), eps);
}

template <bool Skip>
XC_TARGET_AVX512 inline __m512 load_avx512(const float* x, const float* skip, float* sum_out,
                                           int64_t k, __mmask16 lanes = 0xffff) {
  if (!Skip) return _mm512_maskz_loadu_ps(lanes, x + k);
  const __m512 s =
      _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, x + k), _mm512_maskz_loadu_ps(lanes, skip + k));
  _mm512_mask_storeu_ps(sum_out + k, lanes, s);
  return s;
}

template <bool Skip>
XC_TARGET_AVX512 float sum_sq_avx512(const float* x, const float* skip, float* sum_out,
                                     int64_t cols) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  int64_t k = 0;
  for (; k + 64 <= cols; k += 64) {
    const __m512 v0 = load_avx512<Skip>(x, skip, sum_out, k);
    const __m512 v1 = load_avx512<Skip>(x, skip, sum_out, k + 16);
    const __m512 v2 = load_avx512<Skip>(x, skip, sum_out, k + 32);
    const __m512 v3 = load_avx512<Skip>(x, skip, sum_out, k + 48);
    acc0 = _mm512_fmadd_ps(v0, v0, acc0);
    acc1 = _mm512_fmadd_ps(v1, v1, acc1);
    acc2 = _mm512_fmadd_ps(v2, v2, acc2);
    acc3 = _mm512_fmadd_ps(v3, v3, acc3);
  }
  for (; k + 16 <= cols; k += 16) {
    const __m512 v = load_avx512<Skip>(x, skip, sum_out, k);
    acc0 = _mm512_fmadd_ps(v, v, acc0);
  }
  if (k < cols) {  // masked tail: lanes past cols load as 0 and add nothing
    const __mmask16 tail = __mmask16((1u << (cols - k)) - 1);
    const __m512 v = load_avx512<Skip>(x, skip, sum_out, k, tail);
    acc1 = _mm512_fmadd_ps(v, v, acc1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
}

XC_TARGET_AVX512 void apply_avx512(const float* x, const float* weight, float* out, int64_t cols,
                                   float sum_sq, float eps) {
  const float scale = 1.0f / std::sqrt(sum_sq / float(cols) + eps);
  const __m512 vscale = _mm512_set1_ps(scale);
  int64_t k = 0;
  for (; k + 16 <= cols; k += 16) {
    const __m512 normed = _mm512_mul_ps(_mm512_loadu_ps(x + k), vscale);
    _mm512_storeu_ps(out + k, _mm512_mul_ps(normed, _mm512_loadu_ps(weight + k)));
  }
  if (k < cols) {
    const __mmask16 tail = __mmask16((1u << (cols - k)) - 1);
    const __m512 normed = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, x + k), vscale);
    _mm512_mask_storeu_ps(out + k, tail, _mm512_mul_ps(normed, _mm512_maskz_loadu_ps(tail, weight + k)));
  }
}

XC_TARGET_AVX512 void row_avx512(const float* x, const float* weight, float* out, int64_t cols,
                                 float eps) {
  apply_avx512(x, weight, out, cols, sum_sq_avx512<false>(x, nullptr, nullptr, cols), eps);
}

XC_TARGET_AVX512 void skip_row_avx512(const float* x, const float* skip, const float* weight,
                                      float* out, float* sum_out, int64_t cols, float eps) {
  apply_avx512(sum_out, weight, out, cols, sum_sq_avx512<true>(x, skip, sum_out, cols), eps);
}
#endif

RowFn row_kernel() {
  switch (current_isa()) {
#if XC_X86
    case Isa::amx:
    case Isa::avx512_bf16:
    case Isa::avx512_vnni:
    case Isa::avx512: return row_avx512;
    case Isa::avx2: return row_avx2;
#endif
    default: return row_scalar;
  }
}

SkipRowFn skip_row_kernel() {
  switch (current_isa()) {
#if XC_X86
    case Isa::amx:
    case Isa::avx512_bf16:
    case Isa::avx512_vnni:
    case Isa::avx512: return skip_row_avx512;
    case Isa::avx2: return skip_row_avx2;
#endif
    default: return skip_row_scalar;
  }
}

// One row (decode) is a few microseconds: waking the pool would cost more than it saves.
bool use_pool(int threads, int64_t rows, int64_t cols) {
  return threads > 1 && rows > 1 && rows * cols >= (int64_t(1) << 15);
}

}  // namespace

void rmsnorm(const float* x, const float* weight, float* out, int64_t rows, int64_t cols, float eps) {
  const RowFn row = row_kernel();
  const int threads = num_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (use_pool(threads, rows, cols))
  for (int64_t r = 0; r < rows; ++r) row(x + r * cols, weight, out + r * cols, cols, eps);
}

void skip_rmsnorm(const float* x, const float* skip, const float* weight, float* out,
                  float* sum_out, int64_t rows, int64_t cols, float eps) {
  const SkipRowFn row = skip_row_kernel();
  const int threads = num_threads();
#pragma omp parallel for schedule(static) num_threads(threads) if (use_pool(threads, rows, cols))
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * cols;
    row(x + o, skip + o, weight, out + o, sum_out + o, cols, eps);
  }
}

}  // namespace xcompile
