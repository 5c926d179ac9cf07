// CPUID / xgetbv feature detection and the process-wide current ISA.
#include "dispatch.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>

#if XC_X86
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "tiles.h"

namespace xcompile {
namespace {

bool amx_check();  // below: the tile unit, and the OS's grant to use it

#if XC_X86
// XCR0: which register states the OS saves on context switch. A CPU may report AVX-512 in CPUID
// while the kernel has it disabled; using it then faults, so both must agree.
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

Isa detect() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return Isa::scalar;
  const bool osxsave = ecx & (1u << 27), avx = ecx & (1u << 28), fma = ecx & (1u << 12);
  if (!osxsave || !avx) return Isa::scalar;
  const uint64_t xcr0 = xgetbv0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;     // SSE + AVX state
  const bool os_zmm = (xcr0 & 0xe6) == 0xe6;   // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!os_ymm || __get_cpuid_max(0, nullptr) < 7) return Isa::scalar;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const bool avx2 = ebx & (1u << 5);
  const bool avx512f = ebx & (1u << 16), avx512bw = ebx & (1u << 30), avx512vl = ebx & (1u << 31);
  const bool avx512vnni = ecx & (1u << 11);
  unsigned eax1 = 0, ebx1, ecx1, edx1;  // leaf 7, subleaf 1: EAX bit 5 is AVX512_BF16
  if (eax >= 1) __cpuid_count(7, 1, eax1, ebx1, ecx1, edx1);
  const bool avx512bf16 = eax1 & (1u << 5);
  if (os_zmm && avx512f && avx512bw && avx512vl && avx2 && fma) {
    if (!avx512vnni) return Isa::avx512;
    if (!avx512bf16) return Isa::avx512_vnni;
    return amx_check() ? Isa::amx : Isa::avx512_bf16;
  }
  if (avx2 && fma) return Isa::avx2;
  return Isa::scalar;
}
#else
Isa detect() { return Isa::scalar; }
#endif

bool amx_check() {
#if XC_X86
  unsigned eax, ebx, ecx, edx;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const bool bf16 = edx & (1u << 22), tile = edx & (1u << 24), int8 = edx & (1u << 25);
  __get_cpuid(1, &eax, &ebx, &ecx, &edx);
  if (!(bf16 && tile && int8) || !(ecx & (1u << 27))) return false;
  if ((xgetbv0() & (3u << 17)) != (3u << 17)) return false;  // XTILECFG + XTILEDATA
#if defined(__linux__)
  // Linux hands out the 8 KiB tile state only to processes that ask (5.16 on); before the grant
  // the first tile instruction faults. ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18.
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return false;
#endif
  return true;
#else
  return false;
#endif
}

Isa cpu_best() {
  static const Isa best = detect();
  return best;
}

std::atomic<int> current{int(cpu_best())};

std::string supported_names() {
  std::string names;
  for (Isa isa : supported_isas()) names += (names.empty() ? "" : ", ") + std::string(isa_name(isa));
  return names;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::avx512_vnni: return "avx512_vnni";
    case Isa::avx512_bf16: return "avx512_bf16";
    case Isa::amx: return "amx";
  }
  return "unknown";
}

Isa best_isa() { return cpu_best(); }

// The tile kernels' hardware build also uses AVX-512 (their scaling and write-back), so AMX is
// usable where the whole amx ISA is: AMX granted, and AVX-512 VNNI and BF16 enabled by the OS.
bool amx_usable() { return cpu_best() == Isa::amx; }

std::vector<Isa> supported_isas() {
  std::vector<Isa> isas;
  for (int i = 0; i <= int(cpu_best()); ++i) isas.push_back(Isa(i));
  return isas;
}

Isa current_isa() { return Isa(current.load(std::memory_order_relaxed)); }

void set_isa(const std::string& name) {
  for (Isa isa : supported_isas()) {
    if (name == isa_name(isa)) {
      current.store(int(isa), std::memory_order_relaxed);
      return;
    }
  }
  bool known = false;
  for (int i = 0; i <= int(Isa::amx); ++i) known = known || name == isa_name(Isa(i));
  throw std::invalid_argument((known ? "this CPU cannot run ISA '" : "unknown ISA '") + name +
                              "'; choose one of: " + supported_names());
}

void set_isa_from_env() {
  const char* forced = std::getenv("XCOMPILE_ISA");
  if (forced && *forced) {
    try {
      set_isa(forced);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("XCOMPILE_ISA: ") + e.what());
    }
  }
}

}  // namespace xcompile
