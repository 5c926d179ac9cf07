// Causal grouped-query attention over a preallocated KV cache (prefill and decode alike):
//   q (S, heads, d) fp32: the S new tokens, at positions past .. past + S - 1
//   k_cache, v_cache (kv_heads, capacity, d), fp32 or bf16 (a bf16 row is widened to fp32 in
//     registers, csrc/attention_rows.h): rows 0 .. past + S - 1 valid (the new tokens' K, V
//     already written at past ..)
//   out (S, heads, d) fp32; out may be q itself (a head's q is fully read before its out is
//     written)
// Query head h reads KV head h / (heads / kv_heads). The query at position p sees keys lo .. p,
// lo = max(0, p - window + 1) with a sliding window (Mistral's sliding_window = window, and
// onnxruntime 1.32's GroupQueryAttention local_window_size = window, checked on its CPU provider
// for decode and prefill), lo = 0 when window <= 0.
//   out[t, h] = softmax(scale * q[t, h] . k[lo..p]) @ v[lo..p], softmax shifted by its max
// With softcap > 0 (Gemma 2's attn_logit_softcapping; ORT's GroupQueryAttention softcap) each
// score s = scale * q . k becomes softcap * tanh(s / softcap) before the softmax.
// A task is one token and the query heads of one KV head (its GQA group, or a part of it when
// there are fewer tasks than threads). It walks the keys in blocks small enough to stay in L1 and
// runs every head of the task over a block before the next: K and V come from L2/L3 once per
// group instead of once per head (8x less traffic for 32 query heads over 4 KV heads).
// Tasks run longest first (later tokens see more keys).
// Split over keys (flash-decoding), for S <= kSplitTokens: a token's keys are cut into chunks of
// kChunkKeys (512), each chunk a task of its own that keeps, per head, its max m_c, its sum
// l_c = sum exp(s - m_c) and its output o_c = sum exp(s - m_c) v, unnormalized; then
//   out = sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c,   M = max_c m_c
// which is the softmax over all the keys (exact but for rounding). A decode step then has
// kv_heads * chunks tasks instead of kv_heads: the threads fill where heads alone leave them idle
// (3 KV heads on 2 threads ran 2 + 1; a sharded rank may hold one KV head), and a task's scores
// stay cache-sized however long the context. A token with one chunk's keys or fewer writes out
// directly. Chunk and block boundaries depend only on the token (and the slot runs below), so
// results do not depend on the thread count.
// Indirect access (beam search): with `slot_of` (total int32), key position j lives in cache
// slot slot_of[j], i.e. at k_cache + slot_of[j] * slot_stride + (kv * capacity + j) * d: beams
// share the rows they have in common and a reorder rewrites indices, never K or V. Key blocks are
// also cut where the slot changes, so each block is contiguous.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention_rows.h"
#include "dispatch.h"
#include "kernels.h"
#include "threads.h"

