// Rows of a MatMulNBits weight, dequantized: the embedding lookup read from the lm_head's
// quantized blocks where the two share one table (tied embeddings; passes/quantized_embedding.py).
//
// A decode step looks up one row of K per sequence, a prompt a few hundred: each row goes through
// dequantize_nbits (the vectorised dequantizer the prompts' matmuls use, bit for bit the
// reference's), one after the other. The indices are read through their pointer at every call, so
// a replayed decode step (tape.h) looks up the tokens of that step.
#include <algorithm>

#include "kernels.h"

namespace xcompile {

void gather_nbits(const uint8_t* B, BlockFloats scales, ZeroPoints zero_points,
                  const int64_t* indices, float* out, int64_t count, int64_t N, int64_t K,
                  int bits, int64_t block_size) {
  const NBits w(B, scales, zero_points, K, bits, block_size);
  for (int64_t i = 0; i < count; ++i) {
    int64_t n = indices[i];
    if (n < 0) n += N;  // counted from the end, as ONNX's Gather
    float* row = out + i * K;
    if (n < 0 || n >= N) {  // outside the table: a zero row (ONNX Runtime's GatherBlockQuantized)
      std::fill(row, row + K, 0.0f);
      continue;
    }
    const Row r = w.row(n);
    ZeroPoints zp;
    zp.packed = r.z;
    zp.values = r.zf;
    dequantize_nbits(r.q, r.s, zp, row, 1, K, bits, block_size);
  }
}

}  // namespace xcompile
