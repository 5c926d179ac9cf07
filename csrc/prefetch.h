// Software prefetch of the weight streams the decode kernels read once per token, into L2
// (prefetcht1). Into L1 (prefetcht0) each line in flight holds one of the core's few L1 fill
// buffers until it lands, which capped the streams below the memory's bandwidth; into L2 the
// requests queue in L2's larger one and the L1 misses that follow hit L2. Decode of the 1.1B
// model, 2 threads, Intel Xeon (AMX): BF16 96 -> 72 ms a token, INT8 39 -> 36, INT4 (Q4_0's
// blocks) 28 -> 23.5 (no software prefetch at all: 86.5 and 30).
#pragma once

#include "dispatch.h"

#if XC_X86
#include <immintrin.h>

namespace xcompile {

__attribute__((always_inline)) inline void prefetch_stream(const void* p) {
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
}

}  // namespace xcompile
#endif
