// xcompile._C: Python bindings of the csrc kernels.
//
// No libtorch: a kernel takes tensors as raw addresses (tensor.data_ptr(), a Python int) plus
// shapes, so the extension works with whichever torch 2.x is installed. The Python face that checks
// dtypes, shapes and contiguity is xcompile.runtime.kernels; these bindings trust their callers
// apart from null pointers and negative sizes. Kernels release the GIL while they run.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "kernels.h"
#include "dpbf16.h"
#include "tiles.h"
#include "shm_allreduce.h"
#include "tape.h"
#include "threads.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

template <typename T>
T* as_ptr(uintptr_t address, const char* name, bool required) {
  if (required && address == 0)
    throw std::invalid_argument(std::string(name) + " is a null pointer");
  return reinterpret_cast<T*>(address);
}

void check_sizes(const char* kernel, std::initializer_list<int64_t> sizes) {
  for (int64_t s : sizes)
    if (s < 0) throw std::invalid_argument(std::string(kernel) + ": sizes must be >= 0");
}

void check_nbits(const char* kernel, int64_t bits, int64_t block_size) {
  if (bits != 4 && bits != 8) throw std::invalid_argument(std::string(kernel) + ": bits must be 4 or 8");
  if (block_size < 16 || (block_size & (block_size - 1)))
    throw std::invalid_argument(std::string(kernel) + ": block_size must be a power of two >= 16");
}

// MatMulNBits zero points at `address`: packed uint8 (0: none, 2^(bits-1)), or with
// float_zero_points floats (N, k_blocks), not packed (0 allowed only where nothing is read):
// fp32, or fp16 bits with fp16 (as the scales).
xcompile::ZeroPoints zero_points_at(uintptr_t address, bool float_zero_points, bool read,
                                    bool fp16) {
  xcompile::ZeroPoints zp;
  if (float_zero_points && read && address == 0)
    throw std::invalid_argument("float_zero_points is set but zero_points is a null pointer");
  if (float_zero_points)
    zp.values = xcompile::BlockFloats::at(as_ptr<const void>(address, "zero_points", false), fp16);
  else
    zp.packed = reinterpret_cast<const uint8_t*>(address);
  return zp;
}

// MatMulNBits scales at `address`: fp32, or fp16 bits with fp16 (float zero points too)
xcompile::BlockFloats scales_at(uintptr_t address, bool fp16, bool read) {
  return xcompile::BlockFloats::at(as_ptr<const void>(address, "scales", read), fp16);
}

// gemv_bf16_dp (Prompt false) and gemm_bf16_dp take the same arguments: one binding serves both.
template <bool Prompt>
void bf16_dp(uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out, int64_t M, int64_t N,
             int64_t K, bool emulate) {
  check_sizes(Prompt ? "gemm_bf16_dp" : "gemv_bf16_dp", {M, N, K});
  if (M == 0 || N == 0) return;
  (Prompt ? xcompile::gemm_bf16_dp : xcompile::gemv_bf16_dp)(
      as_ptr<const float>(x, "x", K > 0), as_ptr<const uint16_t>(w, "w", K > 0),
      as_ptr<const float>(bias, "bias", false), as_ptr<float>(out, "out", true), M, N, K, emulate);
}

// Registers a kernel binding for tapes (tape.h) and hands it on to m.def: a taped call runs
// the very function a Python call does.
template <typename... A>
auto tape_def(const char* name, void (*f)(A...)) {
  xcompile::tape_kernels()[name] = xcompile::tape_kernel(f);
  return f;
}

