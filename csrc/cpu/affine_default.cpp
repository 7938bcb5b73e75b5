// Baseline build of the CPU loops of the frozen affine map: the compiler's default target.
#define CPU_CAPABILITY DEFAULT
#include "affine_kernel.h"

namespace frozennorm::cpu {
void affine_dense_default(const DenseProblem& p) {
  DEFAULT::affine_dense_impl(p);
}
void affine_iter_default(at::TensorIteratorBase& iter, bool with_shift) {
  DEFAULT::affine_iter_impl(iter, with_shift);
}
}  // namespace frozennorm::cpu
