// The MatMulNBits weight layout as the INT8 / INT4 kernels walk it (see gemv_nbits.cpp's header
// for the layout itself). Shared by gemv_nbits.cpp (fp32 activations), gemv_nbits_vnni.cpp
// (int8-quantized activations) and the tile kernels (gemm_tiles_body.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "dispatch.h"

#if XC_X86
#include <immintrin.h>
#endif

namespace xcompile {

// fp16 bits -> fp32, exact for every value (normal, subnormal, zero, inf, NaN), without F16C:
// the scalar reads of half scales run in plain and AVX2 code alike (the vector kernels widen 16
// at a time with vcvtph2ps, which gives the same values)
inline float half_to_float(uint16_t h) {
  const uint32_t magnitude = h & 0x7FFFu;
  float value;
  if (magnitude >= 0x0400u) {  // normal (exponent rebased 15 -> 127), or inf / NaN (31 -> 255)
    uint32_t bits = (magnitude << 13) + (uint32_t(127 - 15) << 23);
    if (magnitude >= 0x7C00u) bits += uint32_t(127 - 15) << 23;
    std::memcpy(&value, &bits, 4);
  } else {  // subnormal or zero: mantissa * 2^-24, exact in fp32
    value = float(magnitude) * 0x1p-24f;
  }
  return (h & 0x8000u) ? -value : value;
}

// One float per block (a weight's scales, or its float zero points: (N, k_blocks)), stored fp32
// or fp16 (llama.cpp's Q4_0 / Q8_0 keep the block scale in fp16, Q4_1 its min too: half the
// bytes a decode step reads for them, 0.5 bit a weight each at blocks of 32). At most one of f
// and h is set (neither: none given); v[b] is block b's value as fp32 either way.
struct BlockFloats {
  const float* f = nullptr;
  const uint16_t* h = nullptr;

  BlockFloats() = default;
  BlockFloats(const float* f_) : f(f_) {}  // NOLINT: fp32, as every caller had them
  static BlockFloats half(const uint16_t* h_) {
    BlockFloats s;
    s.h = h_;
    return s;
  }
  static BlockFloats at(const void* address, bool half_floats) {
    return half_floats ? half(static_cast<const uint16_t*>(address))
                       : BlockFloats(static_cast<const float*>(address));
  }
  explicit operator bool() const { return f || h; }
  float operator[](int64_t b) const { return h ? half_to_float(h[b]) : f[b]; }
  BlockFloats operator+(int64_t b) const { return h ? half(h + b) : BlockFloats(f + b); }
  const void* address(int64_t b) const {  // block b's value (prefetches)
    return h ? static_cast<const void*>(h + b) : static_cast<const void*>(f + b);
  }
};

#if XC_X86
// Blocks b .. b + 15's values as 16 fp32 lanes, those past `live` zero (nothing past them read)
XC_TARGET_AVX512 __attribute__((always_inline)) inline __m512 floats16(const BlockFloats& s,
                                                                    int64_t b,
                                                                    __mmask16 live = 0xFFFF) {
  if (s.h) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, s.h + b));
  return _mm512_maskz_loadu_ps(live, s.f + b);
}
#endif

// A weight's zero points, one of three kinds: packed uint8 (INT8 (N, k_blocks); INT4
// (N, ceil(k_blocks / 2)), block 2j in the low nibble), float (N, k_blocks; fp32 or fp16) like
// the scales (ONNX Runtime's zero points of A's type: K-quant style "scale and min",
// min = -zp * scale), or neither (2^(bits-1)).
struct ZeroPoints {
  const uint8_t* packed = nullptr;
  BlockFloats values;
};

// One weight row n: its bytes (k_blocks * blob, blocks back to back), scales, zero points.
struct Row {
  const uint8_t* q;
  BlockFloats s;
  const uint8_t* z;   // packed zero points, or null
  BlockFloats zf;     // float zero points, or none (neither: 2^(bits-1))
};

struct NBits {
  const uint8_t* B;
  BlockFloats scales;
  ZeroPoints zero_points;
  int64_t K, block_size, k_blocks, blob, zp_row;

  NBits(const uint8_t* B_, BlockFloats scales_, ZeroPoints zp_, int64_t K_, int bits,
        int64_t block_size_)
      : B(B_), scales(scales_), zero_points(zp_), K(K_), block_size(block_size_),
        k_blocks((K_ + block_size_ - 1) / block_size_), blob(block_size_ * bits / 8),
        zp_row(bits == 8 ? k_blocks : (k_blocks + 1) / 2) {}

  Row row(int64_t n) const {
    return {B + n * k_blocks * blob, scales + n * k_blocks,
            zero_points.packed ? zero_points.packed + n * zp_row : nullptr,
            zero_points.values ? zero_points.values + n * k_blocks : BlockFloats()};
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

#if XC_X86
// Blocks b .. b + 15's zero points (b a multiple of 16) as 16 fp32 lanes, those past `live`
// zero (nothing past them read): float ones as floats16 reads them, packed ones widened
template <int BITS>
XC_TARGET_AVX512 __attribute__((always_inline)) inline __m512 zero_points16(
    const Row& row, int64_t b, __mmask16 live = 0xFFFF) {
  if (row.zf) return floats16(row.zf, b, live);
  if (!row.z) return _mm512_set1_ps(float(1 << (BITS - 1)));
  __m128i z;
  if constexpr (BITS == 8) {
    z = _mm_maskz_loadu_epi8(live, row.z + b);
  } else {  // two blocks a byte, the low nibble first: ceil(live blocks / 2) bytes
    const __mmask16 bytes = __mmask16((1u << ((__builtin_popcount(live) + 1) / 2)) - 1);
    const __m128i packed = _mm_maskz_loadu_epi8(bytes, row.z + b / 2);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    z = _mm_unpacklo_epi8(_mm_and_si128(packed, low4),
                          _mm_and_si128(_mm_srli_epi16(packed, 4), low4));
  }
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(z));
}
#endif

}  // namespace xcompile
