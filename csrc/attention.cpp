// Causal grouped-query attention over a preallocated KV cache, fp32 (prefill and decode alike):
//   q (S, heads, d): the S new tokens, at positions past .. past + S - 1
//   k_cache, v_cache (kv_heads, capacity, d): rows 0 .. past + S - 1 valid (the new tokens' K, V
//     already written at past ..)
//   out (S, heads, d); out may be q itself (a head's q is fully read before its out is written)
// Query head h reads KV head h / (heads / kv_heads). The query at position p sees keys lo .. p,
// lo = max(0, p - window + 1) with a sliding window (Mistral's sliding_window = window, and
// onnxruntime 1.32's GroupQueryAttention local_window_size = window, checked on its CPU provider
// for decode and prefill), lo = 0 when window <= 0.
//   out[t, h] = softmax(scale * q[t, h] . k[lo..p]) @ v[lo..p], softmax shifted by its max
// A task is one token and the query heads of one KV head (its GQA group, or a part of it when
// there are fewer (token, KV head) pairs than threads). It walks the keys in blocks small enough
// to stay in L1 and runs every head of the task over a block before the next: K and V come from
// L2/L3 once per group instead of once per head (8x less traffic for 32 query heads over 4 KV heads).
// Tasks run longest first (later tokens see more keys). Block boundaries depend only on the
// token (and the slot runs below), so results do not depend on the thread count.
// Indirect access (beam search): with `slot_of` (total int32), key position j lives in cache
// slot slot_of[j], i.e. at k_cache + slot_of[j] * slot_stride + (kv * capacity + j) * d: beams
// share the rows they have in common and a reorder rewrites indices, never K or V. Key blocks are
// also cut where the slot changes, so each block is contiguous.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "dispatch.h"
#include "kernels.h"
#include "threads.h"
#include "vec_math.h"

#if XC_X86
#include <immintrin.h>
#endif

namespace xcompile {
namespace {

// s[j] = scale * q . k[j] for n keys (rows of d, contiguous)
using ScoresFn = void (*)(const float* q, const float* k, int64_t n, int64_t d, float scale,
                          float* s);
// s[j] = exp(s[j] - max(s)) in place; returns the sum
using SoftmaxFn = float (*)(float* s, int64_t n);
// out[c] = (out[c] if accumulate else 0) + sum_j p[j] v[j, c], then times scale
using WeightedFn = void (*)(const float* p, const float* v, int64_t n, int64_t d, bool accumulate,
                            float scale, float* out);

struct Kernels {
  ScoresFn scores;
  SoftmaxFn softmax;
  WeightedFn weighted;
  int64_t key_block;  // keys per block: 32 rows of K (or V) of d <= 128 are <= 16 KB, L1-sized
};

// ---- scalar: the plain path the others are held to (double sums) -----------------------------
void scores_scalar(const float* q, const float* k, int64_t n, int64_t d, float scale, float* s) {
  for (int64_t j = 0; j < n; ++j) {
    double dot = 0.0;
    for (int64_t c = 0; c < d; ++c) dot += double(q[c]) * double(k[j * d + c]);
    s[j] = float(dot) * scale;
  }
}

float softmax_scalar(float* s, int64_t n) {
  const float max = *std::max_element(s, s + n);
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - max));
  return float(sum);
}

// Called once per head over all its keys (key_block is unbounded for this path).
void weighted_scalar(const float* p, const float* v, int64_t n, int64_t d, bool accumulate,
                     float scale, float* out) {
  for (int64_t c = 0; c < d; ++c) {
    double acc = accumulate ? out[c] : 0.0;
    for (int64_t j = 0; j < n; ++j) acc += double(p[j]) * double(v[j * d + c]);
    out[c] = float(acc) * scale;
  }
}

