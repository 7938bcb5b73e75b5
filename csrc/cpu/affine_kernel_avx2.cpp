// AVX2 + FMA + F16C build of the CPU loops. setup.py compiles this file alone with
// -mavx2 -mfma -mf16c (on x86-64), so the library still loads on CPUs without them; the
// caller checks the CPU at run time before using it.
#include "affine_problem.h"

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
bool affine_dense_avx2(const DenseProblem&) {
  return false;  // not built for this target
}
bool affine_iter_avx2(at::TensorIteratorBase&, bool) {
  return false;
}
}  // namespace frozennorm::cpu
#endif
