// xcompile._C: Python bindings of the csrc kernels.
//
// No libtorch: a kernel takes tensors as raw addresses (tensor.data_ptr(), a Python int) plus
// shapes, so the extension works with whichever torch 2.x is installed. The Python face that checks
// dtypes, shapes and contiguity is xcompile.runtime.kernels; these bindings trust their callers
// apart from null pointers and negative sizes. Kernels release the GIL while they run.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "kernels.h"
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

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "xcompile CPU kernels (raw pointers, run-time ISA dispatch, own OpenMP pool)";

  xcompile::set_isa_from_env();

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
      "rmsnorm",
      [](uintptr_t x, uintptr_t weight, uintptr_t out, int64_t rows, int64_t cols, double eps) {
        check_sizes("rmsnorm", {rows, cols});
        if (rows == 0 || cols == 0) return;
        xcompile::rmsnorm(as_ptr<const float>(x, "x", true), as_ptr<const float>(weight, "weight", true),
                          as_ptr<float>(out, "out", true), rows, cols, float(eps));
      },
      "x"_a, "weight"_a, "out"_a, "rows"_a, "cols"_a, "eps"_a,
      nb::call_guard<nb::gil_scoped_release>(),
      "out (rows, cols) = x * rsqrt(mean(x^2, -1) + eps) * weight; fp32, contiguous.");

  m.def(
      "gemv_f32",
      [](uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out, int64_t M, int64_t N, int64_t K) {
        check_sizes("gemv_f32", {M, N, K});
        if (M == 0 || N == 0) return;
        xcompile::gemv_f32(as_ptr<const float>(x, "x", K > 0), as_ptr<const float>(w, "w", K > 0),
                           as_ptr<const float>(bias, "bias", false), as_ptr<float>(out, "out", true),
                           M, N, K);
      },
      "x"_a, "w"_a, "bias"_a, "out"_a, "M"_a, "N"_a, "K"_a,
      nb::call_guard<nb::gil_scoped_release>(),
      "out (M, N) = x (M, K) @ w (N, K).T + bias (N, or 0 for none); all fp32.");

  m.def(
      "gemv_bf16",
      [](uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out, int64_t M, int64_t N, int64_t K) {
        check_sizes("gemv_bf16", {M, N, K});
        if (M == 0 || N == 0) return;
        xcompile::gemv_bf16(as_ptr<const float>(x, "x", K > 0), as_ptr<const uint16_t>(w, "w", K > 0),
                            as_ptr<const float>(bias, "bias", false), as_ptr<float>(out, "out", true),
                            M, N, K);
      },
      "x"_a, "w"_a, "bias"_a, "out"_a, "M"_a, "N"_a, "K"_a,
      nb::call_guard<nb::gil_scoped_release>(),
      "out (M, N) = x (M, K) @ w (N, K).T + bias; w bf16 bits, x/bias/out fp32.");
}
