// bfloat16 <-> fp32 in plain C++: bf16 is the top half of an fp32.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace xcompile {

inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// fp32 bits -> bf16 bits rounded to nearest even (a NaN stays a NaN); branch-free integer code,
// so loops over it vectorize (gemm_tiles.cpp packs x with it)
inline uint32_t bf16_round_bits(uint32_t bits) {
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return nan ? (bits >> 16) | 0x40 : (bits + 0x7FFFu + ((bits >> 16) & 1)) >> 16;
}

// fp32 -> bf16 rounded to nearest even (a NaN stays a NaN)
inline uint16_t bf16_round(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return uint16_t(bf16_round_bits(bits));
}

}  // namespace xcompile
