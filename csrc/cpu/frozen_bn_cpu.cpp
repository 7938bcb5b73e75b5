// CPU implementation of the frozennorm ops: frozen_bn, frozen_bn_backward, and the fused
// epilogues frozen_bn_act, frozen_bn_act_backward.
#include "../frozen_bn.h"
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

// The flat view of dense `in` and `out` (same strides) the loops walk.
DenseProblem dense_problem(const at::Tensor& in, const at::Tensor& out, const at::Tensor& scale,
                           const at::Tensor& mean, const at::Tensor& shift) {
  const int64_t numel = in.numel();
  const int64_t C = in.size(1);
  return DenseProblem{
      in.const_data_ptr(), out.mutable_data_ptr(),
      mean.defined() ? mean.const_data_ptr() : nullptr, scale.const_data_ptr(),
      shift.defined() ? shift.const_data_ptr() : nullptr,
      numel, C,
      // In a dense tensor the channel of memory offset k is (k / stride(1)) % C.
      C == 1 ? numel : in.stride(1),
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

std::tuple<at::Tensor, at::Tensor> frozen_bn_cpu(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps) {
  const Stats s = check_forward_args(input, weight, bias, running_mean, running_var);
  const at::ScalarType acc = compute_dtype(input.scalar_type(), s.mean.scalar_type());
  at::Tensor scale = channel_scale(s, eps, acc);
  at::Tensor out = at::empty_like(input);
  const at::Tensor shift = s.bias.defined() ? as_compute(s.bias, acc) : at::zeros_like(scale);
  run_affine(out, input, as_compute(s.mean, acc), scale, shift);
  return {out, scale};
}

at::Tensor frozen_bn_backward_cpu(const at::Tensor& grad_output, const at::Tensor& scale) {
  check_backward_args(grad_output, scale);
  const at::ScalarType acc = compute_dtype(grad_output.scalar_type(), scale.scalar_type());
  at::Tensor grad_input = at::empty_like(grad_output);
  run_affine(grad_input, grad_output, at::Tensor(), as_compute(scale, acc).contiguous(), at::Tensor());
  return grad_input;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> frozen_bn_act_cpu(
    const at::Tensor& input,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps,
    int64_t activation,
    bool save_preact) {
  const Stats s = check_forward_args(input, weight, bias, running_mean, running_var);
  check_act_args(input, residual, activation);
  const bool has_residual = residual.has_value() && residual->defined();
  if (activation == static_cast<int64_t>(Activation::kIdentity) && !has_residual) {
    auto [out, scale] = frozen_bn_cpu(input, weight, bias, running_mean, running_var, eps);
    return {out, scale, at::empty({0}, out.options())};
  }
  const at::ScalarType acc = compute_dtype(input.scalar_type(), s.mean.scalar_type());
  at::Tensor scale = channel_scale(s, eps, acc);
  // The fused loops need dense data, the residual in the same layout (normally free).
  const at::Tensor x = dense(input);
  at::Tensor out = at::empty_like(x);
  const at::Tensor res = has_residual ? in_layout_of(*residual, x) : at::Tensor();
  const bool keep = save_preact && activation == static_cast<int64_t>(Activation::kSiLU);
  at::Tensor preact = keep ? at::empty_like(x) : at::empty({0}, x.options());
  if (x.numel() > 0) {
    // (named: the problem keeps their data pointers)
    const at::Tensor mean = as_compute(s.mean, acc);
    const at::Tensor shift = s.bias.defined() ? as_compute(s.bias, acc) : at::zeros_like(scale);
    DenseProblem p = dense_problem(x, out, scale, mean, shift);
    p.act = static_cast<Activation>(activation);
    p.residual = has_residual ? res.const_data_ptr() : nullptr;
    p.extra = keep ? preact.mutable_data_ptr() : nullptr;
    kernels().act_forward(p);
  }
  return {out, scale, preact};
}

std::tuple<at::Tensor, at::Tensor> frozen_bn_act_backward_cpu(
    const at::Tensor& grad_output,
    const at::Tensor& saved,
    const at::Tensor& scale,
    int64_t activation,
    bool residual_grad) {
  check_act_backward_args(grad_output, saved, scale, activation);
  if (activation == static_cast<int64_t>(Activation::kIdentity)) {
    // the residual's gradient is grad_output itself
    return {frozen_bn_backward_cpu(grad_output, scale),
            residual_grad ? grad_output.clone() : at::empty({0}, grad_output.options())};
  }
  const at::ScalarType acc = compute_dtype(grad_output.scalar_type(), scale.scalar_type());
  // Everything in the layout of the saved tensor (the forward's output or pre-activation).
  const at::Tensor sv = dense(saved);
  const at::Tensor g = in_layout_of(grad_output, sv);
  at::Tensor grad_input = at::empty_like(sv);
  at::Tensor grad_residual = residual_grad ? at::empty_like(sv) : at::empty({0}, sv.options());
  if (g.numel() > 0) {
    const at::Tensor scale_acc = as_compute(scale, acc).contiguous();  // outlives p
    DenseProblem p = dense_problem(g, grad_input, scale_acc, at::Tensor(), at::Tensor());
    p.act = static_cast<Activation>(activation);
    p.saved = sv.const_data_ptr();
    p.extra = residual_grad ? grad_residual.mutable_data_ptr() : nullptr;
    kernels().act_backward(p);
  }
  return {grad_input, grad_residual};
}

}  // namespace
}  // namespace frozennorm::cpu

TORCH_LIBRARY_IMPL(frozennorm, CPU, m) {
  m.impl("frozen_bn", &frozennorm::cpu::frozen_bn_cpu);
  m.impl("frozen_bn_backward", &frozennorm::cpu::frozen_bn_backward_cpu);
  m.impl("frozen_bn_act", &frozennorm::cpu::frozen_bn_act_cpu);
  m.impl("frozen_bn_act_backward", &frozennorm::cpu::frozen_bn_act_backward_cpu);
}
