// Rotary position embedding, fp32, applied per head to the first rotary_dim dims of each head:
//   x (tokens, heads, head_dim): token stride x_stride (elements), heads contiguous within a token
//   cos, sin (tokens, rotary_dim / 2): the raw cos(p * inv_freq), sin(p * inv_freq) of each token's
//     position p, not duplicated to rotary_dim
//   out like x with token stride out_stride; out may be x itself (in place)
// Each rotated pair (a, b) with angle index i becomes (a cos_i - b sin_i, b cos_i + a sin_i):
//   half-split (Llama's rotate_half, GPT-NeoX):  a = x[i], b = x[i + rotary_dim / 2]
//   interleaved (GPT-J's rotate_every_two):      a = x[2i], b = x[2i + 1]
// Dims rotary_dim .. head_dim - 1 pass through unchanged (partial rotary: GPT-J, Phi).
// ONNX Runtime's com.microsoft RotaryEmbedding (interleaved attribute) computes the same thing
// from position ids and a cos/sin cache; gathering the rows by position is the caller's.
#include <omp.h>

#include <cstdint>
#include <cstring>

#include "dispatch.h"
#include "kernels.h"
#include "threads.h"

#if XC_X86
#include <immintrin.h>
#endif

namespace xcompile {
namespace {

// Rotates one head's first 2 * half dims; cos, sin are that token's rows (half).
using HeadFn = void (*)(const float* x, const float* cos, const float* sin, float* out,
                        int64_t half);

void half_split_scalar(const float* x, const float* cos, const float* sin, float* out,
                       int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    out[i] = a * cos[i] - b * sin[i];
    out[i + half] = b * cos[i] + a * sin[i];
  }
}

void interleaved_scalar(const float* x, const float* cos, const float* sin, float* out,
                        int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[2 * i], b = x[2 * i + 1];
    out[2 * i] = a * cos[i] - b * sin[i];
    out[2 * i + 1] = b * cos[i] + a * sin[i];
  }
}

#if XC_X86
XC_TARGET_AVX2 void half_split_avx2(const float* x, const float* cos, const float* sin,
                                    float* out, int64_t half) {
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + half + i);
    const __m256 c = _mm256_loadu_ps(cos + i), s = _mm256_loadu_ps(sin + i);
    _mm256_storeu_ps(out + i, _mm256_fmsub_ps(a, c, _mm256_mul_ps(b, s)));
    _mm256_storeu_ps(out + half + i, _mm256_fmadd_ps(b, c, _mm256_mul_ps(a, s)));
  }
  for (; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    out[i] = a * cos[i] - b * sin[i];
    out[i + half] = b * cos[i] + a * sin[i];
  }
}

// Interleaved pairs sit in adjacent lanes: with c, s duplicated to (c0, c0, c1, c1, ...) and
// x's pairs swapped (b0, a0, b1, a1, ...), fmaddsub gives a c - b s in even lanes and b c + a s
// in odd ones.
XC_TARGET_AVX2 void interleaved_avx2(const float* x, const float* cos, const float* sin,
                                     float* out, int64_t half) {
  const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  int64_t i = 0;
  for (; i + 4 <= half; i += 4) {
    const __m256 v = _mm256_loadu_ps(x + 2 * i);
    const __m256 c = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(cos + i)), dup);
    const __m256 s = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sin + i)), dup);
    const __m256 swapped = _mm256_permute_ps(v, 0xB1);
    _mm256_storeu_ps(out + 2 * i, _mm256_fmaddsub_ps(v, c, _mm256_mul_ps(swapped, s)));
  }
  for (; i < half; ++i) {
    const float a = x[2 * i], b = x[2 * i + 1];
    out[2 * i] = a * cos[i] - b * sin[i];
    out[2 * i + 1] = b * cos[i] + a * sin[i];
  }
}

XC_TARGET_AVX512 void half_split_avx512(const float* x, const float* cos, const float* sin,
                                        float* out, int64_t half) {
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 lanes = half - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (half - i)) - 1);
    const __m512 a = _mm512_maskz_loadu_ps(lanes, x + i);
    const __m512 b = _mm512_maskz_loadu_ps(lanes, x + half + i);
    const __m512 c = _mm512_maskz_loadu_ps(lanes, cos + i);
    const __m512 s = _mm512_maskz_loadu_ps(lanes, sin + i);
    _mm512_mask_storeu_ps(out + i, lanes, _mm512_fmsub_ps(a, c, _mm512_mul_ps(b, s)));
    _mm512_mask_storeu_ps(out + half + i, lanes, _mm512_fmadd_ps(b, c, _mm512_mul_ps(a, s)));
  }
}

XC_TARGET_AVX512 void interleaved_avx512(const float* x, const float* cos, const float* sin,
                                         float* out, int64_t half) {
  const __m512i dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  for (int64_t i = 0; i < half; i += 8) {
    const int64_t pairs = half - i >= 8 ? 8 : half - i;
    const __mmask8 angles = __mmask8((1u << pairs) - 1);
    const __mmask16 lanes = __mmask16((1u << (2 * pairs)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(lanes, x + 2 * i);
    const __m512 c =
        _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_maskz_loadu_ps(angles, cos + i)));
    const __m512 s =
        _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_maskz_loadu_ps(angles, sin + i)));
    const __m512 swapped = _mm512_permute_ps(v, 0xB1);
    _mm512_mask_storeu_ps(out + 2 * i, lanes, _mm512_fmaddsub_ps(v, c, _mm512_mul_ps(swapped, s)));
  }
}
#endif

HeadFn head_kernel(bool interleaved) {
  switch (current_isa()) {
#if XC_X86
    case Isa::amx:
    case Isa::avx512_bf16:
    case Isa::avx512_vnni:
    case Isa::avx512: return interleaved ? interleaved_avx512 : half_split_avx512;
    case Isa::avx2: return interleaved ? interleaved_avx2 : half_split_avx2;
#endif
    default: return interleaved ? interleaved_scalar : half_split_scalar;
  }
}

}  // namespace

void rotary(const float* x, const float* cos, const float* sin, float* out, int64_t tokens,
            int64_t heads, int64_t head_dim, int64_t rotary_dim, bool interleaved,
            int64_t x_stride, int64_t out_stride, const int64_t* positions) {
  const HeadFn head = head_kernel(interleaved);
  const int64_t half = rotary_dim / 2, tasks = tokens * heads;
  const int threads = num_threads();
  // Decode (one token) is well under a microsecond per head: the pool only pays off in prefill.
  const bool parallel = threads > 1 && tasks > 1 && tasks * head_dim >= (int64_t(1) << 15);
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t t = task / heads, h = task % heads;
    const float* xh = x + t * x_stride + h * head_dim;
    float* oh = out + t * out_stride + h * head_dim;
    const int64_t row = positions ? positions[t] : t;
    head(xh, cos + row * half, sin + row * half, oh, half);
    if (oh != xh && head_dim > rotary_dim)
      std::memcpy(oh + rotary_dim, xh + rotary_dim, sizeof(float) * (head_dim - rotary_dim));
  }
}

}  // namespace xcompile