template <bool Q8>
void nbits_gemv(uintptr_t x, uintptr_t B, uintptr_t scales, uintptr_t zero_points,
                bool float_zero_points, uintptr_t bias, uintptr_t out, int64_t M, int64_t N,
                int64_t K, int64_t bits, int64_t block_size, bool fp16) {
  const char* name = Q8 ? "gemv_nbits_q8" : "gemv_nbits";
  check_sizes(name, {M, N, K});
  check_nbits(name, bits, block_size);
  if (Q8 && !xcompile::gemv_nbits_q8_supported(int(bits), block_size))
    throw std::invalid_argument(std::string(name) +
                                ": block_size must be >= 64 (INT8) or >= 128 (INT4)");
  if (M == 0 || N == 0) return;
  (Q8 ? xcompile::gemv_nbits_q8 : xcompile::gemv_nbits)(
      as_ptr<const float>(x, "x", K > 0), as_ptr<const uint8_t>(B, "B", K > 0),
      scales_at(scales, fp16, K > 0),
      zero_points_at(zero_points, float_zero_points, K > 0, fp16),
      as_ptr<const float>(bias, "bias", false), as_ptr<float>(out, "out", true), M, N, K,
      int(bits), block_size);
}

// attention / attention_bf16: the cache's element type is the only difference (float, or
// uint16_t for bf16 bits).
template <typename T>
void bind_attention(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t out, int64_t S,
                    int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t capacity,
                    int64_t past, int64_t window, double scale, uintptr_t slot_of,
                    int64_t slot_stride, double softcap) {
  check_sizes("attention", {S, heads, kv_heads, head_dim, capacity, past, slot_stride});
  if (kv_heads == 0 || heads % kv_heads)
    throw std::invalid_argument("attention: heads must be a positive multiple of kv_heads");
  if (past + S > capacity)
    throw std::invalid_argument("attention: past + S exceeds the cache capacity");
  if (!(softcap >= 0.0))
    throw std::invalid_argument("attention: softcap must be >= 0 (0: none)");
  if (S == 0 || heads == 0 || head_dim == 0) return;
  const auto run = [](auto... a) {
    if constexpr (std::is_same_v<T, float>) xcompile::attention(a...);
    else xcompile::attention_bf16(a...);
  };
  run(as_ptr<const float>(q, "q", true), as_ptr<const T>(k_cache, "k_cache", true),
      as_ptr<const T>(v_cache, "v_cache", true), as_ptr<float>(out, "out", true), S, heads,
      kv_heads, head_dim, capacity, past, window, float(scale),
      as_ptr<const int32_t>(slot_of, "slot_of", false), slot_stride, float(softcap));
}
#define ATTENTION_ARGS                                                                     \
  "q"_a, "k_cache"_a, "v_cache"_a, "out"_a, "S"_a, "heads"_a, "kv_heads"_a, "head_dim"_a, \
      "capacity"_a, "past"_a, "window"_a, "scale"_a, "slot_of"_a = 0, "slot_stride"_a = 0, \
      "softcap"_a = 0.0

template <typename T>
void bind_kv_write(uintptr_t src, int64_t src_stride, uintptr_t cache, int64_t slot,
                   int64_t slots, int64_t start, int64_t S, int64_t kv_heads, int64_t head_dim,
                   int64_t capacity) {
  check_sizes("kv_write", {src_stride, slot, start, S, kv_heads, head_dim, capacity});
  if (slot >= slots || start + S > capacity)
    throw std::invalid_argument("kv_write: slot or positions outside the cache");
  if (S > 1 && src_stride < kv_heads * head_dim)
    throw std::invalid_argument("kv_write: src_stride must be >= kv_heads * head_dim");
  if (S == 0 || kv_heads == 0 || head_dim == 0) return;
  const float* from = as_ptr<const float>(src, "src", true);
  T* to = as_ptr<T>(cache, "cache", true);
  if constexpr (std::is_same_v<T, float>)
    xcompile::kv_write(from, src_stride, to, slot, start, S, kv_heads, head_dim, capacity);
  else
    xcompile::kv_write_bf16(from, src_stride, to, slot, start, S, kv_heads, head_dim, capacity);
}
#define KV_WRITE_ARGS                                                                        \
  "src"_a, "src_stride"_a, "cache"_a, "slot"_a, "slots"_a, "start"_a, "S"_a, "kv_heads"_a, \
      "head_dim"_a, "capacity"_a

