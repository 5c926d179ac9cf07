// A recorded sequence of kernel calls, run again from C++ in one call (runtime/replay.py's
// programs, without a Python call per kernel).
//
// A decode step replays ~300 kernel calls. Called one by one from Python, each paid ~3 us of
// interpreter and argument conversion: ~1 ms a step, 2-3 % of a 1.1B model's INT8/INT4 step.
// A Tape holds the calls as (kernel, arguments) with the arguments converted once, when it is
// built; `run(starts)` calls them in order with the GIL released. The kernels are the same
// functions the Python bindings call (validation included), so a replay through a tape does
// exactly what the recorded Python calls did. Arguments that were segment start positions
// (replay.Start) are filled in from `starts` at each run.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace xcompile {

union TapeArg {
  int64_t i;
  double d;
};

// A kernel as the tape calls it: its arity, which arguments are floating point, and a thunk that
// unpacks TapeArgs into its parameters.
struct TapeKernel {
  std::vector<bool> floating;
  std::function<void(const TapeArg*)> call;
};

template <typename T>
T tape_get(const TapeArg& a) {
  if constexpr (std::is_floating_point_v<T>) {
    return T(a.d);
  } else if constexpr (std::is_same_v<T, bool>) {
    return a.i != 0;
  } else {
    return T(a.i);
  }
}

template <typename... A, size_t... I>
void tape_apply(void (*f)(A...), const TapeArg* args, std::index_sequence<I...>) {
  f(tape_get<A>(args[I])...);
}

template <typename... A>
TapeKernel tape_kernel(void (*f)(A...)) {
  return {{std::is_floating_point_v<A>...},
          [f](const TapeArg* args) { tape_apply(f, args, std::index_sequence_for<A...>{}); }};
}

// name -> kernel, filled by the module at import (module.cpp)
std::unordered_map<std::string, TapeKernel>& tape_kernels();

struct TapeCall {
  const TapeKernel* kernel;
  std::vector<TapeArg> args;
  std::vector<std::pair<int, int>> starts;  // (argument index, index into run()'s starts)
};

class Tape {
 public:
  // Appends kernel `name` with arguments already converted; throws std::invalid_argument for an
  // unknown kernel or a wrong argument count.
  void add(const std::string& name, std::vector<TapeArg> args, std::vector<std::pair<int, int>> starts);
  // Calls every kernel in order; starts[j] replaces each argument recorded as start j.
  void run(const std::vector<int64_t>& starts) const;
  size_t size() const { return calls_.size(); }
  const TapeKernel& kernel(const std::string& name) const;

 private:
  std::vector<TapeCall> calls_;
};

}  // namespace xcompile
