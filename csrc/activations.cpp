// Elementwise MLP activations, fp32, over n contiguous elements (any shape, flattened):
//   silu_mul:  out = gate * sigmoid(gate) * up          (Llama's act_fn(gate_proj(x)) * up_proj(x))
//   gelu_tanh: out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))   (GPT-J's gelu_new)
//   gelu_mul:  out = gelu_tanh(gate) * up                (Gemma's GeGLU)
// out may alias any input (each element is read before it is written at the same index).
//
// The vector paths use the identities x * sigmoid(x) = x / (1 + exp(-x)) and
// 0.5 (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + exp(-2u)), so both need one exp (vec_math.h) and one
// division per element, and neither loses digits to 1 + tanh(u) cancelling where u << 0.
// The scalar path is the formulas as written, with the C library's expf / tanhf.
// Infinite inputs: +inf gives +inf everywhere; -inf gives -inf on the vector paths (exp is clamped,
// so -inf / (1 + 1.7e38)) where torch and the scalar path give NaN (inf / inf, inf * 0). NaN stays
// NaN.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "dispatch.h"
#include "kernels.h"
#include "threads.h"
#include "vec_math.h"

#if XC_X86
#include <immintrin.h>
#endif

namespace xcompile {
namespace {

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// A span kernel: n elements from a (and b, for binary ops) into out.
using SpanFn = void (*)(const float* a, const float* b, float* out, int64_t n);

void silu_mul_scalar(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

inline float gelu_tanh_of(float v) {
  return 0.5f * v * (1.0f + std::tanh(kGeluC * (v + kGeluA * v * v * v)));
}

void gelu_tanh_scalar(const float* x, const float*, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gelu_tanh_of(x[i]);
}

void gelu_mul_scalar(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gelu_tanh_of(gate[i]) * up[i];
}

#if XC_X86
// Gelu: out = a / (1 + exp(-2u)), -2u = a (c1 + c2 a^2) with c1 = -2 sqrt(2/pi), c2 = 0.044715 c1.
// Silu: out = a / (1 + exp(-a)) * b. Mul: times b (SiLU always, GELU for GeGLU).
constexpr float kGeluC1 = -2.0f * kGeluC, kGeluC2 = -2.0f * kGeluC * kGeluA;

template <bool Gelu, bool Mul>
XC_TARGET_AVX2 inline __m256 activation_avx2(__m256 a, __m256 b) {
  const __m256 z =
      Gelu ? _mm256_mul_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(kGeluC2), _mm256_mul_ps(a, a),
                                              _mm256_set1_ps(kGeluC1)))
           : _mm256_sub_ps(_mm256_setzero_ps(), a);
  const __m256 y = _mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.0f), vec_math::exp_avx2(z)));
  return Mul ? _mm256_mul_ps(y, b) : y;
}

template <bool Gelu, bool Mul>
XC_TARGET_AVX2 void span_avx2(const float* a, const float* b, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 vb = Mul ? _mm256_loadu_ps(b + i) : _mm256_setzero_ps();
    _mm256_storeu_ps(out + i, activation_avx2<Gelu, Mul>(_mm256_loadu_ps(a + i), vb));
  }
  if (i < n) {  // tail through a zero-padded stack buffer: same arithmetic as the full vectors
    alignas(32) float ta[8] = {}, tb[8] = {}, to[8];
    for (int64_t t = i; t < n; ++t) {
      ta[t - i] = a[t];
      if (Mul) tb[t - i] = b[t];
    }
    _mm256_store_ps(to, activation_avx2<Gelu, Mul>(_mm256_load_ps(ta), _mm256_load_ps(tb)));
    for (int64_t t = i; t < n; ++t) out[t] = to[t - i];
  }
}

XC_TARGET_AVX2 void silu_mul_avx2(const float* gate, const float* up, float* out, int64_t n) {
  span_avx2<false, true>(gate, up, out, n);
}
XC_TARGET_AVX2 void gelu_tanh_avx2(const float* x, const float*, float* out, int64_t n) {
  span_avx2<true, false>(x, nullptr, out, n);
}
XC_TARGET_AVX2 void gelu_mul_avx2(const float* gate, const float* up, float* out, int64_t n) {
  span_avx2<true, true>(gate, up, out, n);
}

