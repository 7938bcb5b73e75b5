// Baseline build of the CPU loops of the fused epilogues: the compiler's default target.
#define CPU_CAPABILITY DEFAULT
#include "act_kernel.h"

namespace frozennorm::cpu {
void act_forward_dense_default(const DenseProblem& p) {
  DEFAULT::act_forward_dense_impl(p);
}
void act_backward_dense_default(const DenseProblem& p) {
  DEFAULT::act_backward_dense_impl(p);
}
}  // namespace frozennorm::cpu
