// Shared-memory allreduce between the ranks of one machine (layout in shm_allreduce.h).
//
// Protocol, per chunk c of a message (buffer b = c % 2; data (len) = this chunk of the message):
//   1. copy data into my slot (me, b); publish my next step; wait until every peer has reached it
//   small (len <= kSmallMaxBytes):
//   2. data = sum over ranks r (in rank order) of slot (r, b)                        (one step)
//   large: reduce-scatter, then all-gather                                          (two steps)
//   2. rank r sums portion r of every slot and writes it into portion r of its own slot (no peer
//      reads that portion before step 3); publish, wait
//   3. data[portion r] = slot (r, b)[portion r] for every r
// No closing barrier ("everyone has read my slot") is needed: a peer reads slot (me, b) of chunk
// c - 2 only before it publishes chunk c - 1's first step, and I write slot (me, b) for chunk c
// only after waiting for that step from everyone. Sums run in a fixed order, so every rank gets
// the same bits.
//
// A step's sequence word also carries the chunk's signature (length, dtype, path): ranks that make
// different calls fail with a message instead of reducing garbage. Waiting spins with pause; every
// 1024 spins it checks the abort flag, and every 20 ms whether each peer's pid is alive (not gone,
// not a zombie, not reused), so a dead peer stops the others within milliseconds. There is no
// time-out while peers live. After 50 us of waiting each check also yields the core (ranks may
// share cores); after 10 ms (longer than rank 0 takes to sample a token, so decode never gets
// there) the spin turns into 50 us sleeps: followers may idle for long, e.g. on user input.
#include "shm_allreduce.h"

#include <fcntl.h>
#include <nanobind/stl/string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <new>
#include <stdexcept>
#include <thread>

#include "dispatch.h"

#if XC_X86
#include <immintrin.h>
#endif

