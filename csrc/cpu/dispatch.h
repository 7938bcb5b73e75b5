// Run-time choice between the AVX2 and the baseline build of the CPU loops.
#pragma once

#include <cstdlib>
#include <cstring>

namespace frozennorm::cpu {

// AVX2 (+FMA, F16C) when the CPU has it, unless ATEN_CPU_CAPABILITY=default asks for the
// baseline (the same switch ATen's own kernels honour).
inline bool use_avx2() {
  static const bool avx2 = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    if (env != nullptr && std::strcmp(env, "default") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c");
#else
    return false;
#endif
  }();
  return avx2;
}

// Runs avx2(args...) when chosen and built, else baseline(args...).
template <typename... Args>
void run_best(bool (*avx2)(Args...), void (*baseline)(Args...), Args... args) {
  if (!(use_avx2() && avx2(args...))) baseline(args...);
}

// Outputs at least this large are written with non-temporal stores: they will not fit in
// the cache anyway, and streaming them avoids reading each output line before writing it.
constexpr int64_t kStreamBytes = 16 << 20;

}  // namespace frozennorm::cpu
