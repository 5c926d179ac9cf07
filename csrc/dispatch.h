// Run-time ISA dispatch for the csrc kernels.
//
// One build runs on any x86-64 CPU: every vector path is compiled with a function target
// attribute (XC_TARGET_*), never -march=native, and the path a kernel takes is chosen once at
// import from CPUID (and the OS-enabled register state from xgetbv), or forced with
// XCOMPILE_ISA=<name> / set_isa(name) so every path can be tested on a machine that has it.
#pragma once

#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define XC_X86 1
#define XC_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define XC_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define XC_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
#define XC_TARGET_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,avx2,fma")))
#else
#define XC_X86 0
#endif

namespace xcompile {

// Ordered slowest to fastest: best_isa() is the largest value the CPU supports, and each level
// has every instruction of those below it, so kernels may test `current_isa() >= Isa::x`.
enum class Isa : int {
  scalar = 0,  // portable C++, the baseline every CPU runs
  avx2 = 1,    // AVX2 + FMA, 8 x fp32
  avx512 = 2,  // AVX-512 F + BW + VL, 16 x fp32, masked tails
  // + AVX512_VNNI: the same fp32 kernels, and INT8/INT4 GEMV on int8-quantized activations
  // (vpdpbusd, 64 multiply-adds an instruction) where the graph allows it (accuracy_level 4)
  avx512_vnni = 3,
  // + AVX512_BF16 (Cooper Lake, Sapphire Rapids on, Zen 4 on): BF16-weight GEMV and prompt GEMM
  // on vdpbf16ps (csrc/gemm_dpbf16.cpp), x carried as hi + lo bf16 to keep fp32 accuracy; every
  // other kernel takes its avx512_vnni path (each switch on the ISA lists it beside avx512_vnni).
  avx512_bf16 = 4,
  // + AMX-TILE / AMX-BF16 / AMX-INT8 (Sapphire Rapids on): prefill-sized matmuls (16 rows of x and
  // more) on tiles (csrc/gemm_tiles.cpp); BF16 decode on the avx512_bf16 kernels, INT8/INT4
  // decode on the avx512_vnni ones, which are already at the memory's speed there, and every
  // other kernel takes its avx512_vnni path (each switch on the ISA lists amx beside
  // avx512_vnni). Only where the OS grants the tiles; every AMX CPU has AVX512_BF16.
  amx = 5,
};

const char* isa_name(Isa isa);
Isa best_isa();                    // the fastest path this CPU (and OS) supports
std::vector<Isa> supported_isas();  // every path this CPU can run, slowest first
Isa current_isa();                 // the path kernels take now
// Forces a path by name; throws std::invalid_argument (ValueError in Python) naming the
// supported ones when the name is unknown or this CPU lacks it.
void set_isa(const std::string& name);
// Applies XCOMPILE_ISA when it is set (called once at import).
void set_isa_from_env();

}  // namespace xcompile