namespace xcompile {

namespace {

constexpr uint64_t kMagic = 0x31524853504d4358ull;  // "XCMPSHR1" little-endian
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 4096;
constexpr size_t kSeqStride = 128;
constexpr size_t kDataOffset = kHeaderBytes + ShmAllReduce::kMaxRanks * kSeqStride;
// Up to here every rank reduces every slot (one step); beyond, reduce-scatter + all-gather (two)
// moves less data per rank. Measured with 2 ranks: one step is faster at 16 KiB, even at 32 KiB,
// slower at 64 KiB.
constexpr size_t kSmallMaxBytes = size_t(32) << 10;
constexpr size_t kReasonBytes = 256;
constexpr uint32_t kDtypeF32 = 0, kDtypeBf16 = 1;

using Clock = std::chrono::steady_clock;

// Chunk (= slot buffer) size: small enough that a chunk copied in is still in the writer's L2 when
// the peers read it (4 MiB chunks ran 2x slower than 128 KiB at 4 and 16 MiB messages), large
// enough that each rank's reduce-scatter portion (64 KiB) outweighs a barrier.
size_t chunk_bytes(int ranks) {
  return std::clamp(size_t(ranks) * (size_t(64) << 10), size_t(128) << 10, size_t(1) << 20);
}

size_t segment_bytes(int ranks) { return kDataOffset + size_t(ranks) * 2 * chunk_bytes(ranks); }

std::string errno_text() { return std::strerror(errno); }

// pid's state letter and start time (clock ticks after boot) from /proc/<pid>/stat.
bool read_proc_stat(int pid, char* state, uint64_t* start_time) {
  char path[64], buf[1024];
  std::snprintf(path, sizeof path, "/proc/%d/stat", pid);
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const ssize_t got = ::read(fd, buf, sizeof buf - 1);
  ::close(fd);
  if (got <= 0) return false;
  buf[got] = 0;
  const char* p = std::strrchr(buf, ')');  // the command name may hold spaces and ')'
  if (!p || p[1] != ' ') return false;
  *state = p[2];
  p += 2;
  for (int field = 3; field < 22; ++field) {  // starttime is field 22
    p = std::strchr(p, ' ');
    if (!p) return false;
    ++p;
  }
  *start_time = std::strtoull(p, nullptr, 10);
  return true;
}

uint64_t own_start_time() {
  char state;
  uint64_t start = 0;
  return read_proc_stat(int(::getpid()), &state, &start) ? start : 0;
}

inline void cpu_pause() {
#if XC_X86
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// ---- reduce: dst[i] = src[0][i] + src[1][i] + ... in that order (dst may be one of src) ---------
inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch's .to(bfloat16)
  if (f != f) return 0x7fc0;
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

void reduce_f32_scalar(const float* const* src, int nsrc, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float acc = src[0][i];
    for (int p = 1; p < nsrc; ++p) acc += src[p][i];
    dst[i] = acc;
  }
}

void reduce_bf16_scalar(const uint16_t* const* src, int nsrc, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float acc = bf16_to_f32(src[0][i]);
    for (int p = 1; p < nsrc; ++p) acc += bf16_to_f32(src[p][i]);
    dst[i] = f32_to_bf16(acc);
  }
}

#if XC_X86
XC_TARGET_AVX2 void reduce_f32_avx2(const float* const* src, int nsrc, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {  // 4 independent vectors per source: loads in flight
    __m256 a[4];
    for (int v = 0; v < 4; ++v) a[v] = _mm256_loadu_ps(src[0] + i + 8 * v);
    for (int p = 1; p < nsrc; ++p)
      for (int v = 0; v < 4; ++v) a[v] = _mm256_add_ps(a[v], _mm256_loadu_ps(src[p] + i + 8 * v));
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(dst + i + 8 * v, a[v]);
  }
  for (; i + 8 <= n; i += 8) {
    __m256 a = _mm256_loadu_ps(src[0] + i);
    for (int p = 1; p < nsrc; ++p) a = _mm256_add_ps(a, _mm256_loadu_ps(src[p] + i));
    _mm256_storeu_ps(dst + i, a);
  }
  for (; i < n; ++i) {
    float acc = src[0][i];
    for (int p = 1; p < nsrc; ++p) acc += src[p][i];
    dst[i] = acc;
  }
}

XC_TARGET_AVX2 inline __m256 load8_bf16(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

XC_TARGET_AVX2 inline void store8_bf16(uint16_t* p, __m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0),
                         _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  // packus works per 128-bit lane: [r0..3 r0..3 | r4..7 r4..7] -> qwords 0 and 2 in order
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

XC_TARGET_AVX2 void reduce_bf16_avx2(const uint16_t* const* src, int nsrc, uint16_t* dst,
                                     int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256 a[4];
    for (int v = 0; v < 4; ++v) a[v] = load8_bf16(src[0] + i + 8 * v);
    for (int p = 1; p < nsrc; ++p)
      for (int v = 0; v < 4; ++v) a[v] = _mm256_add_ps(a[v], load8_bf16(src[p] + i + 8 * v));
    for (int v = 0; v < 4; ++v) store8_bf16(dst + i + 8 * v, a[v]);
  }
  if (i < n) {
    const uint16_t* rest[ShmAllReduce::kMaxRanks];
    for (int p = 0; p < nsrc; ++p) rest[p] = src[p] + i;
    reduce_bf16_scalar(rest, nsrc, dst + i, n - i);
  }
}

XC_TARGET_AVX512 void reduce_f32_avx512(const float* const* src, int nsrc, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __m512 a[4];
    for (int v = 0; v < 4; ++v) a[v] = _mm512_loadu_ps(src[0] + i + 16 * v);
    for (int p = 1; p < nsrc; ++p)
      for (int v = 0; v < 4; ++v) a[v] = _mm512_add_ps(a[v], _mm512_loadu_ps(src[p] + i + 16 * v));
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(dst + i + 16 * v, a[v]);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    __m512 a = _mm512_maskz_loadu_ps(m, src[0] + i);
    for (int p = 1; p < nsrc; ++p) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(m, src[p] + i));
    _mm512_mask_storeu_ps(dst + i, m, a);
  }
}

