// The frozen affine map's loops, one build per CPU capability (dispatch.h): a plain compile
// of this file is the baseline build; setup.py also compiles it with each capability's flags.
#include "affine_kernel.h"

namespace frozennorm::cpu::CPU_CAPABILITY {
namespace {
constexpr Kernels kLoops{&affine_dense_impl, &affine_iter_impl, nullptr, nullptr, nullptr};
[[maybe_unused]] const bool registered = register_this_build(kLoops);
}  // namespace
}  // namespace frozennorm::cpu::CPU_CAPABILITY
