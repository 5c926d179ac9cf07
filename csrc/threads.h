// The extension's own OpenMP pool size, shared by every kernel.
#pragma once

namespace xcompile {

// Kept in our own variable and passed as num_threads(...) to each parallel region, because
// omp_set_num_threads only affects the calling thread and kernels may be called from any thread.
void set_num_threads(int n);
int num_threads();

}  // namespace xcompile