XC_TARGET_AVX512 inline __m512 load16_bf16(const uint16_t* p, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

XC_TARGET_AVX512 inline void store16_bf16(uint16_t* p, __m512 x, __mmask16 m) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

XC_TARGET_AVX512 void reduce_bf16_avx512(const uint16_t* const* src, int nsrc, uint16_t* dst,
                                         int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    __m512 a = load16_bf16(src[0] + i, m);
    for (int p = 1; p < nsrc; ++p) a = _mm512_add_ps(a, load16_bf16(src[p] + i, m));
    store16_bf16(dst + i, a, m);
  }
}
#endif

template <typename T>
using ReduceFn = void (*)(const T* const* src, int nsrc, T* dst, int64_t n);

template <typename T>
ReduceFn<T> pick_reduce();

template <>
ReduceFn<float> pick_reduce<float>() {
  switch (current_isa()) {
#if XC_X86
    case Isa::amx:
    case Isa::avx512_bf16:
    case Isa::avx512_vnni:
    case Isa::avx512: return reduce_f32_avx512;
    case Isa::avx2: return reduce_f32_avx2;
#endif
    default: return reduce_f32_scalar;
  }
}

template <>
ReduceFn<uint16_t> pick_reduce<uint16_t>() {
  switch (current_isa()) {
#if XC_X86
    case Isa::amx:
    case Isa::avx512_bf16:
    case Isa::avx512_vnni:
    case Isa::avx512: return reduce_bf16_avx512;
    case Isa::avx2: return reduce_bf16_avx2;
#endif
    default: return reduce_bf16_scalar;
  }
}

}  // namespace

struct ShmAllReduce::Header {
  std::atomic<uint64_t> magic;  // stored last (release) by the creator: the segment is ready
  uint32_t version;
  int32_t ranks;
  uint64_t total_bytes;
  uint64_t slot_bytes;
  int32_t creator_pid;
  alignas(64) std::atomic<int32_t> attached;
  std::atomic<int32_t> abort_state;  // 0 running, 1 a reason is being written, 2 aborted
  char abort_reason[kReasonBytes];
  struct Rank {
    std::atomic<int32_t> pid;  // 0 until the rank attaches
    std::atomic<uint64_t> start_time;
  } rank[kMaxRanks];
};

static_assert(std::atomic<uint64_t>::is_always_lock_free &&
                  std::atomic<int32_t>::is_always_lock_free,
              "atomics in shared memory must be lock-free (address-free)");

ShmAllReduce::ShmAllReduce(const std::string& name, int rank, int ranks, bool create,
                           double timeout_s)
    : name_(name.empty() || name[0] != '/' ? "/" + name : name),
      rank_(rank),
      ranks_(ranks),
      creator_(create),
      slot_bytes_(chunk_bytes(ranks)) {
  static_assert(sizeof(Header) <= kHeaderBytes, "header outgrew its page");
  if (name_.size() < 2 || name_.find('/', 1) != std::string::npos || name_.size() > 255)
    throw std::invalid_argument(
        "ShmAllReduce: name must be one path component like /xcompile-1234, got '" + name + "'");
  if (ranks < 1 || ranks > kMaxRanks)
    throw std::invalid_argument("ShmAllReduce: ranks must be 1 .. " + std::to_string(kMaxRanks) +
                                ", got " + std::to_string(ranks));
  if (rank < -1 || rank >= ranks || (rank == -1 && !create))
    throw std::invalid_argument(
        "ShmAllReduce: rank must be 0 .. ranks - 1 (or -1 with create=True), got " +
        std::to_string(rank));
  if (create)
    create_segment();
  else
    open_segment(timeout_s);
  if (rank_ >= 0) {
    try {
      attach();
    } catch (...) {
      close();
      throw;
    }
  }
}

ShmAllReduce::~ShmAllReduce() { close(); }

