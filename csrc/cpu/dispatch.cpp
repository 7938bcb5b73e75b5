// The registry of the per-capability builds of the CPU loops and the run-time choice among
// them (dispatch.h). Compiled for the baseline target only.
#include "dispatch.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define FROZENNORM_X86_CPU_CHECKS 1
#endif

namespace frozennorm::cpu {
namespace {

constexpr int kCapabilities = static_cast<int>(Capability::kCount);
constexpr const char* kNames[kCapabilities] = {"DEFAULT", "AVX2", "AVX512", "AVX512_BF16"};

// What each build registered, merged per loop (two files register per build). Constant-
// initialized: the registrations, which run while the library loads, find it ready.
Kernels registered[kCapabilities] = {};

template <typename Fn>
void take(Fn& slot, Fn fn) {
  if (fn != nullptr) slot = fn;
}

bool built(Capability c) {
  const Kernels& k = registered[static_cast<int>(c)];
  return k.affine_dense != nullptr || k.affine_iter != nullptr || k.act_forward != nullptr ||
      k.act_backward != nullptr || k.affine_backward != nullptr;
}

// Does this CPU (and its OS, which must save the wider registers) run capability c?
bool cpu_runs(Capability c) {
  switch (c) {
    case Capability::kDefault:
      return true;
#ifdef FROZENNORM_X86_CPU_CHECKS
    case Capability::kAVX2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
          __builtin_cpu_supports("f16c");
    case Capability::kAVX512:
      __builtin_cpu_init();
      return cpu_runs(Capability::kAVX2) && __builtin_cpu_supports("avx512f") &&
          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
          __builtin_cpu_supports("avx512dq");
    case Capability::kAVX512BF16: {
      // CPUID leaf 7, subleaf 1, EAX bit 5 (not every compiler's __builtin_cpu_supports
      // knows "avx512bf16"); the OS support for AVX-512 state is checked with AVX512.
      unsigned a = 0, b = 0, c = 0, d = 0;
      return cpu_runs(Capability::kAVX512) && __get_cpuid_count(7, 1, &a, &b, &c, &d) &&
          ((a >> 5) & 1u) != 0;
    }
#endif
    default:
      return false;
  }
}

// The highest capability an override allows, or kCount (no limit) where none is set.
// Unknown values are ignored (ATen itself warns about an invalid ATEN_CPU_CAPABILITY).
Capability override_limit() {
  const char* own = std::getenv("FROZENNORM_CPU_CAPABILITY");
  if (own != nullptr && *own != '\0') {
    const char* names[kCapabilities] = {"default", "avx2", "avx512", "avx512_bf16"};
    for (int i = 0; i < kCapabilities; ++i) {
      if (std::strcmp(own, names[i]) == 0) return static_cast<Capability>(i);
    }
    TORCH_WARN("ignoring invalid value for FROZENNORM_CPU_CAPABILITY: ", own,
               " (choose from default, avx2, avx512, avx512_bf16)");
  }
  if (const char* aten = std::getenv("ATEN_CPU_CAPABILITY")) {
    if (std::strcmp(aten, "default") == 0) return Capability::kDefault;
    if (std::strcmp(aten, "avx2") == 0) return Capability::kAVX2;
    if (std::strcmp(aten, "avx512") == 0) return Capability::kAVX512BF16;
  }
  return Capability::kCount;
}

Capability choose() {
  const int limit = static_cast<int>(override_limit());
  for (int i = std::min(limit, kCapabilities - 1); i > 0; --i) {
    const auto c = static_cast<Capability>(i);
    if (built(c) && cpu_runs(c)) return c;
  }
  return Capability::kDefault;
}

Kernels resolve(Capability chosen) {
  Kernels out{};
  for (int i = 0; i <= static_cast<int>(chosen); ++i) {  // higher builds override lower ones
    const Kernels& k = registered[i];
    take(out.affine_dense, k.affine_dense);
    take(out.affine_iter, k.affine_iter);
    take(out.act_forward, k.act_forward);
    take(out.act_backward, k.act_backward);
    take(out.affine_backward, k.affine_backward);
  }
  TORCH_CHECK(out.affine_dense != nullptr && out.affine_iter != nullptr &&
                  out.act_forward != nullptr && out.act_backward != nullptr &&
                  out.affine_backward != nullptr,
              "frozennorm's library lacks its baseline CPU loops (csrc/cpu/*_kernel.cpp were "
              "not compiled into it): a broken build, rebuild frozennorm");
  return out;
}

}  // namespace

bool register_kernels(Capability capability, const Kernels* kernels) {
  Kernels& slot = registered[static_cast<int>(capability)];
  take(slot.affine_dense, kernels->affine_dense);
  take(slot.affine_iter, kernels->affine_iter);
  take(slot.act_forward, kernels->act_forward);
  take(slot.act_backward, kernels->act_backward);
  take(slot.affine_backward, kernels->affine_backward);
  return true;
}

Capability capability() {
  static const Capability chosen = choose();
  return chosen;
}

const Kernels& kernels() {
  static const Kernels resolved = resolve(capability());
  return resolved;
}

const char* capability_name(Capability capability) {
  return kNames[static_cast<int>(capability)];
}

std::vector<std::string> runnable_capabilities() {
  std::vector<std::string> out;
  for (int i = 0; i < kCapabilities; ++i) {
    const auto c = static_cast<Capability>(i);
    if (built(c) && cpu_runs(c)) out.emplace_back(kNames[i]);
  }
  return out;
}

}  // namespace frozennorm::cpu

// torch.ops.frozennorm._cpu_capability(): the build of the CPU loops that runs;
// torch.ops.frozennorm._cpu_capabilities(): the builds this library has that this CPU runs.
TORCH_LIBRARY_FRAGMENT(frozennorm, m) {
  m.def("_cpu_capability() -> str", [] {
    return std::string(frozennorm::cpu::capability_name(frozennorm::cpu::capability()));
  });
  m.def("_cpu_capabilities() -> str[]", [] { return frozennorm::cpu::runnable_capabilities(); });
}
