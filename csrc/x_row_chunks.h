// How a decode GEMV takes a few rows of x (batched decode: M up to a handful) against each block
// of weight rows: in equal chunks of at most the kernel's rows (M = 5 with chunks of 4 is 3 + 2,
// not 4 + 1), since each chunk re-reads and re-converts the weight block (from cache), so a
// 1-row chunk would cost nearly as much as a full one. Shared by gemv.cpp, gemv_nbits.cpp and
// gemm_dpbf16_body.h.
#pragma once

#include <cstdint>

namespace xcompile {

// fn(m0, mb) for each chunk, rows m0 .. m0 + mb - 1 of x (M rows, at most `most` a chunk)
template <typename Fn>
inline void x_row_chunks(int64_t M, int64_t most, const Fn& fn) {
  const int64_t chunks = (M + most - 1) / most;
  for (int64_t c = 0, m0 = 0; c < chunks; ++c) {
    const int mb = int((M - m0 + (chunks - c) - 1) / (chunks - c));
    fn(m0, mb);
    m0 += mb;
  }
}

}  // namespace xcompile
