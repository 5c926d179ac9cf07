// The extension's own OpenMP pool size, shared by every kernel.
#pragma once

namespace xcompile {

// Kept in our own variable and passed as num_threads(...) to each parallel region, because
// omp_set_num_threads only affects the calling thread and kernels may be called from any thread.
void set_num_threads(int n);
int num_threads();

// Tasks per chunk of a decode GEMV's dynamic schedule, for tasks of task_weights weights each:
// chunks of 2^18 weights (512 KiB of bf16, 256 KiB of INT8). A static split left one thread
// waiting on the other (the host's cores do not run alike) and small chunks restart the
// prefetchers' streams too often: a 5632 x 2048 bf16 GEMV went from 0.83-0.87 of the read
// bandwidth (static) to 0.93-1.0, INT8 from 0.86-0.89 to 0.90-0.92, INT4 stayed at 0.75-0.78
// (benchmarks/gemv_nbits.py, 2 threads); chunks of 2^16 or 2^20 weights did worse.
inline long long chunk_tasks(long long task_weights) {
  const long long chunk = (1LL << 18) / (task_weights > 0 ? task_weights : 1);
  return chunk > 0 ? chunk : 1;
}

// The same for a matrix of `tasks` tasks on `threads` threads, at least 2 chunks a thread: a
// small model's matrices are a few chunks of 2^18 weights (SmolLM2-135M's 576 x 576 INT8 is 113 +
// 31 tasks of 4 rows), so one thread took most of the work while the other waited.
inline long long chunk_tasks(long long task_weights, long long tasks, int threads) {
  const long long by_bytes = chunk_tasks(task_weights);
  const long long share = tasks / (2LL * (threads > 0 ? threads : 1));
  return share > 0 && share < by_bytes ? share : (share > 0 ? by_bytes : 1);
}

}  // namespace xcompile
