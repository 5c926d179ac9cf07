// x quantized to int8 for the INT8 / INT4 kernels on int8 activations (MatMulNBits'
// accuracy_level 4): the scheme is in gemv_nbits_vnni.cpp's header. Shared by the VNNI kernels
// (gemv_nbits_vnni.cpp) and the AMX tile kernel (gemm_tiles.cpp).
#pragma once

#include <cstdint>
#include <new>
#include <vector>

#include "nbits.h"

namespace xcompile {

// Cache-line-aligned storage: every 64-byte load of x's units then stays within one line (a load
// that straddles two costs two; unaligned x cost the INT4 row kernel ~20 % in a microbenchmark).
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};

// x (M, K) quantized: q (M, padded) int8 (INT4: permuted in groups of 128), scale (M, units),
// c (M, k_blocks) as in gemv_nbits_vnni.cpp's header. padded: k_blocks * block_size rounded up
// to whole chunks of unit_for(bits) (zeros past K), so rows of q start on cache lines and a
// kernel reads whole chunks; units = k_blocks * block_size / unit.
struct QuantizedX {
  int64_t padded, unit, units, k_blocks;
  std::vector<int8_t, LineAligned<int8_t>> q;
  std::vector<float> scale, c;
};

// x elements per 64-byte chunk of weights (one vpdpbusd's, INT4 two)
constexpr int64_t unit_for(int bits) { return bits == 8 ? 64 : 128; }

// x (M, w.K) fp32 -> QuantizedX in units of unit_for(bits) (or block_size when smaller);
// natural: INT4's x in K's order too (the prompt GEMM's lanes are columns, gemm_nbits_vnni.cpp)
QuantizedX quantize_x(const float* x, int64_t M, const NBits& w, int bits, bool natural = false);

// Blocks smaller than a chunk (block_size < unit_for(bits): several blocks to a chunk, x's unit
// the block): gemv_nbits_vnni_small.cpp, AVX512_VNNI. The rest (whole units to a block) is
// gemv_nbits_vnni.cpp's row_vnni / rows_vnni and the AMX tiles'.
template <int BITS>
void task_vnni_small(const QuantizedX& qx, const NBits& w, int64_t M, int64_t n0, int64_t rows,
                     const float* bias, float* out, int64_t N);

}  // namespace xcompile
