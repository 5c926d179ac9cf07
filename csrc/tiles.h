// AMX tiles, two ways: the hardware unit (AmxTiles: tileloadd, tdpbf16ps, tdpbusd) and a plain
// C++ model of it (EmulatedTiles) that runs on any CPU. The tile kernels (gemm_tiles.cpp) are
// written once against this interface and instantiated for both, so their blocking, packing and
// tails are tested everywhere, and on a CPU with AMX the two are held to each other (integer dots
// are exact; the model adds TDPBF16PS's products in the order of the SDM's operation section).
//
// Every kernel uses one configuration: 8 tiles of 16 rows x 64 bytes (palette 1), that is
// 16 x 16 fp32 / int32 accumulators, 16 x 32 bf16 or 16 x 64 int8 operands. The "B" operand of a
// dot product is in VNNI layout: row r holds, for each of 16 columns, the 2 (bf16) or 4 (int8)
// consecutive k of pair / quad r. Tile numbers are template arguments: AMX encodes them in the
// instruction.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "dispatch.h"

#if XC_X86
#include <immintrin.h>
#define XC_TARGET_AMX                                                                      \
  __attribute__((                                                                          \
      target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
#endif

namespace xcompile {

constexpr int kTileRows = 16;   // rows of every tile
constexpr int kTileBytes = 64;  // bytes of every tile row

// The 64-byte configuration ldtilecfg reads: palette 1, every tile 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) colsb[t] = kTileBytes, rows[t] = kTileRows;
  }
};

static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

// Whether this CPU has AMX-TILE, AMX-BF16 and AMX-INT8 (and AVX-512 VNNI) and the OS lets this
// process use them (Linux: XCR0's tile state, granted by arch_prctl(ARCH_REQ_XCOMP_PERM)): the
// best ISA is amx.
bool amx_usable();

// ---- the model: what each instruction does, per the Intel SDM's pseudocode ---------------------
struct EmulatedTiles {
  struct Unit {
    alignas(64) uint8_t t[8][kTileRows][kTileBytes];
  };
  static Unit& unit() {
    static thread_local Unit u;  // tile registers are per thread
    return u;
  }
  static void begin() { std::memset(&unit(), 0, sizeof(Unit)); }
  static void end() {}
  template <int T>
  static void zero() {
    std::memset(unit().t[T], 0, sizeof unit().t[T]);
  }
  template <int T>
  static void load(const void* p, int64_t stride) {
    for (int r = 0; r < kTileRows; ++r)
      std::memcpy(unit().t[T][r], static_cast<const uint8_t*>(p) + r * stride, kTileBytes);
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    for (int r = 0; r < kTileRows; ++r)
      std::memcpy(static_cast<uint8_t*>(p) + r * stride, unit().t[T][r], kTileBytes);
  }
  // C (16 x 16 fp32) += A (16 rows x 16 bf16 pairs) . B (16 pairs x 16 columns, VNNI).
  // As the SDM's operation section has it: per row, the pairs' first and second products are
  // summed apart over k (from zero), then both are added to C; bf16 inputs that are denormal
  // count as zero and denormal fp32 results flush to zero. Products of bf16 are exact in fp32,
  // so only the adds round (to nearest even, as C++ does).
  template <int C, int A, int B>
  static void dpbf16ps() {
    Unit& u = unit();
    for (int m = 0; m < kTileRows; ++m) {
      float even[16] = {}, odd[16] = {};
      for (int k = 0; k < kTileRows; ++k)
        for (int n = 0; n < 16; ++n) {
          even[n] = ftz(even[n] + bf16(&u.t[A][m][4 * k]) * bf16(&u.t[B][k][4 * n]));
          odd[n] = ftz(odd[n] + bf16(&u.t[A][m][4 * k + 2]) * bf16(&u.t[B][k][4 * n + 2]));
        }
      for (int n = 0; n < 16; ++n) {
        float c;
        std::memcpy(&c, &u.t[C][m][4 * n], 4);
        c = ftz(c + ftz(even[n] + odd[n]));
        std::memcpy(&u.t[C][m][4 * n], &c, 4);
      }
    }
  }
  // C (16 x 16 int32) += A (16 rows x 16 quads of u8) . B (16 quads x 16 columns of s8, VNNI)
  template <int C, int A, int B>
  static void dpbusd() {
    Unit& u = unit();
    for (int m = 0; m < kTileRows; ++m)
      for (int k = 0; k < kTileRows; ++k)
        for (int n = 0; n < 16; ++n) {
          int32_t c;
          std::memcpy(&c, &u.t[C][m][4 * n], 4);
          for (int i = 0; i < 4; ++i)
            c += int32_t(u.t[A][m][4 * k + i]) * int32_t(int8_t(u.t[B][k][4 * n + i]));
          std::memcpy(&u.t[C][m][4 * n], &c, 4);
        }
  }

 private:
  static float bf16(const uint8_t* p) {  // a denormal input counts as zero
    uint16_t h;
    std::memcpy(&h, p, 2);
    return ftz(bf16_to_f32(h));
  }
  static float ftz(float f) { return std::fpclassify(f) == FP_SUBNORMAL ? f * 0.0f : f; }
};

#if XC_X86
// ---- the hardware ------------------------------------------------------------------------------
// GCC's tile intrinsics paste their tile numbers into the instruction text, so they take
// literals only: a template's tile number reaches them through these if-constexpr ladders.
#define XC_AMX_INLINE XC_TARGET_AMX __attribute__((always_inline)) inline
#define XC_ON_TILE(T, F, ...)                                                    \
  static_assert(T >= 0 && T < 8, "tiles are 0 .. 7");                            \
  if constexpr (T == 0) F(0, ##__VA_ARGS__);                                     \
  else if constexpr (T == 1) F(1, ##__VA_ARGS__);                                \
  else if constexpr (T == 2) F(2, ##__VA_ARGS__);                                \
  else if constexpr (T == 3) F(3, ##__VA_ARGS__);                                \
  else if constexpr (T == 4) F(4, ##__VA_ARGS__);                                \
  else if constexpr (T == 5) F(5, ##__VA_ARGS__);                                \
  else if constexpr (T == 6) F(6, ##__VA_ARGS__);                                \
  else F(7, ##__VA_ARGS__)
// the (accumulator, A, B) triples the kernels use
#define XC_ON_TRIPLE(C, A, B, F)                                                 \
  if constexpr (C == 0 && A == 2 && B == 4) F(0, 2, 4);                          \
  else if constexpr (C == 1 && A == 2 && B == 5) F(1, 2, 5);                     \
  else if constexpr (C == 0 && A == 3 && B == 6) F(0, 3, 6);                     \
  else if constexpr (C == 0 && A == 3 && B == 7) F(0, 3, 7);                     \
  else if constexpr (C == 1 && A == 4 && B == 6) F(1, 4, 6);                     \
  else if constexpr (C == 1 && A == 4 && B == 7) F(1, 4, 7);                     \
  else if constexpr (C == 2 && A == 5 && B == 6) F(2, 5, 6);                     \
  else if constexpr (C == 2 && A == 5 && B == 7) F(2, 5, 7);                     \
  else static_assert(C < 0, "add this tile triple to XC_ON_TRIPLE")
struct AmxTiles {
  XC_AMX_INLINE static void begin() {
    static const TileConfig config;
    _tile_loadconfig(&config);
  }
  XC_AMX_INLINE static void end() { _tile_release(); }
  template <int T>
  XC_AMX_INLINE static void zero() {
    XC_ON_TILE(T, _tile_zero);
  }
  template <int T>
  XC_AMX_INLINE static void load(const void* p, int64_t stride) {
    XC_ON_TILE(T, _tile_loadd, p, stride);
  }
  template <int T>
  XC_AMX_INLINE static void store(void* p, int64_t stride) {
    XC_ON_TILE(T, _tile_stored, p, stride);
  }
  template <int C, int A, int B>
  XC_AMX_INLINE static void dpbf16ps() {
    XC_ON_TRIPLE(C, A, B, _tile_dpbf16ps);
  }
  template <int C, int A, int B>
  XC_AMX_INLINE static void dpbusd() {
    XC_ON_TRIPLE(C, A, B, _tile_dpbusd);
  }
};
#undef XC_ON_TILE
#undef XC_ON_TRIPLE
#undef XC_AMX_INLINE
#endif

}  // namespace xcompile
