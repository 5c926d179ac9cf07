// Shared-memory allreduce between the ranks (processes) of one machine: the `shm` collective of
// tensor parallelism (runtime/comm.py ShmComm), bound as xcompile._C.ShmAllReduce.
//
// One POSIX shared-memory segment, created by the launcher (rank -1: creates, does not take part)
// or by a rank that also takes part. Layout (all offsets from the start of the mapping):
//   [0, 4 KiB)            header: magic, version, ranks, sizes, attached counter, abort flag and
//                         reason, each rank's pid and start time (to tell a reused pid)
//   [4 KiB, 12 KiB)       one 64-bit sequence word per rank, 128 bytes apart (no false sharing,
//                         even with the adjacent-line prefetcher): step << 32 | chunk signature
//   [12 KiB, + ranks x 2 x slot_bytes)
//                         data: slot (r, b) = rank r's buffer b (b = 0, 1 alternate per chunk)
// slot_bytes = ranks x 64 KiB within [128 KiB, 1 MiB]; a message is reduced in chunks of that size.
#pragma once

#include <nanobind/nanobind.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>

namespace xcompile {

class ShmAllReduce {
 public:
  static constexpr int kMaxRanks = 64;

  // create: shm_open(O_CREAT | O_EXCL, 0600), size and initialise the segment; throws when the
  // name exists. rank: 0 .. ranks - 1 takes part (a non-creator retries opening until
  // timeout_s), -1 only creates (create must be true).
  ShmAllReduce(const std::string& name, int rank, int ranks, bool create, double timeout_s);
  ~ShmAllReduce();
  ShmAllReduce(const ShmAllReduce&) = delete;
  ShmAllReduce& operator=(const ShmAllReduce&) = delete;

  // In-place sum over ranks of data (n), identical bits on every rank. Every rank must make the
  // same calls with the same n. Throws std::runtime_error when a peer dies or abort() was called;
  // the object is unusable after that.
  void all_reduce_f32(float* data, int64_t n);
  void all_reduce_bf16(uint16_t* data, int64_t n);  // bf16 bits; fp32 sums, rounded once

  int attached() const;                        // ranks that have attached so far
  bool wait_attached(double timeout_s) const;  // false on timeout or abort
  void abort(const std::string& reason);       // makes every rank's collective raise; any thread
  bool aborted() const;
  void unlink();  // shm_unlink the name (idempotent); the mapping stays usable
  // munmap (idempotent); the creator also unlinks. A collective waiting in another thread raises
  // first; do not race it with abort() or attached() from a third thread.
  void close();

  const std::string& name() const { return name_; }
  int rank() const { return rank_; }
  int ranks() const { return ranks_; }

 private:
  struct Header;

  template <typename T>
  void all_reduce(T* data, int64_t n, uint32_t dtype);
  void create_segment();
  void open_segment(double timeout_s);
  void attach();
  std::atomic<uint64_t>& seq(int r) const;
  char* slot(int r, int b) const;
  void wait_for_peers(uint32_t step, uint32_t signature);
  uint64_t spin_until(int peer, uint32_t step);
  void check_peers_alive();
  [[noreturn]] void fail(const std::string& abort_reason, const std::string& message);
  [[noreturn]] void throw_aborted() const;

  std::string name_;
  int rank_, ranks_;
  bool creator_;
  size_t slot_bytes_;  // one chunk
  bool unlinked_ = false;
  char* base_ = nullptr;
  size_t bytes_ = 0;
  Header* header_ = nullptr;
  uint32_t step_ = 0;    // sync points passed; every rank counts the same
  uint64_t chunks_ = 0;  // chunks reduced; parity picks the slot buffer
  std::mutex op_mutex_;  // one collective at a time; close() waits for it
  std::atomic<bool> closing_{false};
};

// Binds ShmAllReduce into xcompile._C (called from module.cpp).
void register_shm(nanobind::module_& m);

}  // namespace xcompile
