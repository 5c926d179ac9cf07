// Prefill matmuls on AMX tiles: x of 16 rows and more (a prompt), BF16 or INT8 / INT4 weights.
// Decode (a few rows) stays on the vector GEMVs: there the weights' bytes, not the multiplies,
// set the pace, and a tile's 16 rows of x would be mostly padding.
//
// The weights are the tiles' A operand, read in place (INT4: nibbles unpacked to bytes, per 16
// rows): their nn.Linear / MatMulNBits rows are already "16 rows x 64 bytes per k step". x is the
// B operand, packed once per call into the VNNI layout (tiles.h). So C = W . xᵀ, (16 n x 16 m)
// tiles, written out transposed.
//   BF16:  x is carried as hi + lo, two bf16 (16 of fp32's 24 significant bits; a plain BF16
//          GEMM keeps 8), each multiplied in: results within fp32 tolerances of the fp32 GEMV,
//          for twice the tile work, which prefill on AMX has to spare.
//   INT8 / INT4: x quantized as the VNNI kernel does it (quantize_x.h); integer dots per unit
//          (TDPBUSD: u8 weights . s8 activations, exact), scaled per unit and block in fp32;
//          zero points (packed uint8 or fp32) enter only the per-block fp32 term.
// Shapes: N a multiple of 16, BF16 K a multiple of 32 (gemm_bf16_tiles_supported); the runtime's
// other shapes take the vector kernels. The body is written once (gemm_tiles_body.h) for the AMX
// unit and for its C++ model (tiles.h), which the tests run on every CPU.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "bf16.h"
#include "dispatch.h"
#include "kernels.h"
#include "nbits.h"
#include "quantize_x.h"
#include "threads.h"
#include "tiles.h"

namespace xcompile {
namespace {

// a tile kernel's work below which waking the pool costs more than it saves
constexpr int64_t kTileParallelMinElems = int64_t(1) << 16;

// x (M, K) fp32 as hi and lo bf16 in B-tile (VNNI) layout:
//   [m tile][k step of 32][pair r of the step (16)][column m of the tile (16)][2]
// rows past M are zeros
struct PackedBf16 {
  int64_t m_tiles, k_steps;
  std::vector<uint16_t, LineAligned<uint16_t>> hi, lo;
};

// One (m tile, k step) block of PackedBf16: rows j of x (16 of them, those past M stay zero) as
// hi / lo pairs, pair r of row j at [r][j] (uint32: k even in the low half), rounded by
// bf16_round_bits on uint32 lanes that the compiler vectorizes.
inline void pack_bf16_block(const float* x, int64_t rows, int64_t K, uint32_t* hi,
                            uint32_t* lo) {
  for (int64_t j = 0; j < rows; ++j) {
    uint32_t bits[32], h[32], l[32];
    std::memcpy(bits, x + j * K, sizeof bits);
    for (int i = 0; i < 32; ++i) {
      h[i] = bf16_round_bits(bits[i]);
      const uint32_t hb = h[i] << 16;
      float v, hv;
      std::memcpy(&v, &bits[i], 4);
      std::memcpy(&hv, &hb, 4);
      const float r = v - hv;
      uint32_t rb;
      std::memcpy(&rb, &r, 4);
      l[i] = bf16_round_bits(rb);
    }
    for (int r = 0; r < 16; ++r) {
      hi[r * 16 + j] = h[2 * r] | (h[2 * r + 1] << 16);
      lo[r * 16 + j] = l[2 * r] | (l[2 * r + 1] << 16);
    }
  }
}

PackedBf16 pack_bf16(const float* x, int64_t M, int64_t K) {
  PackedBf16 p;
  p.m_tiles = (M + kTileRows - 1) / kTileRows;
  p.k_steps = K / 32;
  p.hi.assign(size_t(p.m_tiles * p.k_steps * kTileRows * 32), 0);
  p.lo.assign(p.hi.size(), 0);
  auto* hi = reinterpret_cast<uint32_t*>(p.hi.data());
  auto* lo = reinterpret_cast<uint32_t*>(p.lo.data());
  const int64_t blocks = p.m_tiles * p.k_steps;
  const int threads = num_threads();
  const bool pool = threads > 1 && M * K >= kTileParallelMinElems;
#pragma omp parallel for schedule(static) num_threads(threads) if (pool)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t mt = b / p.k_steps, ks = b % p.k_steps;
    const int64_t rows = std::min<int64_t>(kTileRows, M - mt * kTileRows);
    pack_bf16_block(x + mt * kTileRows * K + ks * 32, rows, K, hi + b * 256, lo + b * 256);
  }
  return p;
}

// QuantizedX rearranged for the tiles, rows past M zero:
//   q      [m tile][64-byte chunk of the padded row][quad r of the chunk (16)][column m (16)][4]
//   scale  [m tile][unit][column m]       c  [m tile][block][column m]
struct PackedQ8 {
  int64_t m_tiles, chunks, unit, units;
  std::vector<int8_t, LineAligned<int8_t>> q;
  std::vector<float> scale, c;
};

PackedQ8 pack_q8(const QuantizedX& qx, int64_t M) {
  PackedQ8 p;
  p.m_tiles = (M + kTileRows - 1) / kTileRows;
  p.chunks = qx.padded / kTileBytes;
  p.unit = qx.unit;
  p.units = qx.units;
  p.q.assign(size_t(p.m_tiles * p.chunks * kTileRows * kTileBytes), 0);
  p.scale.assign(size_t(p.m_tiles * p.units * 16), 0.0f);
  p.c.assign(size_t(p.m_tiles * qx.k_blocks * 16), 0.0f);
  auto* q = reinterpret_cast<uint32_t*>(p.q.data());  // quads: [m tile][chunk][r][column j]
  for (int64_t m = 0; m < M; ++m) {
    const int64_t mt = m / 16, j = m % 16;
    for (int64_t ch = 0; ch < p.chunks; ++ch) {
      uint32_t quads[16];
      std::memcpy(quads, qx.q.data() + m * qx.padded + ch * kTileBytes, sizeof quads);
      uint32_t* to = q + (mt * p.chunks + ch) * 256 + j;
      for (int r = 0; r < 16; ++r) to[r * 16] = quads[r];
    }
    for (int64_t u = 0; u < p.units; ++u)
      p.scale[(mt * p.units + u) * 16 + j] = qx.scale[m * qx.units + u];
    for (int64_t b = 0; b < qx.k_blocks; ++b)
      p.c[(mt * qx.k_blocks + b) * 16 + j] = qx.c[m * qx.k_blocks + b];
  }
  return p;
}

}  // namespace

