// CUDA implementation of the frozennorm ops (frozen_bn, frozen_bn_backward, frozen_bn_act,
// frozen_bn_act_backward): the host logic in frozen_bn_cuda_impl.h driving real launches on
// the current stream (cuda_launcher.cuh).
#include "cuda_launcher.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace frozennorm::cuda {

// The loops of each dtype pair are compiled in loops_*.cu, a translation unit each (in parallel).
extern template struct TypedLoops<c10::Half, float, CudaLauncher>;
extern template struct TypedLoops<c10::BFloat16, float, CudaLauncher>;
extern template struct TypedLoops<float, float, CudaLauncher>;
extern template struct TypedLoops<float, double, CudaLauncher>;
extern template struct TypedLoops<double, double, CudaLauncher>;

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
