#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace ropekit {
namespace {

bool supported(CpuIsa isa) {
  if (isa == CpuIsa::kBaseline) return true;
#if ROPEKIT_CPU_AVX2
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

const char* name_of(CpuIsa isa) { return isa == CpuIsa::kAvx2 ? "avx2" : "baseline"; }

CpuIsa parse(const std::string& name, const char* source) {
  CpuIsa isa;
  if (name == "baseline") {
    isa = CpuIsa::kBaseline;
  } else if (name == "avx2") {
    isa = CpuIsa::kAvx2;
  } else {
    TORCH_CHECK(false, source, ": expected \"baseline\" or \"avx2\", got \"", name, "\"");
  }
  TORCH_CHECK(supported(isa), source, ": \"", name, "\" is not available ",
              ROPEKIT_CPU_AVX2 ? "on this CPU" : "in this build (AVX2 kernels need x86-64 and GCC)");
  return isa;
}

// Set once, at the first call: ROPEKIT_CPU_ISA if it names an instruction set this build and CPU can run, else
// the best one (an unusable value warns; the choice never changes a result, only the speed).
std::atomic<CpuIsa>& current() {
  static std::atomic<CpuIsa> isa{[] {
    const CpuIsa best = supported(CpuIsa::kAvx2) ? CpuIsa::kAvx2 : CpuIsa::kBaseline;
    const char* env = std::getenv("ROPEKIT_CPU_ISA");
    if (env == nullptr || *env == '\0') return best;
    try {
      return parse(env, "ROPEKIT_CPU_ISA");
    } catch (const c10::Error& e) {
      TORCH_WARN(e.what_without_backtrace(), "; using \"", name_of(best), "\"");
      return best;
    }
  }()};
  return isa;
}

}  // namespace

CpuIsa cpu_isa() { return current().load(std::memory_order_relaxed); }

std::string cpu_isa_op(c10::string_view isa) {
  const CpuIsa previous = cpu_isa();
  if (!isa.empty()) current().store(parse(std::string(isa), "isa"), std::memory_order_relaxed);
  return name_of(previous);
}

}  // namespace ropekit
