// The instruction set the CPU kernels run with.
//
// Row kernels that gain from wider vectors (qk_norm_rope's) are compiled twice in their translation unit: for the
// build's baseline (x86-64: SSE2) and, on x86-64 with GCC, for AVX2 (`#pragma GCC target("avx2")`), then chosen at
// run time. Both do the same IEEE-754 operations in the same order (the loops are the same source, reductions have
// a fixed order, and -ffp-contract=off keeps products and sums from fusing into FMAs), so their results are
// bit-identical; tests/python/test_cpu_isa.py checks it. Only the vector width differs.
//
// The choice: ROPEKIT_CPU_ISA=baseline|avx2, read at the first CPU kernel call, else the best the CPU supports (an
// unknown or unavailable value warns and takes the best: results are the same either way); changed at run time
// with torch.ops.ropekit._cpu_isa (tests and benchmarks), which raises for a name it cannot run.
#pragma once

#include <c10/util/string_view.h>

#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ROPEKIT_CPU_AVX2 1
#else
#define ROPEKIT_CPU_AVX2 0
#endif

namespace ropekit {

enum class CpuIsa { kBaseline, kAvx2 };

CpuIsa cpu_isa();

// The `_cpu_isa(str isa="") -> str` op: returns the current choice's name ("baseline" or "avx2") and, when `isa` is
// not empty, switches to it. Raises for an unknown name or one this build or CPU cannot run.
std::string cpu_isa_op(c10::string_view isa);

}  // namespace ropekit
