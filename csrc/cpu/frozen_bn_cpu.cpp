// CPU implementation of the frozennorm ops: frozen_bn, frozen_bn_backward, the fused
// epilogues frozen_bn_act, frozen_bn_act_backward, and frozen_bn_affine_backward: the loops
// (dispatch.h) behind the fronts every device shares (op_fronts.h).
#include "../op_fronts.h"
#include "dispatch.h"
#include "kernel_problem.h"

#include <ATen/Dispatch.h>
#include <ATen/TensorIterator.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/copy.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cmath>

namespace frozennorm::cpu {
namespace {

// A C-element vector of the compute dtype, converted only if it is not one already.
at::Tensor as_compute(const at::Tensor& t, at::ScalarType acc) {
  return t.scalar_type() == acc ? t : t.to(acc);
}

// The `inner` of a dense tensor seen as [outer, C, inner] in flat memory: the channel of
// memory offset k is (k / stride(1)) % C.
int64_t inner_of(const at::Tensor& dense) {
  return dense.size(1) == 1 ? dense.numel() : dense.stride(1);
}

// The flat view of dense `in` and `out` (same strides) the loops walk.
DenseProblem dense_problem(const at::Tensor& in, const at::Tensor& out, const at::Tensor& scale,
                           const at::Tensor& mean, const at::Tensor& shift) {
  const int64_t numel = in.numel();
  return DenseProblem{
      in.const_data_ptr(), out.mutable_data_ptr(),
      mean.defined() ? mean.const_data_ptr() : nullptr, scale.const_data_ptr(),
      shift.defined() ? shift.const_data_ptr() : nullptr,
      numel, in.size(1), inner_of(in),
      in.scalar_type(), scale.scalar_type(),
      numel * static_cast<int64_t>(in.element_size()) >= kStreamBytes};
}

// out = in (op) per-channel parameters (mean/shift undefined for the backward's in * scale).
void run_affine(const at::Tensor& out, const at::Tensor& in, const at::Tensor& mean,
                const at::Tensor& scale, const at::Tensor& shift) {
  if (in.numel() == 0) return;
  if (is_dense_like(in, out)) {
    kernels().affine_dense(dense_problem(in, out, scale, mean, shift));
    return;
  }
  const bool with_shift = mean.defined();
  const auto shape = channel_shape(in);
  at::TensorIteratorConfig config;
  config.check_all_same_dtype(false).add_output(out).add_const_input(in);
  const at::Tensor views[3] = {with_shift ? mean.view(shape) : at::Tensor(), scale.view(shape),
                               with_shift ? shift.view(shape) : at::Tensor()};
  for (const auto& v : views) {
    if (v.defined()) config.add_const_input(v);
  }
  auto iter = config.build();
  kernels().affine_iter(iter, with_shift);
}

// scale = weight / sqrt(var + eps) per channel, in the compute dtype.
at::Tensor channel_scale(const Stats& s, double eps, at::ScalarType acc) {
  const int64_t C = s.var.numel();
  at::Tensor scale = at::empty({C}, s.var.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.var.scalar_type(), "frozen_bn_scale", [&] {
    const scalar_t* v = s.var.const_data_ptr<scalar_t>();
    const scalar_t* w = s.weight.defined() ? s.weight.const_data_ptr<scalar_t>() : nullptr;
    auto fill = [&](auto* out) {
      using acc_t = std::remove_pointer_t<decltype(out)>;
      const acc_t e = static_cast<acc_t>(eps);
      for (int64_t c = 0; c < C; ++c) {
        const acc_t wc = w ? static_cast<acc_t>(w[c]) : acc_t(1);
        out[c] = wc / std::sqrt(static_cast<acc_t>(v[c]) + e);
      }
    };
    if (acc == at::kDouble) {
      fill(scale.mutable_data_ptr<double>());
    } else {
      fill(scale.mutable_data_ptr<float>());
    }
  });
  return scale;
}

// The CPU loops behind op_fronts.h's fronts.
struct Loops {
  at::Tensor forward(const Forward& f) {
    const Params p = params(f);
    run_affine(f.out, f.input, p.mean, p.scale, p.shift);
    return p.scale;
  }