#if XC_X86
// ---- AVX2 + FMA: 8 lanes, masked (vmaskmov) tails ---------------------------------------------
XC_TARGET_AVX2 inline __m256i lanes_below_avx2(int64_t count) {  // lane i set when i < count
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(count, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The four horizontal sums of a, b, c, d as one vector (a, b, c, d).
XC_TARGET_AVX2 inline __m128 hsum4_avx2(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

XC_TARGET_AVX2 void scores_avx2(const float* q, const float* k, int64_t n, int64_t d, float scale,
                                float* s) {
  const int64_t full = d / 8 * 8;
  const __m256i tail = lanes_below_avx2(d - full);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {  // four keys at once: four independent FMA chains
    const float* k0 = k + j * d;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    for (int64_t c = 0; c < full; c += 8) {
      const __m256 qv = _mm256_loadu_ps(q + c);
      for (int r = 0; r < 4; ++r)
        acc[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + r * d + c), acc[r]);
    }
    if (full < d) {
      const __m256 qv = _mm256_maskload_ps(q + full, tail);
      for (int r = 0; r < 4; ++r)
        acc[r] = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + r * d + full, tail), acc[r]);
    }
    const __m128 dots = hsum4_avx2(acc[0], acc[1], acc[2], acc[3]);
    _mm_storeu_ps(s + j, _mm_mul_ps(dots, _mm_set1_ps(scale)));
  }
  for (; j < n; ++j) {
    const float* kj = k + j * d;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < full; c += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(kj + c), acc);
    if (full < d)
      acc = _mm256_fmadd_ps(_mm256_maskload_ps(q + full, tail), _mm256_maskload_ps(kj + full, tail),
                            acc);
    const __m256 zero = _mm256_setzero_ps();
    s[j] = _mm_cvtss_f32(hsum4_avx2(acc, zero, zero, zero)) * scale;
  }
}

XC_TARGET_AVX2 float softmax_avx2(float* s, int64_t n) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 vmax = neg_inf;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
  const __m256i tail = lanes_below_avx2(n - j);
  if (j < n)  // lanes past n count as -inf for the max
    vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(s + j, tail),
                                                 _mm256_castsi256_ps(tail)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const __m256 max = _mm256_broadcastss_ps(m);

  __m256 sum = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = vec_math::exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), max));
    _mm256_storeu_ps(s + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (j < n) {
    const __m256 e = vec_math::exp_avx2(_mm256_sub_ps(_mm256_maskload_ps(s + j, tail), max));
    _mm256_maskstore_ps(s + j, tail, e);
    sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(tail)));
  }
  const __m256 zero = _mm256_setzero_ps();
  return _mm_cvtss_f32(hsum4_avx2(sum, zero, zero, zero));
}

// NV vectors of out (starting at column c0) accumulated over all n keys in registers, two keys per
// step (two accumulator sets: 2 * NV independent FMA chains). Masked: one vector, lanes in mask.
template <bool Masked>
XC_TARGET_AVX2 inline __m256 load_avx2(const float* at, __m256i mask) {
  return Masked ? _mm256_maskload_ps(at, mask) : _mm256_loadu_ps(at);
}

template <int NV, bool Masked>
XC_TARGET_AVX2 void weighted_block_avx2(const float* p, const float* v, int64_t n, int64_t d,
                                        bool accumulate, float scale, float* out, __m256i mask) {
  __m256 even[NV], odd[NV];
  for (int i = 0; i < NV; ++i) {
    even[i] = accumulate ? load_avx2<Masked>(out + 8 * i, mask) : _mm256_setzero_ps();
    odd[i] = _mm256_setzero_ps();
  }
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const __m256 p0 = _mm256_broadcast_ss(p + j), p1 = _mm256_broadcast_ss(p + j + 1);
    for (int i = 0; i < NV; ++i) {
      even[i] = _mm256_fmadd_ps(p0, load_avx2<Masked>(v + j * d + 8 * i, mask), even[i]);
      odd[i] = _mm256_fmadd_ps(p1, load_avx2<Masked>(v + (j + 1) * d + 8 * i, mask), odd[i]);
    }
  }
  if (j < n) {
    const __m256 p0 = _mm256_broadcast_ss(p + j);
    for (int i = 0; i < NV; ++i)
      even[i] = _mm256_fmadd_ps(p0, load_avx2<Masked>(v + j * d + 8 * i, mask), even[i]);
  }
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int i = 0; i < NV; ++i) {
    const __m256 r = _mm256_mul_ps(_mm256_add_ps(even[i], odd[i]), vscale);
    if (Masked) _mm256_maskstore_ps(out + 8 * i, mask, r);
    else _mm256_storeu_ps(out + 8 * i, r);
  }
}

// Column blocks of 32, then 8, then the masked rest: each V row is streamed once per block, and a
// 32-column block of a row is two cache lines, so V is read from memory about once in all.
XC_TARGET_AVX2 void weighted_avx2(const float* p, const float* v, int64_t n, int64_t d,
                                  bool accumulate, float scale, float* out) {
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t c = 0;
  for (; c + 32 <= d; c += 32)
    weighted_block_avx2<4, false>(p, v + c, n, d, accumulate, scale, out + c, all);
  for (; c + 8 <= d; c += 8)
    weighted_block_avx2<1, false>(p, v + c, n, d, accumulate, scale, out + c, all);
  if (c < d) {
    const __m256i tail = lanes_below_avx2(d - c);
    weighted_block_avx2<1, true>(p, v + c, n, d, accumulate, scale, out + c, tail);
  }
}

