// AVX2 + FMA + F16C build of the CPU loops of the frozen affine map. setup.py compiles *_avx2.cpp
// with -mavx2 -mfma -mf16c (on x86-64) for these files alone, so the library still loads on
// CPUs without them; the callers check the CPU at run time (dispatch.h).
#include "kernel_problem.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "affine_kernel.h"

namespace frozennorm::cpu {
bool affine_dense_avx2(const DenseProblem& p) {
  AVX2::affine_dense_impl(p);
  return true;
}
bool affine_iter_avx2(at::TensorIteratorBase& iter, bool with_shift) {
  AVX2::affine_iter_impl(iter, with_shift);
  return true;
}
}  // namespace frozennorm::cpu
#else
namespace frozennorm::cpu {
// Not built for this target: the callers use the baseline loops.
bool affine_dense_avx2(const DenseProblem&) {
  return false;
}
bool affine_iter_avx2(at::TensorIteratorBase&, bool) {
  return false;
}
}  // namespace frozennorm::cpu
#endif
