// CUDA implementation of the frozennorm ops (frozen_bn, frozen_bn_backward, frozen_bn_act,
// frozen_bn_act_backward): the host logic in frozen_bn_cuda_impl.h driving real launches on
// the current stream.
#include "frozen_bn_cuda_impl.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

namespace frozennorm::cuda {

template <typename K>
__global__ void __launch_bounds__(kThreads) kernel_entry(const K kernel) {
  kernel(ThreadIdx::current());
}

class CudaLauncher {
 public:
  explicit CudaLauncher(const at::Device& device)
      : device_index_(device.index()), stream_(c10::cuda::getCurrentCUDAStream(device.index())) {}

  int64_t max_blocks(int threads_per_block) const {
    return static_cast<int64_t>(sm_count(device_index_)) * (2048 / threads_per_block);
  }

  template <typename K>
  void launch(Dim2 grid, Dim2 block, const K& kernel) {
    kernel_entry<K><<<dim3(grid.x, grid.y), dim3(block.x, block.y), 0, stream_.stream()>>>(kernel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  static int sm_count(c10::DeviceIndex index) {
    static std::mutex mutex;
    static std::vector<int> counts;
    std::lock_guard<std::mutex> lock(mutex);
    if (static_cast<size_t>(index) >= counts.size()) counts.resize(index + 1, 0);
    if (counts[index] == 0) {
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[index], cudaDevAttrMultiProcessorCount, index));
    }
    return counts[index];
  }

  c10::DeviceIndex device_index_;
  c10::cuda::CUDAStream stream_;
};

namespace {

std::tuple<at::Tensor, at::Tensor> frozen_bn_cuda(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps) {
  const c10::cuda::CUDAGuard guard(input.device());
  CudaLauncher launcher(input.device());
  Loops<CudaLauncher> loops{launcher};
  return frozen_bn_front(loops, input, weight, bias, running_mean, running_var, eps);
}

at::Tensor frozen_bn_backward_cuda(const at::Tensor& grad_output, const at::Tensor& scale) {
  const c10::cuda::CUDAGuard guard(grad_output.device());
  CudaLauncher launcher(grad_output.device());
  Loops<CudaLauncher> loops{launcher};
  return frozen_bn_backward_front(loops, grad_output, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> frozen_bn_act_cuda(
    const at::Tensor& input,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps,
    int64_t activation,
    bool save_preact) {
  const c10::cuda::CUDAGuard guard(input.device());
  CudaLauncher launcher(input.device());
  Loops<CudaLauncher> loops{launcher};
  return frozen_bn_act_front(loops, input, residual, weight, bias, running_mean, running_var,
                             eps, activation, save_preact);
}

std::tuple<at::Tensor, at::Tensor> frozen_bn_act_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& saved, const at::Tensor& scale,
    int64_t activation, bool residual_grad) {
  const c10::cuda::CUDAGuard guard(grad_output.device());
  CudaLauncher launcher(grad_output.device());
  Loops<CudaLauncher> loops{launcher};
  return frozen_bn_act_backward_front(loops, grad_output, saved, scale, activation, residual_grad);
}

}  // namespace
}  // namespace frozennorm::cuda

TORCH_LIBRARY_IMPL(frozennorm, CUDA, m) {
  m.impl("frozen_bn", &frozennorm::cuda::frozen_bn_cuda);
  m.impl("frozen_bn_backward", &frozennorm::cuda::frozen_bn_backward_cuda);
  m.impl("frozen_bn_act", &frozennorm::cuda::frozen_bn_act_cuda);
  m.impl("frozen_bn_act_backward", &frozennorm::cuda::frozen_bn_act_backward_cuda);
}
