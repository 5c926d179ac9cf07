// The MatMulNBits weight layout as the INT8 / INT4 kernels walk it (see gemv_nbits.cpp's header
// for the layout itself). Shared by gemv_nbits.cpp (fp32 activations) and gemv_nbits_vnni.cpp
// (int8-quantized activations).
#pragma once

#include <algorithm>
#include <cstdint>

namespace xcompile {

// One weight row n: its bytes (k_blocks * blob, blocks back to back), scales, zero points.
struct Row {
  const uint8_t* q;
  const float* s;
  const uint8_t* z;  // null: 2^(bits-1)
};

struct NBits {
  const uint8_t* B;
  const float* scales;
  const uint8_t* zero_points;
  int64_t K, block_size, k_blocks, blob, zp_row;

  NBits(const uint8_t* B_, const float* scales_, const uint8_t* zp_, int64_t K_, int bits,
        int64_t block_size_)
      : B(B_), scales(scales_), zero_points(zp_), K(K_), block_size(block_size_),
        k_blocks((K_ + block_size_ - 1) / block_size_), blob(block_size_ * bits / 8),
        zp_row(bits == 8 ? k_blocks : (k_blocks + 1) / 2) {}

  Row row(int64_t n) const {
    return {B + n * k_blocks * blob, scales + n * k_blocks,
            zero_points ? zero_points + n * zp_row : nullptr};
  }
  int64_t block_len(int64_t b) const { return std::min(block_size, K - b * block_size); }
};

template <int BITS>
inline int zero_point(const Row& row, int64_t b) {
  if (!row.z) return 1 << (BITS - 1);
  if constexpr (BITS == 8) {
    return row.z[b];
  } else {
    return (row.z[b / 2] >> ((b & 1) * 4)) & 0xF;  // branch-free: blocks alternate nibbles
  }
}

}  // namespace xcompile