// Tape.add(name, args, starts): args converted once by the kernel's parameter types (bools and
// ints to int64, floats to double); starts: (argument index, start index) pairs.
void tape_add(xcompile::Tape& tape, const std::string& name, nb::tuple args,
              std::vector<std::pair<int, int>> starts) {
  const std::vector<bool>& floating = tape.kernel(name).floating;
  std::vector<xcompile::TapeArg> converted(args.size());  // Tape::add checks the count
  for (size_t i = 0; i < args.size(); ++i) {
    if (i < floating.size() && floating[i])
      converted[i].d = nb::cast<double>(args[i]);
    else if (PyBool_Check(args[i].ptr()))
      converted[i].i = args[i].ptr() == Py_True;
    else
      converted[i].i = nb::cast<int64_t>(args[i]);
  }
  tape.add(name, std::move(converted), std::move(starts));
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "xcompile CPU kernels (raw pointers, run-time ISA dispatch, own OpenMP pool)";

  xcompile::set_isa_from_env();
  xcompile::register_shm(m);

  m.def("isa", [] { return std::string(xcompile::isa_name(xcompile::current_isa())); },
        "The ISA path kernels take now.");
  m.def("supported_isas",
        [] {
          std::vector<std::string> names;
          for (xcompile::Isa isa : xcompile::supported_isas()) names.push_back(xcompile::isa_name(isa));
          return names;
        },
        "ISA paths this CPU can run, slowest first (the last is the default).");
  m.def("set_isa", &xcompile::set_isa, "name"_a,
        "Force an ISA path by name; ValueError when this CPU lacks it.");
  m.def("set_num_threads", &xcompile::set_num_threads, "n"_a,
        "Threads of the kernels' OpenMP pool.");
  m.def("num_threads", &xcompile::num_threads);
  m.def(
      "runs_taken",
      [](int64_t tasks, int threads, int64_t grain, int64_t slow_us) {
        // which thread ran each task of a decode GEMV's split (threads.h Runs), -1 none, -2 twice;
        // thread 0 sleeps slow_us at each grain, so the others steal from it
        if (tasks < 0 || threads < 1) throw std::invalid_argument("runs_taken: bad sizes");
        std::unique_ptr<std::atomic<int>[]> owner(new std::atomic<int>[size_t(tasks)]);
        for (int64_t i = 0; i < tasks; ++i) owner[size_t(i)].store(-1);
        xcompile::for_runs(tasks, threads, grain, true, [&](int64_t begin, int64_t end) {
          const int t = omp_get_thread_num();
          if (t == 0 && slow_us > 0)
            std::this_thread::sleep_for(std::chrono::microseconds(slow_us));
          for (int64_t i = begin; i < end; ++i) {
            int expected = -1;
            if (!owner[size_t(i)].compare_exchange_strong(expected, t)) owner[size_t(i)].store(-2);
          }
        });
        std::vector<int> out(static_cast<size_t>(tasks));
        for (int64_t i = 0; i < tasks; ++i) out[size_t(i)] = owner[size_t(i)].load();
        return out;
      },
      "tasks"_a, "threads"_a, "grain"_a, "slow_us"_a = 0,
      "For tests: the thread that took each task of the decode GEMVs' split (-1: none, -2: "
      "more than one), thread 0 slowed by slow_us a grain.");

  m.def(
      "rmsnorm",
      tape_def("rmsnorm", +[](uintptr_t x, uintptr_t weight, uintptr_t out, int64_t rows, int64_t cols, double eps) {
        check_sizes("rmsnorm", {rows, cols});
        if (rows == 0 || cols == 0) return;
        xcompile::rmsnorm(as_ptr<const float>(x, "x", true), as_ptr<const float>(weight, "weight", true),
                          as_ptr<float>(out, "out", true), rows, cols, float(eps));
      }),
      "x"_a, "weight"_a, "out"_a, "rows"_a, "cols"_a, "eps"_a,
      nb::call_guard<nb::gil_scoped_release>(),
      "out (rows, cols) = x * rsqrt(mean(x^2, -1) + eps) * weight; fp32, contiguous.");

  m.def(
      "skip_rmsnorm",
      tape_def("skip_rmsnorm", +[](uintptr_t x, uintptr_t skip, uintptr_t weight, uintptr_t out, uintptr_t sum_out,
         int64_t rows, int64_t cols, double eps) {
        check_sizes("skip_rmsnorm", {rows, cols});
        if (rows == 0 || cols == 0) return;
        xcompile::skip_rmsnorm(as_ptr<const float>(x, "x", true), as_ptr<const float>(skip, "skip", true),
                               as_ptr<const float>(weight, "weight", true), as_ptr<float>(out, "out", true),
                               as_ptr<float>(sum_out, "sum_out", true), rows, cols, float(eps));
      }),
      "x"_a, "skip"_a, "weight"_a, "out"_a, "sum_out"_a, "rows"_a, "cols"_a, "eps"_a,
      nb::call_guard<nb::gil_scoped_release>(),
      "sum_out = x + skip; out = rmsnorm(sum_out) * weight; all (rows, cols) fp32, weight (cols).");

  m.def(
      "rotary",
      tape_def("rotary", +[](uintptr_t x, uintptr_t cos, uintptr_t sin, uintptr_t out, int64_t tokens, int64_t heads,
         int64_t head_dim, int64_t rotary_dim, bool interleaved, int64_t x_stride,
         int64_t out_stride, uintptr_t positions, int64_t table_rows) {
        check_sizes("rotary", {tokens, heads, head_dim, rotary_dim, x_stride, out_stride});
        if (rotary_dim % 2 || rotary_dim > head_dim)
          throw std::invalid_argument("rotary: rotary_dim must be even and <= head_dim");
        if (tokens > 1 && (x_stride < heads * head_dim || out_stride < heads * head_dim))
          throw std::invalid_argument("rotary: token strides must be >= heads * head_dim");
        const int64_t* pos = reinterpret_cast<const int64_t*>(positions);
        for (int64_t t = 0; pos && t < tokens; ++t)
          if (pos[t] < 0 || pos[t] >= table_rows)
            throw std::invalid_argument("rotary: position " + std::to_string(pos[t]) +
                                        " outside the cos/sin tables' " +
                                        std::to_string(table_rows) + " rows");
        if (tokens == 0 || heads == 0 || head_dim == 0) return;
        xcompile::rotary(as_ptr<const float>(x, "x", true), as_ptr<const float>(cos, "cos", rotary_dim > 0),
                         as_ptr<const float>(sin, "sin", rotary_dim > 0), as_ptr<float>(out, "out", true),
                         tokens, heads, head_dim, rotary_dim, interleaved, x_stride, out_stride, pos);
      }),
      "x"_a, "cos"_a, "sin"_a, "out"_a, "tokens"_a, "heads"_a, "head_dim"_a, "rotary_dim"_a,
      "interleaved"_a, "x_stride"_a, "out_stride"_a, "positions"_a = 0, "table_rows"_a = 0,
      nb::call_guard<nb::gil_scoped_release>(),
      "Rotary embedding of x (tokens, heads, head_dim; token stride x_stride) into out (may be x); "
      "cos, sin (tokens, rotary_dim / 2), or with positions (tokens,) int64 the whole tables "
      "(table_rows, rotary_dim / 2) read at those rows; interleaved: GPT-J pairs, else Llama's "
      "half split.");

  m.def(
      "silu_mul",
      tape_def("silu_mul", +[](uintptr_t gate, uintptr_t up, uintptr_t out, int64_t n, int64_t rows, int64_t gate_stride,
         int64_t up_stride) {
        check_sizes("silu_mul", {n, rows, gate_stride, up_stride});
        if (n == 0 || rows == 0) return;
        if (rows > 1 && (gate_stride < n || up_stride < n))
          throw std::invalid_argument("silu_mul: row strides must be >= n");
        xcompile::silu_mul_rows(as_ptr<const float>(gate, "gate", true),
                                as_ptr<const float>(up, "up", true), as_ptr<float>(out, "out", true),
                                rows, n, rows > 1 ? gate_stride : n, rows > 1 ? up_stride : n);
      }),
      "gate"_a, "up"_a, "out"_a, "n"_a, "rows"_a = 1, "gate_stride"_a = 0, "up_stride"_a = 0,
      nb::call_guard<nb::gil_scoped_release>(),
      "out (rows, n) = gate * sigmoid(gate) * up; fp32; gate and up rows gate_stride, up_stride "
      "floats apart (rows > 1), out contiguous and may alias an input.");

  m.def(
      "gelu_mul",
      tape_def("gelu_mul", +[](uintptr_t gate, uintptr_t up, uintptr_t out, int64_t n, int64_t rows, int64_t gate_stride,
         int64_t up_stride) {
        check_sizes("gelu_mul", {n, rows, gate_stride, up_stride});
        if (n == 0 || rows == 0) return;
        if (rows > 1 && (gate_stride < n || up_stride < n))
          throw std::invalid_argument("gelu_mul: row strides must be >= n");
        xcompile::gelu_mul_rows(as_ptr<const float>(gate, "gate", true),
                                as_ptr<const float>(up, "up", true), as_ptr<float>(out, "out", true),
                                rows, n, rows > 1 ? gate_stride : n, rows > 1 ? up_stride : n);
      }),
      "gate"_a, "up"_a, "out"_a, "n"_a, "rows"_a = 1, "gate_stride"_a = 0, "up_stride"_a = 0,
      nb::call_guard<nb::gil_scoped_release>(),
      "out (rows, n) = gelu_tanh(gate) * up (GeGLU); fp32; gate and up rows gate_stride, up_stride "
      "floats apart (rows > 1), out contiguous and may alias an input.");

  m.def(
      "gelu_tanh",
      tape_def("gelu_tanh", +[](uintptr_t x, uintptr_t out, int64_t n) {
        check_sizes("gelu_tanh", {n});
        if (n == 0) return;
        xcompile::gelu_tanh(as_ptr<const float>(x, "x", true), as_ptr<float>(out, "out", true), n);
      }),
      "x"_a, "out"_a, "n"_a, nb::call_guard<nb::gil_scoped_release>(),
      "out (n) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); fp32, out may be x.");

  m.def(
      "erf_f32",
      tape_def("erf_f32", +[](uintptr_t x, uintptr_t out, int64_t n) {
        check_sizes("erf_f32", {n});
        if (n == 0) return;
        xcompile::erf_f32(as_ptr<const float>(x, "x", true), as_ptr<float>(out, "out", true), n);
      }),
      "x"_a, "out"_a, "n"_a, nb::call_guard<nb::gil_scoped_release>(),
      "out (n) = erf(x); fp32, out may be x.");

  m.def("attention", tape_def("attention", &bind_attention<float>), ATTENTION_ARGS,
        nb::call_guard<nb::gil_scoped_release>(),
        "Causal GQA of q (S, heads, d) at positions past.. over k_cache, v_cache (kv_heads, "
        "capacity, d) into out (S, heads, d; may be q); window <= 0: no sliding window; slot_of "
        "(int32, past + S; 0: none): key j from cache slot slot_of[j], slot_stride floats apart; "
        "softcap > 0: each scaled score s -> softcap * tanh(s / softcap) before the softmax.");
  m.def("attention_bf16", tape_def("attention_bf16", &bind_attention<uint16_t>), ATTENTION_ARGS,
        nb::call_guard<nb::gil_scoped_release>(),
        "attention over bf16 caches (raw uint16 bits, slot_stride in elements); q, out fp32.");

  m.def("set_attention_split", &xcompile::set_attention_split, "enabled"_a,
        "Decode attention split over keys (flash-decoding): on by default; off only to measure "
        "or test the one-pass path.");

  m.def("kv_write", tape_def("kv_write", &bind_kv_write<float>), KV_WRITE_ARGS,
        nb::call_guard<nb::gil_scoped_release>(),
        "src (S, kv_heads, d; token stride src_stride) -> cache (slots, kv_heads, capacity, d) "
        "at slot, positions start .. start + S - 1; all fp32.");
  m.def("kv_write_bf16", tape_def("kv_write_bf16", &bind_kv_write<uint16_t>), KV_WRITE_ARGS,
        nb::call_guard<nb::gil_scoped_release>(),
        "kv_write into a bf16 cache (raw uint16 bits): src fp32, rounded to nearest even.");

  m.def(
      "gemv_f32",
      tape_def("gemv_f32", +[](uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out, int64_t M, int64_t N, int64_t K) {
        check_sizes("gemv_f32", {M, N, K});
        if (M == 0 || N == 0) return;
        xcompile::gemv_f32(as_ptr<const float>(x, "x", K > 0), as_ptr<const float>(w, "w", K > 0),
                           as_ptr<const float>(bias, "bias", false), as_ptr<float>(out, "out", true),
                           M, N, K);
      }),
      "x"_a, "w"_a, "bias"_a, "out"_a, "M"_a, "N"_a, "K"_a,
      nb::call_guard<nb::gil_scoped_release>(),
      "out (M, N) = x (M, K) @ w (N, K).T + bias (N, or 0 for none); all fp32.");

  m.def(
      "gemv_bf16",
      tape_def("gemv_bf16", +[](uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out, int64_t M, int64_t N, int64_t K) {
        check_sizes("gemv_bf16", {M, N, K});
        if (M == 0 || N == 0) return;
        xcompile::gemv_bf16(as_ptr<const float>(x, "x", K > 0), as_ptr<const uint16_t>(w, "w", K > 0),
                            as_ptr<const float>(bias, "bias", false), as_ptr<float>(out, "out", true),
                            M, N, K);
      }),
      "x"_a, "w"_a, "bias"_a, "out"_a, "M"_a, "N"_a, "K"_a,
      nb::call_guard<nb::gil_scoped_release>(),
      "out (M, N) = x (M, K) @ w (N, K).T + bias; w bf16 bits, x/bias/out fp32.");

  // gemv_nbits and gemv_nbits_q8 take the same arguments: one binding serves both.
  const auto bind_nbits = [&m](const char* name, auto kernel, const char* doc) {
    m.def(name, tape_def(name, kernel), "x"_a, "B"_a, "scales"_a, "zero_points"_a,
          "float_zero_points"_a, "bias"_a, "out"_a, "M"_a, "N"_a, "K"_a, "bits"_a, "block_size"_a,
          "fp16"_a = false, nb::call_guard<nb::gil_scoped_release>(), doc);
  };
  bind_nbits("gemv_nbits", &nbits_gemv<false>,
             "out (M, N) = x (M, K) @ W.T + bias (0: none), W from MatMulNBits' B, scales, "
             "zero_points (0: 2^(bits-1); packed uint8, or fp32 (N, k_blocks) with "
             "float_zero_points); scales (and float zero points) fp32, or fp16 bits with fp16; "
             "fp32 x/out.");
  bind_nbits("gemv_nbits_q8", &nbits_gemv<true>,
             "gemv_nbits on int8-quantized activations (accuracy_level 4): VNNI, or the scalar "
             "reference.");

  nb::class_<xcompile::Tape>(m, "Tape", "Kernel calls recorded once, run again in one call.")
      .def(nb::init<>())
      .def("add", &tape_add, "name"_a, "args"_a, "starts"_a = std::vector<std::pair<int, int>>(),
           "Append kernel `name` (a function of this module) with its arguments; starts: "
           "(argument index, index into run()'s starts) for arguments that are segment starts.")
      .def("run", &xcompile::Tape::run, "starts"_a = std::vector<int64_t>(),
           nb::call_guard<nb::gil_scoped_release>(), "Call every kernel in order.")
      .def("__len__", &xcompile::Tape::size);

  m.def("gemv_nbits_q8_supported", &xcompile::gemv_nbits_q8_supported, "bits"_a, "block_size"_a);
  m.def("gemm_nbits_vnni_supported", &xcompile::gemm_nbits_vnni_supported, "bits"_a,
        "block_size"_a, "gemv_nbits_q8 takes the prompt GEMM (gemm_nbits_vnni.cpp) here.");

  // The AMX tile kernels called directly, on the unit or its C++ model (emulate): the tests hold
  // both to the references on any CPU. gemv_bf16 / gemv_nbits_q8 take them by themselves under
  // the amx ISA.
  m.def("gemm_bf16_tiles_supported", &xcompile::gemm_bf16_tiles_supported, "N"_a, "K"_a,
        "Whether gemm_bf16_tiles takes weights of N rows and K columns whole.");
  m.def("amx_usable", &xcompile::amx_usable,
        "Whether this CPU has AMX (tile, bf16, int8) and the OS lets this process use it.");
  m.def(
      "gemm_bf16_tiles",
      [](uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out, int64_t M, int64_t N, int64_t K,
         bool emulate) {
        check_sizes("gemm_bf16_tiles", {M, N, K});
        if (M == 0) return;
        xcompile::gemm_bf16_tiles(as_ptr<const float>(x, "x", true), as_ptr<const uint16_t>(w, "w", true),
                                  as_ptr<const float>(bias, "bias", false),
                                  as_ptr<float>(out, "out", true), M, N, K, emulate);
      },
      "x"_a, "w"_a, "bias"_a, "out"_a, "M"_a, "N"_a, "K"_a, "emulate"_a,
      nb::call_guard<nb::gil_scoped_release>(),
      "gemv_bf16 on AMX tiles (emulate: on their C++ model); N a multiple of 16, K of 32.");
  // The vdpbf16ps kernels called directly, on the instruction or its C++ model (emulate);
  // gemv_bf16 takes them by itself under avx512_bf16 and amx.
  m.def("dpbf16_usable", &xcompile::dpbf16_usable,
        "Whether this CPU has AVX512_BF16 (vdpbf16ps) and the OS enables AVX-512.");
  m.def(
      "dpbf16ps",
      [](uintptr_t acc, uintptr_t a, uintptr_t b, uintptr_t out, bool emulate) {
        xcompile::dpbf16ps(as_ptr<const float>(acc, "acc", true), as_ptr<const uint16_t>(a, "a", true),
                           as_ptr<const uint16_t>(b, "b", true), as_ptr<float>(out, "out", true),
                           emulate);
      },
      "acc"_a, "a"_a, "b"_a, "out"_a, "emulate"_a,
      "One vdpbf16ps: out (16 fp32) = acc (16 fp32) + pairwise dots of a and b (32 bf16 each); "
      "emulate: on its C++ model.");
  for (bool prompt : {false, true})
    m.def(prompt ? "gemm_bf16_dp" : "gemv_bf16_dp", prompt ? &bf16_dp<true> : &bf16_dp<false>,
          "x"_a, "w"_a, "bias"_a, "out"_a, "M"_a, "N"_a, "K"_a, "emulate"_a,
          nb::call_guard<nb::gil_scoped_release>(),
          prompt ? "gemv_bf16 as a prompt's GEMM on vdpbf16ps (emulate: on its C++ model)."
                 : "gemv_bf16 on vdpbf16ps, weights streamed once (emulate: on its C++ model).");
  m.def(
      "gemm_nbits_q8_tiles",
      [](uintptr_t x, uintptr_t B, uintptr_t scales, uintptr_t zero_points, bool float_zero_points,
         uintptr_t bias, uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t bits,
         int64_t block_size, bool emulate, bool fp16) {
        check_sizes("gemm_nbits_q8_tiles", {M, N, K});
        check_nbits("gemm_nbits_q8_tiles", bits, block_size);
        if (M == 0) return;
        xcompile::gemm_nbits_q8_tiles(
            as_ptr<const float>(x, "x", true), as_ptr<const uint8_t>(B, "B", true),
            scales_at(scales, fp16, true),
            zero_points_at(zero_points, float_zero_points, true, fp16),
            as_ptr<const float>(bias, "bias", false), as_ptr<float>(out, "out", true), M, N, K,
            int(bits), block_size, emulate);
      },
      "x"_a, "B"_a, "scales"_a, "zero_points"_a, "float_zero_points"_a, "bias"_a, "out"_a, "M"_a,
      "N"_a, "K"_a, "bits"_a, "block_size"_a, "emulate"_a, "fp16"_a = false,
      nb::call_guard<nb::gil_scoped_release>(),
      "gemv_nbits_q8 on AMX tiles (emulate: on their C++ model); N a multiple of 16.");

  m.def(
      "dequantize_nbits",
      tape_def("dequantize_nbits", +[](uintptr_t B, uintptr_t scales, uintptr_t zero_points,
         bool float_zero_points, uintptr_t out, int64_t N, int64_t K, int64_t bits,
         int64_t block_size, bool fp16) {
        check_sizes("dequantize_nbits", {N, K});
        check_nbits("dequantize_nbits", bits, block_size);
        if (N == 0 || K == 0) return;
        xcompile::dequantize_nbits(as_ptr<const uint8_t>(B, "B", true),
                                   scales_at(scales, fp16, true),
                                   zero_points_at(zero_points, float_zero_points, true, fp16),
                                   as_ptr<float>(out, "out", true), N, K, int(bits), block_size);
      }),
      "B"_a, "scales"_a, "zero_points"_a, "float_zero_points"_a, "out"_a, "N"_a, "K"_a, "bits"_a,
      "block_size"_a, "fp16"_a = false, nb::call_guard<nb::gil_scoped_release>(),
      "out (N, K) fp32 = W of MatMulNBits' B, scales, zero_points (0: 2^(bits-1); packed uint8, "
      "or fp32 (N, k_blocks) with float_zero_points); scales (and float zero points) fp32, or "
      "fp16 bits with fp16.");

  m.def(
      "gather_nbits",
      tape_def("gather_nbits", +[](uintptr_t B, uintptr_t scales, uintptr_t zero_points,
         bool float_zero_points, uintptr_t indices, uintptr_t out, int64_t count, int64_t N,
         int64_t K, int64_t bits, int64_t block_size, bool fp16) {
        check_sizes("gather_nbits", {count, N, K});
        check_nbits("gather_nbits", bits, block_size);
        if (count == 0 || K == 0) return;
        xcompile::gather_nbits(as_ptr<const uint8_t>(B, "B", N > 0),
                               scales_at(scales, fp16, N > 0),
                               zero_points_at(zero_points, float_zero_points, N > 0, fp16),
                               as_ptr<const int64_t>(indices, "indices", true),
                               as_ptr<float>(out, "out", true), count, N, K, int(bits), block_size);
      }),
      "B"_a, "scales"_a, "zero_points"_a, "float_zero_points"_a, "indices"_a, "out"_a, "count"_a,
      "N"_a, "K"_a, "bits"_a, "block_size"_a, "fp16"_a = false,
      nb::call_guard<nb::gil_scoped_release>(),
      "out (count, K) fp32 = rows indices[i] (int64; negative from N, outside [-N, N): zeros) of "
      "W, MatMulNBits' B, scales, zero_points as in dequantize_nbits.");
}

