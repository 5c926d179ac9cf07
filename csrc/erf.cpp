// Elementwise erf, fp32, over n contiguous elements (any shape, flattened): ONNX's Erf and the exact
// Gelu's 0.5 x (1 + erf(x / sqrt 2)), which numpy has no function for. std::erf on each element;
// out may alias x.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels.h"
#include "threads.h"

namespace xcompile {

// One contiguous chunk per thread, and the pool woken only for large spans (as activations.cpp).
void erf_f32(const float* x, float* out, int64_t n) {
  const int threads = num_threads();
  const bool parallel = threads > 1 && n >= (int64_t(1) << 16);
  const int64_t chunk = parallel ? (n + threads - 1) / threads : n;
  const int64_t chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t end = std::min(n, (c + 1) * chunk);
    for (int64_t i = c * chunk; i < end; ++i) out[i] = std::erf(x[i]);
  }
}

}  // namespace xcompile