namespace xcompile {
namespace {

using namespace attention_rows;

template <typename T>
using ScoresFn = void (*)(const float* q, const T* k, int64_t n, int64_t d, float scale, float* s);
using SoftmaxFn = float (*)(float* s, int64_t n, float* max_out);
using SoftcapFn = void (*)(float* s, int64_t n, float cap);
template <typename T>
using WeightedFn = void (*)(const float* p, const T* v, int64_t n, int64_t d, bool accumulate,
                            float scale, float* out);

template <typename T>
struct Kernels {
  ScoresFn<T> scores;
  SoftmaxFn softmax;
  WeightedFn<T> weighted;
  SoftcapFn softcap;
  int64_t key_block;  // keys per block: 32 rows of K (or V) of d <= 128 are <= 16 KB, L1-sized
};

template <typename T>
Kernels<T> kernels() {
  switch (current_isa()) {
#if XC_X86
    case Isa::amx:
    case Isa::avx512_bf16:
    case Isa::avx512_vnni:
    case Isa::avx512:
      return {scores_avx512<T>, softmax_avx512, weighted_avx512<T>, softcap_avx512, 32};
    case Isa::avx2: return {scores_avx2<T>, softmax_avx2, weighted_avx2<T>, softcap_avx2, 32};
#endif
    default:  // one block of a chunk's keys: each sum in one double accumulator, as plain as can be
      return {scores_scalar<T>, softmax_scalar, weighted_scalar<T>, softcap_scalar,
              std::numeric_limits<int64_t>::max()};
  }
}

constexpr int64_t kSplitTokens = 8;  // decode (and a few tokens at once) splits over keys
// Keys per chunk, a multiple of the key block: 512 rows of d = 64 are 128 KB of K in fp32, 64 KB
// in bf16 (L2-sized); 2048 keys are 4 chunks. Chunks of 256 cost 3 % more at 1 thread (the
// prefetchers restart per chunk) and balanced no better.
constexpr int64_t kChunkKeys = 512;
std::atomic<bool> split_keys{true};  // set_attention_split: off only to measure or test without

// One (token, head)'s chunks combined into out (d): o (chunks, d), m, l (chunks), `used` of them.
void combine(const float* __restrict__ o, const float* m, const float* l, int64_t used, int64_t d,
             float* __restrict__ out) {
  const float max = *std::max_element(m, m + used);
  double sum = 0.0;
  std::fill(out, out + d, 0.0f);
  for (int64_t c = 0; c < used; ++c) {
    const float w = std::exp(m[c] - max);
    sum += double(w) * l[c];
    for (int64_t i = 0; i < d; ++i) out[i] += w * o[c * d + i];
  }
  const float inv = float(1.0 / sum);
  for (int64_t i = 0; i < d; ++i) out[i] *= inv;
}

template <typename T>
void attend(const float* q, const T* k_cache, const T* v_cache, float* out, int64_t S,
            int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t capacity, int64_t past,
            int64_t window, float scale, const int32_t* slot_of, int64_t slot_stride,
            float softcap) {
  const Kernels<T> f = kernels<T>();
  const int64_t group = heads / kv_heads, total = past + S;
  const auto first_key = [&](int64_t pos) -> int64_t {
    return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
  };
  const int64_t most = total - first_key(total - 1);  // the last token's keys: no token sees more
  const int64_t chunk_keys = S <= kSplitTokens && split_keys.load() ? kChunkKeys : most;
  const int64_t chunks = (most + chunk_keys - 1) / chunk_keys;
  const int threads = num_threads();
  // A decode head over a short context is a microsecond or two: below ~32K multiply-adds in all
  // the pool costs more than it saves.
  const bool parallel = threads > 1 && S * heads * chunks > 1 &&
                        S * heads * total * head_dim >= (1 << 15);
  // Split each group into parts only as far as it takes to give every thread a task: each part
  // reads the group's K and V again.
  const int64_t pairs = S * kv_heads * chunks;
  const int64_t wanted = parallel && pairs < threads ? (threads + pairs - 1) / pairs : 1;
  const int64_t per_task = (group + std::min(group, wanted) - 1) / std::min(group, wanted);
  const int64_t parts = (group + per_task - 1) / per_task, tasks = pairs * parts;
  // The split tokens' partials: o (S, heads, chunks, d), then m and l (S, heads, chunks).
  thread_local std::vector<float> partials;
  const int64_t slices = chunks > 1 ? S * heads * chunks : 0;
  partials.resize(static_cast<size_t>(slices * (head_dim + 2)));
  float* const part_o = partials.data();
  float* const part_m = part_o + slices * head_dim;
  float* const part_l = part_m + slices;
  // Chunks still running per (token, group part): the task that finishes a split token's last
  // chunk combines them (an atomic count, not a second barrier: at decode sizes each barrier
  // costs a futex wake, ~15 % of SmolLM2's step at 2048 keys on 2 threads).
  thread_local std::vector<int32_t> pending;
  pending.assign(static_cast<size_t>(chunks > 1 ? S * kv_heads * parts : 0), 0);
  for (int64_t pair = 0; pair < int64_t(pending.size()); ++pair) {
    const int64_t pos = past + pair / (kv_heads * parts), n = pos + 1 - first_key(pos);
    pending[pair] = int32_t((n + chunk_keys - 1) / chunk_keys);
  }
  int32_t* const remaining = pending.data();
#pragma omp parallel num_threads(threads) if (parallel)
  {
    // This thread's buffers: scores (per_task, keys) for the task at hand; softmax sum and max.
    std::vector<float> scores(static_cast<size_t>(per_task * std::min(chunk_keys, most)));
    std::vector<float> sums(static_cast<size_t>(per_task)), maxes(sums.size());
    // Descending: the last tokens, which see the most keys, are handed out first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = tasks - 1; task >= 0; --task) {
      const int64_t c = task % chunks, pair = task / chunks;
      const int64_t t = pair / (kv_heads * parts), kv = pair / parts % kv_heads;
      const int64_t h0 = kv * group + pair % parts * per_task;
      const int64_t h1 = std::min(h0 + per_task, (kv + 1) * group);
      const int64_t pos = past + t, lo = first_key(pos), n = pos + 1 - lo;
      const int64_t j0 = c * chunk_keys, j1 = std::min(n, j0 + chunk_keys), keys = j1 - j0;
      if (keys <= 0) continue;  // an earlier token with fewer chunks than the last
      const bool whole = n <= chunk_keys;
      const int64_t row0 = (kv * capacity + lo) * head_dim;  // key lo in its slot
      // Key block from j: its length and the offset of its slot (0 without indirection).
      const auto block = [&](int64_t j, int64_t& len) -> int64_t {
        len = std::min(f.key_block, j1 - j);
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
      for (int64_t j = j0, len; j < j1; j += len) {
        const T* k = k_cache + block(j, len) + row0 + j * head_dim;
        for (int64_t h = h0; h < h1; ++h)
          f.scores(q + (t * heads + h) * head_dim, k, len, head_dim, scale,
                   scores.data() + (h - h0) * keys + (j - j0));
      }
      for (int64_t h = h0; h < h1; ++h) {
        if (softcap > 0.0f) f.softcap(scores.data() + (h - h0) * keys, keys, softcap);
        sums[h - h0] = f.softmax(scores.data() + (h - h0) * keys, keys, &maxes[h - h0]);
      }
      for (int64_t j = j0, len; j < j1; j += len) {
        const T* v = v_cache + block(j, len) + row0 + j * head_dim;
        const bool last = j + len == j1;
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t slice = (t * heads + h) * chunks + c;
          f.weighted(scores.data() + (h - h0) * keys + (j - j0), v, len, head_dim, j > j0,
                     last && whole ? 1.0f / sums[h - h0] : 1.0f,
                     whole ? out + (t * heads + h) * head_dim : part_o + slice * head_dim);
        }
      }
      if (!whole) {
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t slice = (t * heads + h) * chunks + c;
          part_m[slice] = maxes[h - h0];
          part_l[slice] = sums[h - h0];
        }
        // The last chunk in: the others' partials are visible (acquire-release) and every task
        // that reads these q rows is done, so out may be written over them.
        if (__atomic_sub_fetch(remaining + pair, 1, __ATOMIC_ACQ_REL) == 0) {
          for (int64_t h = h0; h < h1; ++h) {
            const int64_t slice = (t * heads + h) * chunks;
            combine(part_o + slice * head_dim, part_m + slice, part_l + slice,
                    (n + chunk_keys - 1) / chunk_keys, head_dim, out + (t * heads + h) * head_dim);
          }
        }
      }
    }
  }
}

}  // namespace

void set_attention_split(bool enabled) { split_keys.store(enabled); }

void attention(const float* q, const float* k_cache, const float* v_cache, float* out, int64_t S,
               int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t capacity, int64_t past,
               int64_t window, float scale, const int32_t* slot_of, int64_t slot_stride,
               float softcap) {
  attend(q, k_cache, v_cache, out, S, heads, kv_heads, head_dim, capacity, past, window, scale,
         slot_of, slot_stride, softcap);
}

void attention_bf16(const float* q, const uint16_t* k_cache, const uint16_t* v_cache, float* out,
                    int64_t S, int64_t heads, int64_t kv_heads, int64_t head_dim,
                    int64_t capacity, int64_t past, int64_t window, float scale,
                    const int32_t* slot_of, int64_t slot_stride, float softcap) {
  attend(q, k_cache, v_cache, out, S, heads, kv_heads, head_dim, capacity, past, window, scale,
         slot_of, slot_stride, softcap);
}

}  // namespace xcompile