  void backward(const Backward& b) {
    run_affine(b.grad_input, b.grad, at::Tensor(), b.scale, at::Tensor());
  }

  at::Tensor act_forward(const Forward& f) {
    const Params params_ = params(f);  // (named: the problem keeps their data pointers)
    if (f.input.numel() == 0) return params_.scale;
    DenseProblem p = dense_problem(f.input, f.out, params_.scale, params_.mean, params_.shift);
    p.act = f.act;
    p.residual = f.residual.defined() ? f.residual.const_data_ptr() : nullptr;
    p.extra = f.preact.defined() ? f.preact.mutable_data_ptr() : nullptr;
    kernels().act_forward(p);
    return params_.scale;
  }

  void act_backward(const Backward& b) {
    if (b.grad.numel() == 0) return;
    DenseProblem p = dense_problem(b.grad, b.grad_input, b.scale, at::Tensor(), at::Tensor());
    p.act = b.act;
    p.saved = b.saved.const_data_ptr();
    p.extra = b.grad_residual.defined() ? b.grad_residual.mutable_data_ptr() : nullptr;
    kernels().act_backward(p);
  }

  void affine_backward(const Backward& b) {
    auto data = [](const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; };
    kernels().affine_backward(AffineBackwardProblem{
        b.grad.const_data_ptr(), b.input.const_data_ptr(),
        b.saved.defined() ? b.saved.const_data_ptr() : nullptr, b.mean.const_data_ptr(),
        b.scale.const_data_ptr(), data(b.grad_input), data(b.grad_residual),
        b.sum_grad.mutable_data_ptr(), b.sum_centered.mutable_data_ptr(), b.input.numel(),
        b.input.size(1), inner_of(b.input), b.input.scalar_type(), b.acc, b.act});
  }

 private:
  // A forward's per-channel parameters in the compute dtype (shift: zeros without a bias).
  struct Params {
    at::Tensor scale, mean, shift;
  };
  static Params params(const Forward& f) {
    at::Tensor scale = channel_scale(f.stats, f.eps, f.acc);
    at::Tensor shift =
        f.stats.bias.defined() ? as_compute(f.stats.bias, f.acc) : at::zeros_like(scale);
    return {scale, as_compute(f.stats.mean, f.acc), shift};
  }
};

std::tuple<at::Tensor, at::Tensor> frozen_bn_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double eps) {
  Loops loops;
  return frozen_bn_front(loops, input, weight, bias, running_mean, running_var, eps);
}

at::Tensor frozen_bn_backward_cpu(const at::Tensor& grad_output, const at::Tensor& scale) {
  Loops loops;
  return frozen_bn_backward_front(loops, grad_output, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> frozen_bn_act_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
    int64_t activation, bool save_preact) {
  Loops loops;
  return frozen_bn_act_front(loops, input, residual, weight, bias, running_mean, running_var,
                             eps, activation, save_preact);
}

std::tuple<at::Tensor, at::Tensor> frozen_bn_act_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& saved, const at::Tensor& scale,
    int64_t activation, bool residual_grad) {
  Loops loops;
  return frozen_bn_act_backward_front(loops, grad_output, saved, scale, activation,
                                      residual_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> frozen_bn_affine_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& saved,
    const at::Tensor& running_mean, const at::Tensor& scale, int64_t activation, bool input_grad,
    bool residual_grad) {
  Loops loops;
  return frozen_bn_affine_backward_front(loops, grad_output, input, saved, running_mean, scale,
                                         activation, input_grad, residual_grad);
}

}  // namespace
}  // namespace frozennorm::cpu

TORCH_LIBRARY_IMPL(frozennorm, CPU, m) {
  m.impl("frozen_bn", &frozennorm::cpu::frozen_bn_cpu);
  m.impl("frozen_bn_backward", &frozennorm::cpu::frozen_bn_backward_cpu);
  m.impl("frozen_bn_act", &frozennorm::cpu::frozen_bn_act_cpu);
  m.impl("frozen_bn_act_backward", &frozennorm::cpu::frozen_bn_act_backward_cpu);
  m.impl("frozen_bn_affine_backward", &frozennorm::cpu::frozen_bn_affine_backward_cpu);
}
