// Thread count of the kernels' OpenMP pool (like torch.set_num_threads, but for xcompile._C).
#include "threads.h"

#include <omp.h>

#include <algorithm>
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

Runs::Runs(int64_t tasks, int threads, int64_t grain)
    : threads_(threads), grain_(grain > 0 ? grain : 1), runs_(new Run[threads]) {
  if (tasks >= (int64_t(1) << 32)) throw std::invalid_argument("Runs: too many tasks");
  for (int t = 0; t < threads; ++t)  // equal contiguous runs, in order
    runs_[t].range.store(pack(tasks * t / threads, tasks * (t + 1) / threads),
                         std::memory_order_relaxed);
}

bool Runs::next(int t, int64_t& begin, int64_t& end) {
  if (t < 0 || t >= threads_) return false;  // a team larger than planned: no run of its own
  for (;;) {
    std::atomic<uint64_t>& mine = runs_[t].range;
    uint64_t r = mine.load(std::memory_order_acquire);
    while (int64_t(r >> 32) < int64_t(r & 0xFFFFFFFFu)) {
      const int64_t front = int64_t(r >> 32), back = int64_t(r & 0xFFFFFFFFu);
      // a quarter of what is left, at most a grain: the last claims are small, so no thread
      // holds a large piece of work the others cannot take when they are done
      const int64_t to = front + std::max<int64_t>(1, std::min(grain_, (back - front) / 4));
      if (mine.compare_exchange_weak(r, pack(to, back), std::memory_order_acq_rel)) {
        begin = front;
        end = to;
        return true;
      }
    }
    if (!steal(t)) return false;
  }
}

// The back half of the largest run left becomes thread t's run; false when none is left.
bool Runs::steal(int t) {
  for (;;) {
    int victim = -1;
    int64_t most = 0;
    for (int v = 0; v < threads_; ++v) {
      const uint64_t r = runs_[v].range.load(std::memory_order_acquire);
      const int64_t left = int64_t(r & 0xFFFFFFFFu) - int64_t(r >> 32);
      if (v != t && left > most) most = left, victim = v;
    }
    if (victim < 0) return false;
    uint64_t r = runs_[victim].range.load(std::memory_order_acquire);
    const int64_t front = int64_t(r >> 32), back = int64_t(r & 0xFFFFFFFFu);
    if (front >= back) continue;
    const int64_t mid = front + (back - front) / 2;  // one task left: take it
    if (runs_[victim].range.compare_exchange_strong(r, pack(front, mid),
                                                    std::memory_order_acq_rel)) {
      runs_[t].range.store(pack(mid, back), std::memory_order_release);
      return true;
    }
  }
}

}  // namespace xcompile