// ---- AVX-512 F/BW/VL: 16 lanes, masked tails --------------------------------------------------
XC_TARGET_AVX512 inline __mmask16 lanes_below_avx512(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1);
}

// 16 -> 8 lanes, low half + high half (extractf64x4 is AVX-512 F; extractf32x8 would need DQ).
XC_TARGET_AVX512 inline __m256 fold_avx512(__m512 x) {
  return _mm256_add_ps(_mm512_castps512_ps256(x),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}

XC_TARGET_AVX512 inline __m128 hsum4_avx512(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(fold_avx512(a), fold_avx512(b)),
                                  _mm256_hadd_ps(fold_avx512(c), fold_avx512(d)));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

XC_TARGET_AVX512 void scores_avx512(const float* q, const float* k, int64_t n, int64_t d,
                                    float scale, float* s) {
  const int64_t full = d / 16 * 16;
  const __mmask16 tail = lanes_below_avx512(d - full);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* k0 = k + j * d;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (int64_t c = 0; c < full; c += 16) {
      const __m512 qv = _mm512_loadu_ps(q + c);
      for (int r = 0; r < 4; ++r)
        acc[r] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k0 + r * d + c), acc[r]);
    }
    if (full < d) {
      const __m512 qv = _mm512_maskz_loadu_ps(tail, q + full);
      for (int r = 0; r < 4; ++r)
        acc[r] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(tail, k0 + r * d + full), acc[r]);
    }
    const __m128 dots = hsum4_avx512(acc[0], acc[1], acc[2], acc[3]);
    _mm_storeu_ps(s + j, _mm_mul_ps(dots, _mm_set1_ps(scale)));
  }
  for (; j < n; ++j) {
    const float* kj = k + j * d;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; c += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_loadu_ps(kj + c), acc);
    if (full < d)
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, q + full),
                            _mm512_maskz_loadu_ps(tail, kj + full), acc);
    s[j] = _mm512_reduce_add_ps(acc) * scale;
  }
}

XC_TARGET_AVX512 float softmax_avx512(float* s, int64_t n) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = neg_inf;
  for (int64_t j = 0; j < n; j += 16)  // lanes past n load as -inf
    vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(neg_inf, lanes_below_avx512(n - j), s + j));
  const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = lanes_below_avx512(n - j);
    const __m512 e = vec_math::exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s + j), max));
    _mm512_mask_storeu_ps(s + j, lanes, e);
    sum = _mm512_mask_add_ps(sum, lanes, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

template <bool Masked>
XC_TARGET_AVX512 inline __m512 load_avx512(const float* at, __mmask16 mask) {
  return Masked ? _mm512_maskz_loadu_ps(mask, at) : _mm512_loadu_ps(at);
}

template <int NV, bool Masked>
XC_TARGET_AVX512 void weighted_block_avx512(const float* p, const float* v, int64_t n, int64_t d,
                                            bool accumulate, float scale, float* out,
                                            __mmask16 mask) {
  __m512 even[NV], odd[NV];
  for (int i = 0; i < NV; ++i) {
    even[i] = accumulate ? load_avx512<Masked>(out + 16 * i, mask) : _mm512_setzero_ps();
    odd[i] = _mm512_setzero_ps();
  }
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
    for (int i = 0; i < NV; ++i) {
      even[i] = _mm512_fmadd_ps(p0, load_avx512<Masked>(v + j * d + 16 * i, mask), even[i]);
      odd[i] = _mm512_fmadd_ps(p1, load_avx512<Masked>(v + (j + 1) * d + 16 * i, mask), odd[i]);
    }
  }
  if (j < n) {
    const __m512 p0 = _mm512_set1_ps(p[j]);
    for (int i = 0; i < NV; ++i)
      even[i] = _mm512_fmadd_ps(p0, load_avx512<Masked>(v + j * d + 16 * i, mask), even[i]);
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int i = 0; i < NV; ++i)
    _mm512_mask_storeu_ps(out + 16 * i, Masked ? mask : __mmask16(0xffff),
                          _mm512_mul_ps(_mm512_add_ps(even[i], odd[i]), vscale));
}

// Column blocks of 64 (one cache line of each V row per vector), then 16, then the masked rest.
XC_TARGET_AVX512 void weighted_avx512(const float* p, const float* v, int64_t n, int64_t d,
                                      bool accumulate, float scale, float* out) {
  int64_t c = 0;
  for (; c + 64 <= d; c += 64)
    weighted_block_avx512<4, false>(p, v + c, n, d, accumulate, scale, out + c, 0);
  for (; c + 16 <= d; c += 16)
    weighted_block_avx512<1, false>(p, v + c, n, d, accumulate, scale, out + c, 0);
  if (c < d) {
    const __mmask16 tail = lanes_below_avx512(d - c);
    weighted_block_avx512<1, true>(p, v + c, n, d, accumulate, scale, out + c, tail);
  }
}
#endif

