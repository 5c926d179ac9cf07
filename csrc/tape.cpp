// Tape: recorded kernel calls run from C++ (see tape.h).
#include "tape.h"

#include <stdexcept>

namespace xcompile {

std::unordered_map<std::string, TapeKernel>& tape_kernels() {
  static std::unordered_map<std::string, TapeKernel> kernels;
  return kernels;
}

const TapeKernel& Tape::kernel(const std::string& name) const {
  const auto found = tape_kernels().find(name);
  if (found == tape_kernels().end()) throw std::invalid_argument("tape: no kernel named " + name);
  return found->second;
}

void Tape::add(const std::string& name, std::vector<TapeArg> args,
               std::vector<std::pair<int, int>> starts) {
  const TapeKernel& k = kernel(name);
  if (args.size() != k.floating.size())
    throw std::invalid_argument("tape: " + name + " takes " + std::to_string(k.floating.size()) +
                                " arguments, got " + std::to_string(args.size()));
  for (const auto& [arg, start] : starts)
    if (arg < 0 || size_t(arg) >= args.size() || k.floating[arg] || start < 0)
      throw std::invalid_argument("tape: " + name + ": bad start position argument");
  calls_.push_back({&k, std::move(args), std::move(starts)});
}

void Tape::run(const std::vector<int64_t>& starts) const {
  std::vector<TapeArg> scratch;
  for (const TapeCall& call : calls_) {
    if (call.starts.empty()) {
      call.kernel->call(call.args.data());
      continue;
    }
    scratch = call.args;
    for (const auto& [arg, start] : call.starts) {
      if (size_t(start) >= starts.size()) throw std::invalid_argument("tape: missing start position");
      scratch[arg].i = starts[start];
    }
    call.kernel->call(scratch.data());
  }
}

}  // namespace xcompile