void ShmAllReduce::create_segment() {
  const int fd = ::shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    if (errno == EEXIST)
      throw std::runtime_error(
          "shared memory segment " + name_ +
          " already exists: another run uses this name, or a killed one left /dev/shm" + name_ +
          " behind (remove it)");
    throw std::runtime_error("shm_open(" + name_ + ") failed: " + errno_text());
  }
  bytes_ = segment_bytes(ranks_);
  auto give_up = [&](const std::string& what) {
    const std::string message = what + errno_text();
    ::close(fd);
    ::shm_unlink(name_.c_str());
    throw std::runtime_error(message);
  };
  if (::ftruncate(fd, off_t(bytes_)) != 0) give_up("ftruncate of " + name_ + " failed: ");
  // Reserve the pages now: on a full tmpfs a later first touch would be SIGBUS, not an error.
  if (const int err = ::posix_fallocate(fd, 0, off_t(bytes_));
      err != 0 && err != EINVAL && err != EOPNOTSUPP) {
    errno = err;
    give_up("cannot reserve " + std::to_string(bytes_ >> 20) + " MiB in /dev/shm for " + name_ +
            " (free space there, or raise its size, e.g. docker --shm-size): ");
  }
  void* p = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) give_up("mmap of " + name_ + " failed: ");
  ::close(fd);
  base_ = static_cast<char*>(p);
  header_ = new (base_) Header();
  header_->version = kVersion;
  header_->ranks = ranks_;
  header_->total_bytes = bytes_;
  header_->slot_bytes = slot_bytes_;
  header_->creator_pid = int32_t(::getpid());
  header_->magic.store(kMagic, std::memory_order_release);
}