template <bool Gelu, bool Mul>
XC_TARGET_AVX512 inline __m512 activation_avx512(__m512 a, __m512 b) {
  const __m512 z =
      Gelu ? _mm512_mul_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(kGeluC2), _mm512_mul_ps(a, a),
                                              _mm512_set1_ps(kGeluC1)))
           : _mm512_sub_ps(_mm512_setzero_ps(), a);
  const __m512 y = _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.0f), vec_math::exp_avx512(z)));
  return Mul ? _mm512_mul_ps(y, b) : y;
}

template <bool Gelu, bool Mul>
XC_TARGET_AVX512 void span_avx512(const float* a, const float* b, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    const __m512 vb = Mul ? _mm512_maskz_loadu_ps(lanes, b + i) : _mm512_setzero_ps();
    const __m512 va = _mm512_maskz_loadu_ps(lanes, a + i);
    _mm512_mask_storeu_ps(out + i, lanes, activation_avx512<Gelu, Mul>(va, vb));
  }
}

XC_TARGET_AVX512 void silu_mul_avx512(const float* gate, const float* up, float* out, int64_t n) {
  span_avx512<false, true>(gate, up, out, n);
}
XC_TARGET_AVX512 void gelu_tanh_avx512(const float* x, const float*, float* out, int64_t n) {
  span_avx512<true, false>(x, nullptr, out, n);
}
XC_TARGET_AVX512 void gelu_mul_avx512(const float* gate, const float* up, float* out, int64_t n) {
  span_avx512<true, true>(gate, up, out, n);
}
#endif

SpanFn silu_mul_kernel() {
  switch (current_isa()) {
#if XC_X86
    case Isa::amx:
    case Isa::avx512_bf16:
    case Isa::avx512_vnni:
    case Isa::avx512: return silu_mul_avx512;
    case Isa::avx2: return silu_mul_avx2;
#endif
    default: return silu_mul_scalar;
  }
}

SpanFn gelu_mul_kernel() {
  switch (current_isa()) {
#if XC_X86
    case Isa::amx:
    case Isa::avx512_bf16:
    case Isa::avx512_vnni:
    case Isa::avx512: return gelu_mul_avx512;
    case Isa::avx2: return gelu_mul_avx2;
#endif
    default: return gelu_mul_scalar;
  }
}

SpanFn gelu_tanh_kernel() {
  switch (current_isa()) {
#if XC_X86
    case Isa::amx:
    case Isa::avx512_bf16:
    case Isa::avx512_vnni:
    case Isa::avx512: return gelu_tanh_avx512;
    case Isa::avx2: return gelu_tanh_avx2;
#endif
    default: return gelu_tanh_scalar;
  }
}

// Splits n elements into one contiguous chunk per thread (a multiple of 64 elements, so chunk
// edges fall on cache lines of a 64-byte-aligned tensor and every vector but the last is full).
// A decode-sized span (an MLP's intermediate size, ~10^4) takes a few microseconds on one core:
// the pool is woken only well above that.
void run_span(SpanFn span, const float* a, const float* b, float* out, int64_t n) {
  const int threads = num_threads();
  const bool parallel = threads > 1 && n >= (int64_t(1) << 16);
  const int64_t chunk = parallel ? ((n + threads - 1) / threads + 63) / 64 * 64 : n;
  const int64_t chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t start = c * chunk, len = std::min(chunk, n - start);
    span(a + start, b ? b + start : nullptr, out + start, len);
  }
}

}  // namespace

void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  run_span(silu_mul_kernel(), gate, up, out, n);
}

// A gated activation on rows: gate and up row strides apart (column slices of a fused
// gate/up projection's output), out contiguous.
static void gated_rows(SpanFn span, const float* gate, const float* up, float* out, int64_t rows,
                int64_t cols, int64_t gate_stride, int64_t up_stride) {
  if (gate_stride == cols && up_stride == cols) return run_span(span, gate, up, out, rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    run_span(span, gate + r * gate_stride, up + r * up_stride, out + r * cols, cols);
}

void silu_mul_rows(const float* gate, const float* up, float* out, int64_t rows, int64_t cols,
                   int64_t gate_stride, int64_t up_stride) {
  gated_rows(silu_mul_kernel(), gate, up, out, rows, cols, gate_stride, up_stride);
}

void gelu_mul_rows(const float* gate, const float* up, float* out, int64_t rows, int64_t cols,
                   int64_t gate_stride, int64_t up_stride) {
  gated_rows(gelu_mul_kernel(), gate, up, out, rows, cols, gate_stride, up_stride);
}

void gelu_tanh(const float* x, float* out, int64_t n) {
  run_span(gelu_tanh_kernel(), x, nullptr, out, n);
}

}  // namespace xcompile
