// New K or V rows into the KV cache (csrc/kernels.h): fp32 as they are, or rounded to bf16
// (nearest even, csrc/bf16.h), the cache the BF16/INT8/INT4 artifacts run with.
//   src (S, kv_heads, d) fp32, token stride src_stride -> cache (slots, kv_heads, capacity, d)
//   at slot `slot`, positions start .. start + S - 1
#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "kernels.h"

namespace xcompile {

void kv_write(const float* src, int64_t src_stride, float* cache, int64_t slot, int64_t start,
              int64_t S, int64_t kv_heads, int64_t head_dim, int64_t capacity) {
  for (int64_t t = 0; t < S; ++t)
    for (int64_t h = 0; h < kv_heads; ++h)
      std::memcpy(cache + ((slot * kv_heads + h) * capacity + start + t) * head_dim,
                  src + t * src_stride + h * head_dim, sizeof(float) * head_dim);
}

void kv_write_bf16(const float* src, int64_t src_stride, uint16_t* cache, int64_t slot,
                   int64_t start, int64_t S, int64_t kv_heads, int64_t head_dim,
                   int64_t capacity) {
  for (int64_t t = 0; t < S; ++t)
    for (int64_t h = 0; h < kv_heads; ++h) {
      const float* from = src + t * src_stride + h * head_dim;
      uint16_t* to = cache + ((slot * kv_heads + h) * capacity + start + t) * head_dim;
      for (int64_t c = 0; c < head_dim; ++c) to[c] = bf16_round(from[c]);
    }
}

}  // namespace xcompile