void ShmAllReduce::open_segment(double timeout_s) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(std::max(0.0, timeout_s));
  for (;;) {
    const int fd = ::shm_open(name_.c_str(), O_RDWR | O_CLOEXEC, 0);
    if (fd < 0 && errno != ENOENT)
      throw std::runtime_error("shm_open(" + name_ + ") failed: " + errno_text());
    if (fd >= 0) {
      struct stat st;
      void* p = MAP_FAILED;
      if (::fstat(fd, &st) == 0 && size_t(st.st_size) >= kHeaderBytes)
        p = ::mmap(nullptr, size_t(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      ::close(fd);
      if (p != MAP_FAILED) {
        auto* h = static_cast<Header*>(p);
        const uint64_t magic = h->magic.load(std::memory_order_acquire);
        if (magic == kMagic) {
          std::string problem;
          if (h->version != kVersion)
            problem = "has layout version " + std::to_string(h->version) + ", this build expects " +
                      std::to_string(kVersion) + ": run every rank with the same xcompile build";
          else if (h->ranks != ranks_)
            problem = "was created for " + std::to_string(h->ranks) + " ranks, not " +
                      std::to_string(ranks_);
          else if (h->total_bytes != segment_bytes(ranks_) ||
                   size_t(st.st_size) != h->total_bytes || h->slot_bytes != slot_bytes_)
            problem =
                "has a size this build does not expect: run every rank with the same xcompile "
                "build";
          if (!problem.empty()) {
            ::munmap(p, size_t(st.st_size));
            throw std::runtime_error("shared memory segment " + name_ + " " + problem);
          }
          base_ = static_cast<char*>(p);
          bytes_ = size_t(st.st_size);
          header_ = h;
          return;
        }
        ::munmap(p, size_t(st.st_size));
        if (magic != 0)
          throw std::runtime_error("shared memory segment " + name_ +
                                   " is not an xcompile allreduce segment");
      }
    }
    if (Clock::now() >= deadline) {
      char secs[32];
      std::snprintf(secs, sizeof secs, "%g", timeout_s);
      throw std::runtime_error("shared memory segment " + name_ + " did not appear within " + secs +
                               " s: start the ranks with the launcher (xrun), which creates it");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

void ShmAllReduce::attach() {
  auto& me = header_->rank[rank_];
  int32_t expected = 0;
  if (!me.pid.compare_exchange_strong(expected, int32_t(::getpid()), std::memory_order_acq_rel))
    throw std::runtime_error("rank " + std::to_string(rank_) + " of " + name_ +
                             " is already taken by pid " + std::to_string(expected) +
                             ": every rank needs its own rank number");
  me.start_time.store(own_start_time(), std::memory_order_release);
  header_->attached.fetch_add(1, std::memory_order_acq_rel);
}

std::atomic<uint64_t>& ShmAllReduce::seq(int r) const {
  return *reinterpret_cast<std::atomic<uint64_t>*>(base_ + kHeaderBytes + size_t(r) * kSeqStride);
}

char* ShmAllReduce::slot(int r, int b) const {
  return base_ + kDataOffset + (size_t(r) * 2 + size_t(b)) * slot_bytes_;
}

int ShmAllReduce::attached() const {
  return header_ ? header_->attached.load(std::memory_order_acquire) : 0;
}

bool ShmAllReduce::wait_attached(double timeout_s) const {
  const auto deadline = Clock::now() + std::chrono::duration<double>(std::max(0.0, timeout_s));
  for (;;) {
    if (!header_ || aborted()) return false;
    if (attached() >= ranks_) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
}

bool ShmAllReduce::aborted() const {
  return header_ && header_->abort_state.load(std::memory_order_acquire) != 0;
}

void ShmAllReduce::abort(const std::string& reason) {
  if (!header_) return;
  int32_t expected = 0;  // the first reason wins
  if (!header_->abort_state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) return;
  std::string text = reason;
  if (text.empty())
    text = rank_ < 0 ? "the launcher (pid " + std::to_string(::getpid()) + ") stopped the ranks"
                     : "rank " + std::to_string(rank_) + " (pid " + std::to_string(::getpid()) +
                           ") called abort()";
  const size_t len = std::min(text.size(), kReasonBytes - 1);
  std::memcpy(header_->abort_reason, text.data(), len);
  header_->abort_reason[len] = 0;
  header_->abort_state.store(2, std::memory_order_release);
}

void ShmAllReduce::throw_aborted() const {
  // state 1: the aborting process is writing its reason (a memcpy); wait briefly for it
  for (int i = 0; i < 100000 && header_->abort_state.load(std::memory_order_acquire) == 1; ++i)
    cpu_pause();
  if (header_->abort_state.load(std::memory_order_acquire) == 2) {
    char reason[kReasonBytes];
    std::memcpy(reason, header_->abort_reason, kReasonBytes);
    reason[kReasonBytes - 1] = 0;
    throw std::runtime_error(std::string("aborted: ") + reason);
  }
  throw std::runtime_error("aborted");
}

void ShmAllReduce::fail(const std::string& abort_reason, const std::string& message) {
  abort(abort_reason);  // the other ranks stop too, even those not waiting on the culprit
  throw std::runtime_error(message);
}

void ShmAllReduce::check_peers_alive() {
  for (int p = 0; p < ranks_; ++p) {
    if (p == rank_) continue;
    const int pid = header_->rank[p].pid.load(std::memory_order_acquire);
    if (pid <= 0) continue;  // not attached yet: the launcher watches for that
    bool dead = ::kill(pid, 0) == -1 && errno == ESRCH;
    char state;
    uint64_t start = 0;
    if (!dead && read_proc_stat(pid, &state, &start)) {
      const uint64_t recorded = header_->rank[p].start_time.load(std::memory_order_acquire);
      // A zombie (killed, not yet reaped by its parent) answers kill(pid, 0); a reused pid has
      // another start time.
      dead = state == 'Z' || state == 'X' || (recorded != 0 && start != recorded);
    }
    if (dead) {
      const std::string who =
          "rank " + std::to_string(p) + " (pid " + std::to_string(pid) + ") died";
      fail(who, who + "; stopping");
    }
  }
}

uint64_t ShmAllReduce::spin_until(int peer, uint32_t step) {
  const auto start = Clock::now();
  // Liveness costs a few syscalls per peer: not in the first 20 ms, where a peer that is merely
  // late would then find this rank busy in them.
  auto next_check = start + std::chrono::milliseconds(20);
  bool idle = false;
  for (uint64_t spins = 1;; ++spins) {
    const uint64_t v = seq(peer).load(std::memory_order_acquire);
    if (int32_t(uint32_t(v >> 32) - step) >= 0) return v;
    if (idle)
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    else
      cpu_pause();
    if (!idle && spins % 1024 != 0) continue;
    if (header_->abort_state.load(std::memory_order_acquire) != 0) throw_aborted();
    if (closing_.load(std::memory_order_relaxed))
      throw std::runtime_error("ShmAllReduce " + name_ + " was closed during a collective");
    const auto now = Clock::now();
    // Past the latency-critical first 50 us, let a rank sharing this core run (sched_yield
    // returns at once when none waits).
    if (!idle && now - start > std::chrono::microseconds(50)) std::this_thread::yield();
    if (now >= next_check) {
      check_peers_alive();
      next_check = now + std::chrono::milliseconds(20);
    }
    idle = now - start > std::chrono::milliseconds(10);
  }
}

void ShmAllReduce::wait_for_peers(uint32_t step, uint32_t signature) {
  for (int p = 0; p < ranks_; ++p) {
    if (p == rank_) continue;
    uint64_t v = seq(p).load(std::memory_order_acquire);
    if (int32_t(uint32_t(v >> 32) - step) < 0) v = spin_until(p, step);
    // A peer may already be one step further (it saw everyone); only an equal step carries
    // this chunk's signature.
    if (uint32_t(v >> 32) == step && uint32_t(v) != signature) {
      auto describe = [](uint32_t sig) {
        return std::to_string(sig & 0xffffff) + ((sig >> 24 & 1) ? " bf16" : " fp32") + " values";
      };
      const std::string what = "ranks disagree on a collective: rank " + std::to_string(rank_) +
                               " reduces " + describe(signature) + ", rank " + std::to_string(p) +
                               " " + describe(uint32_t(v)) +
                               " (every rank must make the same calls)";
      fail(what, what);
    }
  }
}

template <typename T>
void ShmAllReduce::all_reduce(T* data, int64_t n, uint32_t dtype) {
  std::lock_guard<std::mutex> lock(op_mutex_);
  if (!header_) throw std::runtime_error("ShmAllReduce " + name_ + " is closed");
  if (rank_ < 0)
    throw std::runtime_error(
        "ShmAllReduce: the creator-only object (rank -1) takes no part in collectives");
  if (header_->abort_state.load(std::memory_order_acquire) != 0) throw_aborted();
  if (ranks_ == 1 || n == 0) return;
  const ReduceFn<T> reduce = pick_reduce<T>();
  const int64_t chunk_elems = int64_t(slot_bytes_ / sizeof(T));
  const int64_t align = 64 / int64_t(sizeof(T));  // portions start on cache lines
  const T* src[kMaxRanks];
  for (int64_t off = 0; off < n; off += chunk_elems) {
    const int64_t len = std::min(chunk_elems, n - off);
    const int b = int(chunks_++ & 1);
    const bool small = size_t(len) * sizeof(T) <= kSmallMaxBytes;
    const uint32_t signature = uint32_t(len) | dtype << 24 | uint32_t(small) << 25;
    T* mine = reinterpret_cast<T*>(slot(rank_, b));
    for (int p = 0; p < ranks_; ++p) src[p] = reinterpret_cast<const T*>(slot(p, b));

    std::memcpy(mine, data + off, size_t(len) * sizeof(T));
    seq(rank_).store(uint64_t(++step_) << 32 | signature, std::memory_order_release);
    wait_for_peers(step_, signature);

    if (small) {
      reduce(src, ranks_, data + off, len);
      continue;
    }
    const int64_t portion = (len + align * ranks_ - 1) / (align * ranks_) * align;
    auto lo = [&](int r) { return std::min(len, r * portion); };
    auto hi = [&](int r) { return std::min(len, (r + 1) * portion); };
    const T* part[kMaxRanks];
    for (int p = 0; p < ranks_; ++p) part[p] = src[p] + lo(rank_);
    reduce(part, ranks_, mine + lo(rank_), hi(rank_) - lo(rank_));
    seq(rank_).store(uint64_t(++step_) << 32 | signature, std::memory_order_release);
    wait_for_peers(step_, signature);
    for (int p = 0; p < ranks_; ++p)
      std::memcpy(data + off + lo(p), src[p] + lo(p), size_t(hi(p) - lo(p)) * sizeof(T));
  }
}

void ShmAllReduce::all_reduce_f32(float* data, int64_t n) { all_reduce(data, n, kDtypeF32); }

void ShmAllReduce::all_reduce_bf16(uint16_t* data, int64_t n) { all_reduce(data, n, kDtypeBf16); }

void ShmAllReduce::unlink() {
  if (unlinked_) return;
  if (::shm_unlink(name_.c_str()) != 0 && errno != ENOENT)
    throw std::runtime_error("shm_unlink(" + name_ + ") failed: " + errno_text());
  unlinked_ = true;
}

void ShmAllReduce::close() {
  closing_.store(true, std::memory_order_relaxed);  // a collective waiting in another thread stops
  std::lock_guard<std::mutex> lock(op_mutex_);
  if (creator_ && !unlinked_) {
    ::shm_unlink(name_.c_str());
    unlinked_ = true;
  }
  if (base_) ::munmap(base_, bytes_);
  base_ = nullptr;
  header_ = nullptr;
}

namespace nb = nanobind;
using namespace nb::literals;

void register_shm(nb::module_& m) {
  nb::class_<ShmAllReduce>(
      m, "ShmAllReduce",
      "Allreduce between the ranks (processes) of one machine over one POSIX shared-memory "
      "segment (csrc/shm_allreduce.h). A dead peer or abort() makes a waiting collective raise "
      "RuntimeError; it never times out while the peers live.")
      .def(nb::init<const std::string&, int, int, bool, double>(), "name"_a, "rank"_a, "ranks"_a,
           "create"_a = false, "timeout_s"_a = 5.0, nb::call_guard<nb::gil_scoped_release>(),
           "create=True: make the segment (O_EXCL, mode 0600; rank -1 = creator only). Otherwise "
           "open it, retrying for timeout_s, and attach as rank 0 .. ranks - 1.")
      .def(
          "all_reduce",
          [](ShmAllReduce& s, uintptr_t ptr, int64_t n) {
            if (n < 0) throw std::invalid_argument("all_reduce: n must be >= 0");
            if (n > 0 && ptr == 0) throw std::invalid_argument("all_reduce: ptr is a null pointer");
            s.all_reduce_f32(reinterpret_cast<float*>(ptr), n);
          },
          "ptr"_a, "n"_a, nb::call_guard<nb::gil_scoped_release>(),
          "In-place sum over ranks of n contiguous fp32 at address ptr (same bits on every rank).")
      .def(
          "all_reduce_bf16",
          [](ShmAllReduce& s, uintptr_t ptr, int64_t n) {
            if (n < 0) throw std::invalid_argument("all_reduce_bf16: n must be >= 0");
            if (n > 0 && ptr == 0)
              throw std::invalid_argument("all_reduce_bf16: ptr is a null pointer");
            s.all_reduce_bf16(reinterpret_cast<uint16_t*>(ptr), n);
          },
          "ptr"_a, "n"_a, nb::call_guard<nb::gil_scoped_release>(),
          "In-place sum over ranks of n contiguous bf16 at ptr, accumulated in fp32, rounded once.")
      .def("attached", &ShmAllReduce::attached, "Ranks that have attached so far.")
      .def("wait_attached", &ShmAllReduce::wait_attached, "timeout_s"_a,
           nb::call_guard<nb::gil_scoped_release>(),
           "True once every rank has attached; False on timeout or abort.")
      .def("abort", &ShmAllReduce::abort, "reason"_a = "",
           "Make every rank's collective raise RuntimeError('aborted: <reason>').")
      .def("aborted", &ShmAllReduce::aborted)
      .def("unlink", &ShmAllReduce::unlink,
           "Remove the name from /dev/shm (idempotent); mappings stay valid.")
      .def("close", &ShmAllReduce::close, nb::call_guard<nb::gil_scoped_release>(),
           "Unmap (idempotent; the creator also unlinks). A collective waiting in another thread "
           "raises.")
      .def_prop_ro("name", &ShmAllReduce::name)
      .def_prop_ro("rank", &ShmAllReduce::rank)
      .def_prop_ro("ranks", &ShmAllReduce::ranks);
}

}  // namespace xcompile
