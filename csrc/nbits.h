// The MatMulNBits weight layout as the INT8 / INT4 kernels walk it (see gemv_nbits.cpp's header
// for the layout itself). Shared by gemv_nbits.cpp (fp32 activations), gemv_nbits_vnni.cpp
// (int8-quantized activations) and the tile kernels (gemm_tiles_body.h).
#pragma once

#include <algorithm>
#include <cstdint>

namespace xcompile {

// A weight's zero points, one of three kinds: packed uint8 (INT8 (N, k_blocks); INT4
// (N, ceil(k_blocks / 2)), block 2j in the low nibble), float (N, k_blocks) like the scales
// (ONNX Runtime's zero points of A's type: K-quant style "scale and min", min = -zp * scale), or
// neither (2^(bits-1)).
struct ZeroPoints {
  const uint8_t* packed = nullptr;
  const float* values = nullptr;
};

// One weight row n: its bytes (k_blocks * blob, blocks back to back), scales, zero points.
struct Row {
  const uint8_t* q;
  const float* s;
  const uint8_t* z;   // packed zero points, or null
  const float* zf;    // float zero points, or null (both null: 2^(bits-1))
};

struct NBits {
  const uint8_t* B;
  const float* scales;
  ZeroPoints zero_points;
  int64_t K, block_size, k_blocks, blob, zp_row;

  NBits(const uint8_t* B_, const float* scales_, ZeroPoints zp_, int64_t K_, int bits,
        int64_t block_size_)
      : B(B_), scales(scales_), zero_points(zp_), K(K_), block_size(block_size_),
        k_blocks((K_ + block_size_ - 1) / block_size_), blob(block_size_ * bits / 8),
        zp_row(bits == 8 ? k_blocks : (k_blocks + 1) / 2) {}

  Row row(int64_t n) const {
    return {B + n * k_blocks * blob, scales + n * k_blocks,
            zero_points.packed ? zero_points.packed + n * zp_row : nullptr,
            zero_points.values ? zero_points.values + n * k_blocks : nullptr};
  }
  int64_t block_len(int64_t b) const { return std::min(block_size, K - b * block_size); }
};

// Block b's zero point as a float. Every kernel dequantizes (float(q) - zp) * s: for integer zero
// points float(q) - zp is exact, so that is (q - zp) * s with one rounding, as before.
template <int BITS>
inline float zero_point(const Row& row, int64_t b) {
  if (row.zf) return row.zf[b];
  if (!row.z) return float(1 << (BITS - 1));
  if constexpr (BITS == 8) {
    return float(row.z[b]);
  } else {
    return float((row.z[b / 2] >> ((b & 1) * 4)) & 0xF);  // branch-free: blocks alternate nibbles
  }
}

}  // namespace xcompile
