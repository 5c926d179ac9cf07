// The extension's own OpenMP pool size, shared by every kernel.
#pragma once

#include <omp.h>

#include <atomic>
#include <cstdint>
#include <memory>

namespace xcompile {

// Kept in our own variable and passed as num_threads(...) to each parallel region, because
// omp_set_num_threads only affects the calling thread and kernels may be called from any thread.
void set_num_threads(int n);
int num_threads();

// Tasks per grain of a decode GEMV's split (Runs, below), for tasks of task_weights weights each:
// grains of 2^18 weights (512 KiB of bf16, 256 KiB of INT8), what a thread claims from its run at
// once. (They were the chunks of OpenMP's dynamic schedule before Runs: there a static split had
// left one thread waiting on the other, and chunks of 2^16 or 2^20 weights did worse.)
inline long long chunk_tasks(long long task_weights) {
  const long long chunk = (1LL << 18) / (task_weights > 0 ? task_weights : 1);
  return chunk > 0 ? chunk : 1;
}

// The same for a matrix of `tasks` tasks on `threads` threads, at least 2 grains a thread: a
// small model's matrices are a few grains of 2^18 weights (SmolLM2-135M's 576 x 576 INT8 is 113 +
// 31 tasks of 4 rows).
inline long long chunk_tasks(long long task_weights, long long tasks, int threads) {
  const long long by_bytes = chunk_tasks(task_weights);
  const long long share = tasks / (2LL * (threads > 0 ? threads : 1));
  return share > 0 && share < by_bytes ? share : (share > 0 ? by_bytes : 1);
}

// How a decode GEMV's tasks (runs of weight rows, in memory order) go to threads: each thread owns
// one contiguous run of them, a single linear weight stream whose prefetches run on into its next
// rows, and claims a quarter of what is left of it at a time (at most `grain` tasks) from its
// front; a thread whose run is spent takes the back half of the largest run left (the host's cores do not run alike, so equal runs alone left
// one waiting). OpenMP's dynamic schedule handed out chunks in turn instead, so every chunk
// (2^18 weights: 128 KiB of INT4) began a new stream and waited for its first lines. 2 threads,
// weights from DRAM on huge pages (benchmarks/gemv_nbits.py --blocks 32): INT8 5632 x 2048 27.2
// -> 30.0 GB/s, INT4 at Q4_0's blocks 2048 x 2048 23.0 -> 24.0; decode of the 1.1B model, INT4
// at Q4_0's blocks 23.3-25.0 -> 21.7-22.5 ms a token, INT8 35.3-36.2 -> 33.6-33.7, BF16 74.4-74.9
// -> 71.7. Which rows a task holds and the order of each row's sum do not depend on the split,
// so results do not change with the thread count.
class Runs {
 public:
  Runs(int64_t tasks, int threads, int64_t grain);
  // Thread t's next tasks [begin, end); false once every task is taken.
  bool next(int t, int64_t& begin, int64_t& end);

 private:
  struct alignas(64) Run {
    std::atomic<uint64_t> range;  // front << 32 | back, tasks [front, back) not yet taken
  };
  static uint64_t pack(int64_t front, int64_t back) {
    return uint64_t(front) << 32 | uint64_t(back);
  }
  bool steal(int t);

  int threads_;
  int64_t grain_;
  std::unique_ptr<Run[]> runs_;
};

// body(begin, end) over tasks [0, tasks) on `threads` threads (one when !parallel), split as Runs
template <typename Body>
void for_runs(int64_t tasks, int threads, int64_t grain, bool parallel, const Body& body) {
  if (!parallel || threads < 2) return body(int64_t(0), tasks);
  Runs runs(tasks, threads, grain);
#pragma omp parallel num_threads(threads)
  {
    int64_t begin, end;
    while (runs.next(omp_get_thread_num(), begin, end)) body(begin, end);
  }
}

}  // namespace xcompile