Kernels kernels() {
  switch (current_isa()) {
#if XC_X86
    case Isa::amx:
    case Isa::avx512_bf16:
    case Isa::avx512_vnni:
    case Isa::avx512: return {scores_avx512, softmax_avx512, weighted_avx512, 32};
    case Isa::avx2: return {scores_avx2, softmax_avx2, weighted_avx2, 32};
#endif
    default:  // one block of all keys: each sum in one double accumulator, as plain as it gets
      return {scores_scalar, softmax_scalar, weighted_scalar, std::numeric_limits<int64_t>::max()};
  }
}

}  // namespace

void attention(const float* q, const float* k_cache, const float* v_cache, float* out, int64_t S,
               int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t capacity, int64_t past,
               int64_t window, float scale, const int32_t* slot_of, int64_t slot_stride) {
  const Kernels f = kernels();
  const int64_t group = heads / kv_heads, total = past + S;
  const int threads = num_threads();
  // A decode head over a short context is a microsecond or two: below ~32K multiply-adds in all
  // the pool costs more than it saves.
  const bool parallel = threads > 1 && S * heads > 1 && S * heads * total * head_dim >= (1 << 15);
  // Split each group into parts only as far as it takes to give every thread a task: each part
  // reads the group's K and V again.
  const int64_t pairs = S * kv_heads;
  const int64_t wanted = parallel && pairs < threads ? (threads + pairs - 1) / pairs : 1;
  const int64_t per_task = (group + std::min(group, wanted) - 1) / std::min(group, wanted);
  const int64_t parts = (group + per_task - 1) / per_task, tasks = pairs * parts;
#pragma omp parallel num_threads(threads) if (parallel)
  {
    // This thread's buffers: scores (per_task, n) for the task at hand, 1 / softmax sum per head.
    std::vector<float> scores(static_cast<size_t>(per_task * total));
    std::vector<float> inv_sum(static_cast<size_t>(per_task));
    // Descending: the last tokens, which see the most keys, are handed out first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = tasks - 1; task >= 0; --task) {
      const int64_t t = task / (kv_heads * parts), kv = task / parts % kv_heads;
      const int64_t h0 = kv * group + task % parts * per_task;
      const int64_t h1 = std::min(h0 + per_task, (kv + 1) * group);
      const int64_t pos = past + t;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0, n = pos + 1 - lo;
      const int64_t row0 = (kv * capacity + lo) * head_dim;  // key lo in its slot
      // Key block from j: its length and the offset of its slot (0 without indirection).
      const auto block = [&](int64_t j, int64_t& len) -> int64_t {
        len = std::min(f.key_block, n - j);
        if (!slot_of) return 0;
        const int32_t slot = slot_of[lo + j];
        for (int64_t e = 1; e < len; ++e) {
          if (slot_of[lo + j + e] != slot) {
            len = e;
            break;
          }
        }
        return slot * slot_stride;
      };
      // All of the task's q rows are read (scores) before any out row is written, so out may be q.
      for (int64_t j = 0, len; j < n; j += len) {
        const float* k = k_cache + block(j, len) + row0 + j * head_dim;
        for (int64_t h = h0; h < h1; ++h)
          f.scores(q + (t * heads + h) * head_dim, k, len, head_dim, scale,
                   scores.data() + (h - h0) * n + j);
      }
      for (int64_t h = h0; h < h1; ++h)
        inv_sum[h - h0] = 1.0f / f.softmax(scores.data() + (h - h0) * n, n);
      for (int64_t j = 0, len; j < n; j += len) {
        const float* v = v_cache + block(j, len) + row0 + j * head_dim;
        const bool last = j + len == n;
        for (int64_t h = h0; h < h1; ++h)
          f.weighted(scores.data() + (h - h0) * n + j, v, len, head_dim, j > 0,
                     last ? inv_sum[h - h0] : 1.0f, out + (t * heads + h) * head_dim);
      }
    }
  }
}

void kv_write(const float* src, int64_t src_stride, float* cache, int64_t slot, int64_t start,
              int64_t S, int64_t kv_heads, int64_t head_dim, int64_t capacity) {
  for (int64_t t = 0; t < S; ++t)
    for (int64_t h = 0; h < kv_heads; ++h)
      std::memcpy(cache + ((slot * kv_heads + h) * capacity + start + t) * head_dim,
                  src + t * src_stride + h * head_dim, sizeof(float) * head_dim);
}

}  // namespace xcompile
