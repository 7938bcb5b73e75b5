// Run-time choice among the builds of the CPU loops, one per CPU capability.
//
// The loops (*_kernel.cpp) are compiled once per capability: always for the baseline (the
// compiler's default target: SSE2 on x86-64, NEON on aarch64), and where setup.py can (x86-64
// with GCC or Clang) also with AVX2, AVX-512 and AVX-512 + BF16 enabled for those files alone.
// Each build registers its loops here when the library loads, so the fronts never name a
// capability's symbols: a build that leaves a capability out (another platform, -O0, a
// plain build of the sources) links and loads all the same, and runs the best build it has.
#pragma once

#include "kernel_problem.h"

#include <cstdint>
#include <string>
#include <vector>

namespace frozennorm::cpu {

// In increasing order; each one runs only where the CPU has the ones before it.
enum class Capability : int {
  kDefault = 0,  // the baseline build (at::vec's default: plain C++, NEON on aarch64)
  kAVX2,         // AVX2 + FMA + F16C (ATen's AVX2)
  kAVX512,       // AVX-512 F/BW/VL/DQ + FMA (ATen's AVX512)
  kAVX512BF16,   // the same and AVX512-BF16: bfloat16 rounding in one instruction
  kCount,
};

// The loops one build registers (the ones a *_kernel.cpp does not define are null).
struct Kernels {
  // out = (in - mean) * scale + shift, or out = in * scale (mean == shift == null), over
  // dense `in` and `out` with the same strides
  void (*affine_dense)(const DenseProblem&);
  // the same on any layout, through a TensorIterator over (out, in, mean, scale, shift) or
  // (out, in, scale), the parameters broadcast from shape [1, C, 1, ...]
  void (*affine_iter)(at::TensorIteratorBase&, bool with_shift);
  // Fused epilogue forward: out = act(round(z) [+ residual]), z = (in - mean) * scale +
  // shift, every intermediate rounded to the data dtype as the unfused ops would; `extra`,
  // if set, receives the pre-activation.
  void (*act_forward)(const DenseProblem&);
  // Fused epilogue backward: ga = grad_output * act'(saved), rounded to the data dtype;
  // out = ga * scale, and `extra`, if set, receives ga (the residual's gradient).
  void (*act_backward)(const DenseProblem&);
  // The backward with the affine parameters' per-channel sums (AffineBackwardProblem), in
  // one pass; the sums' order of operations depends on the shape alone, never on the
  // number of threads.
  void (*affine_backward)(const AffineBackwardProblem&);
};

// Called once per build of each *_kernel.cpp while the library loads.
bool register_kernels(Capability capability, const Kernels* kernels);

// The loops to run: the chosen capability's build (capability()), each loop falling back
// to a lower build where the chosen one lacks it.
const Kernels& kernels();

// The capability whose loops run: the highest one that was built, that this CPU runs and
// that the override allows. The override is ATen's: ATEN_CPU_CAPABILITY=default|avx2|avx512
// caps the choice (avx512 allows AVX-512 + BF16); FROZENNORM_CPU_CAPABILITY=default|avx2|
// avx512|avx512_bf16, where set, caps it for frozennorm alone (to test each build on one
// machine). Neither can raise the choice above what the CPU runs.
Capability capability();

// "DEFAULT", "AVX2", "AVX512", "AVX512_BF16" (torch.backends.cpu.get_cpu_capability()'s
// spelling).
const char* capability_name(Capability capability);

// The capabilities built into this library that this CPU runs, lowest first.
std::vector<std::string> runnable_capabilities();

// Outputs at least this large are written with non-temporal stores: they will not fit in
// the cache anyway, and streaming them avoids reading each output line before writing it.
constexpr int64_t kStreamBytes = 16 << 20;

}  // namespace frozennorm::cpu
