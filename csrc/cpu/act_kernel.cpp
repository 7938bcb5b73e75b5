// The fused epilogues' loops, one build per CPU capability (dispatch.h): a plain compile of
// this file is the baseline build; setup.py also compiles it with each capability's flags.
#include "act_kernel.h"

namespace frozennorm::cpu::CPU_CAPABILITY {
namespace {
constexpr Kernels kLoops{nullptr, nullptr, &act_forward_dense_impl, &act_backward_dense_impl,
                          nullptr};
[[maybe_unused]] const bool registered = register_this_build(kLoops);
}  // namespace
}  // namespace frozennorm::cpu::CPU_CAPABILITY
