// Thread count of the kernels' OpenMP pool (like torch.set_num_threads, but for xcompile._C).
#include "threads.h"

#include <omp.h>

#include <atomic>
#include <stdexcept>
#include <string>

namespace xcompile {
namespace {
std::atomic<int> pool_size{omp_get_max_threads()};  // honours OMP_NUM_THREADS at import
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1, got " + std::to_string(n));
  pool_size.store(n, std::memory_order_relaxed);
}

int num_threads() { return pool_size.load(std::memory_order_relaxed); }

}  // namespace xcompile
