// The trainable-affine backward's loops, one build per CPU capability (dispatch.h): a plain
// compile of this file is the baseline build; setup.py also compiles it with each
// capability's flags.
#include "affine_backward_kernel.h"

namespace frozennorm::cpu::CPU_CAPABILITY {
namespace {
constexpr Kernels kLoops{nullptr, nullptr, nullptr, nullptr, &affine_backward_impl};
[[maybe_unused]] const bool registered = register_this_build(kLoops);
}  // namespace
}  // namespace frozennorm::cpu::CPU_CAPABILITY