namespace emulated {
using Tiles = EmulatedTiles;
#include "gemm_tiles_body.h"
}  // namespace emulated

#if XC_X86
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")
namespace hardware {
using Tiles = AmxTiles;
#include "gemm_tiles_body.h"
}  // namespace hardware
#pragma GCC pop_options
#endif

namespace {

void check_unit(bool emulate) {
  if (!emulate && !amx_usable())
    throw std::invalid_argument(
        "this CPU (or its OS) offers no AMX tiles; pass emulate=True to run the tile kernels on "
        "their C++ model");
}

}  // namespace

bool gemm_bf16_tiles_supported(int64_t N, int64_t K) {
  return N > 0 && N % kTileRows == 0 && K > 0 && K % 32 == 0;
}

void gemm_bf16_tiles(const float* x, const uint16_t* w, const float* bias, float* out, int64_t M,
                     int64_t N, int64_t K, bool emulate) {
  check_unit(emulate);
  if (!gemm_bf16_tiles_supported(N, K))
    throw std::invalid_argument("gemm_bf16_tiles takes N a multiple of 16 and K of 32");
#if XC_X86
  if (!emulate) return hardware::gemm_bf16(x, w, bias, out, M, N, K);
#endif
  emulated::gemm_bf16(x, w, bias, out, M, N, K);
}

void gemm_nbits_q8_tiles(const float* x, const uint8_t* B, BlockFloats scales,
                         ZeroPoints zero_points, const float* bias, float* out, int64_t M,
                         int64_t N, int64_t K, int bits, int64_t block_size, bool emulate) {
  check_unit(emulate);
  if (N <= 0 || N % kTileRows != 0 || block_size < unit_for(bits))
    throw std::invalid_argument(
        "gemm_nbits_q8_tiles takes N a multiple of 16 and blocks of whole int8 units");
  const NBits w(B, scales, zero_points, K, bits, block_size);
  const QuantizedX qx = quantize_x(x, M, w, bits);
#if XC_X86
  if (!emulate) return hardware::gemm_nbits_q8(qx, w, bits, bias, out, M, N);
#endif
  emulated::gemm_nbits_q8(qx, w, bits, bias, out, M, N);
}

}  // namespace xcompile
