// Test-only: the CUDA ops' host logic (csrc/cuda/frozen_bn_cuda_impl.h) and kernel bodies
// (csrc/cuda/affine_kernels.cuh) compiled as plain C++ and run on the CPU, every (block,
// thread) of each grid in turn. Registered as frozennorm_emu::* for CPU tensors, so the tests
// check the CUDA indexing, vector widths, tails, layouts and 64-bit paths without a GPU.
#include "cuda/frozen_bn_cuda_impl.h"

#include <torch/library.h>

namespace frozennorm::cuda {
namespace {

struct EmulationSettings {
  int64_t sms = 2;                         // a small "device", so grid-stride loops wrap
  int64_t launches = 0;                    // kernel launches since the last reset
};

EmulationSettings& settings() {
  static EmulationSettings s;
  return s;
}

struct EmulatedLauncher {
  int64_t max_blocks(int threads_per_block) const {
    return settings().sms * (2048 / threads_per_block);
  }
  template <typename K>
  void launch(Dim2 grid, Dim2 block, const K& kernel) {
    TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.y <= 65535, "bad grid ", grid.x, "x", grid.y);
    TORCH_CHECK(block.x >= 1 && block.y >= 1 && block.x * block.y <= kThreads,
                "bad block ", block.x, "x", block.y);
    ++settings().launches;
    ThreadIdx t;
    t.grid = grid;
    t.block_dim = block;
    for (uint32_t by = 0; by < grid.y; ++by)
      for (uint32_t bx = 0; bx < grid.x; ++bx)
        for (uint32_t ty = 0; ty < block.y; ++ty)
          for (uint32_t tx = 0; tx < block.x; ++tx) {
            t.block = {bx, by};
            t.thread = {tx, ty};
            kernel(t);
          }
  }
};

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double eps) {
  EmulatedLauncher launcher;
  Loops<decltype(launcher)> loops{launcher};
  return frozen_bn_front(loops, input, weight, bias, running_mean, running_var, eps);
}

at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& scale) {
  EmulatedLauncher launcher;
  Loops<decltype(launcher)> loops{launcher};
  return frozen_bn_backward_front(loops, grad_output, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emu_act_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
    int64_t activation, bool save_preact) {
  EmulatedLauncher launcher;
  Loops<decltype(launcher)> loops{launcher};
  return frozen_bn_act_front(loops, input, residual, weight, bias, running_mean, running_var,
                             eps, activation, save_preact);
}

std::tuple<at::Tensor, at::Tensor> emu_act_backward(const at::Tensor& grad_output,
                                                const at::Tensor& saved, const at::Tensor& scale,
                                                int64_t activation, bool residual_grad) {
  EmulatedLauncher launcher;
  Loops<decltype(launcher)> loops{launcher};
  return frozen_bn_act_backward_front(loops, grad_output, saved, scale, activation, residual_grad);
}

int64_t configure(int64_t sms) {
  settings().sms = sms;
  const int64_t launches = settings().launches;
  settings().launches = 0;
  return launches;
}

// Number of n in [0, n_max) and [n_high - n_max, n_high] where Divider disagrees with `/`.
int64_t divider_mismatches(int64_t divisor, int64_t n_max, int64_t n_high) {
  const Divider d(divisor);
  int64_t bad = 0;
  auto check = [&](int64_t n) { bad += d.div(n) != n / divisor; };
  for (int64_t n = 0; n < n_max; ++n) check(n);
  for (int64_t n = n_high - n_max; n <= n_high; ++n) check(n);
  return bad;
}

}  // namespace
}  // namespace frozennorm::cuda

TORCH_LIBRARY(frozennorm_emu, m) {
  m.def(
      "frozen_bn(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, float eps) -> (Tensor, Tensor)");
  m.def("frozen_bn_backward(Tensor grad_output, Tensor scale) -> Tensor");
  m.def(
      "frozen_bn_act(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor running_mean, Tensor running_var, float eps, int activation, bool save_preact) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "frozen_bn_act_backward(Tensor grad_output, Tensor saved, Tensor scale, int activation, "
      "bool residual_grad) -> (Tensor, Tensor)");
  // Sets the emulated SM count; returns (and resets) the number of kernel launches since the
  // previous call.
  m.def("configure(int sms) -> int");
  m.def("divider_mismatches(int divisor, int n_max, int n_high) -> int");
}

TORCH_LIBRARY_IMPL(frozennorm_emu, CPU, m) {
  m.impl("frozen_bn", &frozennorm::cuda::forward);
  m.impl("frozen_bn_backward", &frozennorm::cuda::backward);
  m.impl("frozen_bn_act", &frozennorm::cuda::emu_act_forward);
  m.impl("frozen_bn_act_backward", &frozennorm::cuda::emu_act_backward);
}

TORCH_LIBRARY_IMPL(frozennorm_emu, CatchAll, m) {
  m.impl("configure", &frozennorm::cuda::configure);
  m.impl("divider_mismatches", &frozennorm::cuda::divider_mismatches);
}
