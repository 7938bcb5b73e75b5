// Autograd of the frozennorm ops (registered for the Autograd key of every backend).
// frozen_bn / frozen_bn_backward:
//
// The input gradient needs only the per-channel `scale` the forward returns: nothing of
// activation size is saved, and never the caller's statistics tensors (DDP overwrites module
// buffers in place between forwards). Gradients for the statistics are computed too when
// they require grad (functional use); only then is the input saved, as a BatchNorm backward
// would. Both backwards are differentiable (double backward).
//
// The pure-PyTorch fallback (frozennorm/ops.py) registers the same formulas in Python when
// the package is installed without this extension.
#include "frozen_bn.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace frozennorm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
    double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("frozennorm::frozen_bn", "")
                       .typed<decltype(call_forward)>();
  return op.call(input, weight, bias, mean, var, eps);
}

at::Tensor call_backward(const at::Tensor& grad_output, const at::Tensor& scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("frozennorm::frozen_bn_backward", "")
                       .typed<decltype(call_backward)>();
  return op.call(grad_output, scale);
}

std::vector<int64_t> reduce_dims(int64_t ndim) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < ndim; ++d) dims.push_back(d);
  return dims;
}

bool requires_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->requires_grad();
}

class FrozenBNFunction : public torch::autograd::Function<FrozenBNFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
      double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, scale] = call_forward(input, weight, bias, mean, var, eps);
    const bool stats_grad = requires_grad(weight) || requires_grad(bias) ||
        mean.requires_grad() || var.requires_grad();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["stats_grad"] = stats_grad;
    if (stats_grad) {
      ctx->saved_data["bias_dtype"] =
          bias.has_value() && bias->defined() ? bias->scalar_type() : at::kFloat;
      ctx->save_for_backward(
          {scale, input, weight.has_value() ? *weight : at::Tensor(), mean, var});
    } else {
      ctx->save_for_backward({scale});
    }
    ctx->mark_non_differentiable({scale});
    ctx->set_materialize_grads(false);  // no zeros for the scale's (never used) gradient
    return {out, scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return variable_list(6);  // the output took no part in the loss
    const auto saved = ctx->get_saved_variables();
    const bool need_input = ctx->needs_input_grad(0);
    if (!ctx->saved_data["stats_grad"].toBool()) {
      return {need_input ? call_backward(grad, saved[0]) : at::Tensor(), at::Tensor(),
              at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const double eps = ctx->saved_data["eps"].toDouble();
    const at::Tensor &forward_scale = saved[0], &input = saved[1], &weight = saved[2],
                     &mean = saved[3], &var = saved[4];
    const at::ScalarType acc = forward_scale.scalar_type();
    const at::Tensor std = (var.to(acc) + eps).sqrt();
    const at::Tensor invstd = std.reciprocal();
    // One rule for the scale: the forward kernel's, whichever statistics require grad. For a
    // double backward it takes the derivative of ATen's weight / sqrt(var + eps), whose
    // value may differ from the kernel's by an ulp: that difference is exact (Sterbenz), so
    // adding it back gives the kernel's value bit for bit.
    at::Tensor scale = forward_scale;
    if (at::GradMode::is_enabled()) {
      const at::Tensor formula = weight.defined() ? weight.to(acc) / std : invstd;
      scale = formula + (forward_scale - formula.detach());
    }
    variable_list out(6);
    if (need_input) out[0] = call_backward(grad, scale);
    const auto dims = reduce_dims(input.dim());
    const at::Tensor g = grad.to(acc);
    at::Tensor g_sum, g_xc;
    if (ctx->needs_input_grad(2) || ctx->needs_input_grad(3)) g_sum = g.sum(dims);
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(4)) {
      g_xc = (g * (input.to(acc) - mean.to(acc).view(channel_shape(input)))).sum(dims);
    }
    if (ctx->needs_input_grad(1)) out[1] = (g_xc * invstd).to(weight.scalar_type());
    if (ctx->needs_input_grad(2)) {
      out[2] = g_sum.to(ctx->saved_data["bias_dtype"].toScalarType());
    }
    if (ctx->needs_input_grad(3)) out[3] = (-g_sum * scale).to(mean.scalar_type());
    if (ctx->needs_input_grad(4)) {
      out[4] = (g_xc * scale * invstd * invstd * -0.5).to(var.scalar_type());
    }
    return out;
  }
};

class FrozenBNBackwardFunction : public torch::autograd::Function<FrozenBNBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_output,
                               const at::Tensor& scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({scale, scale.requires_grad() ? grad_output : at::Tensor()});
    ctx->set_materialize_grads(false);
    return {call_backward(grad_output, scale)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(2);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &scale = saved[0], &grad_output = saved[1];
    at::Tensor grad_grad_output, grad_scale;
    if (ctx->needs_input_grad(0)) grad_grad_output = call_backward(grads[0], scale);
    if (ctx->needs_input_grad(1)) {
      grad_scale = (grads[0].to(scale.scalar_type()) * grad_output.to(scale.scalar_type()))
                       .sum(reduce_dims(grads[0].dim()));
    }
    return {grad_grad_output, grad_scale};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_act_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& var, double eps, int64_t activation,
    bool save_preact) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("frozennorm::frozen_bn_act", "")
                       .typed<decltype(call_act_forward)>();
  return op.call(input, residual, weight, bias, mean, var, eps, activation, save_preact);
}

std::tuple<at::Tensor, at::Tensor> call_act_backward(const at::Tensor& grad_output,
                                                     const at::Tensor& saved,
                                                     const at::Tensor& scale, int64_t activation,
                                                     bool residual_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("frozennorm::frozen_bn_act_backward", "")
                       .typed<decltype(call_act_backward)>();
  return op.call(grad_output, saved, scale, activation, residual_grad);
}

// The fused epilogue: gradients for the input and the residual. What is saved is what the
// unfused sequence would save: nothing of activation size for identity, the output for
// ReLU/ReLU6, the pre-activation for SiLU (the forward writes it only then).
class FrozenBNActFunction : public torch::autograd::Function<FrozenBNActFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& residual,
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
      const at::Tensor& mean, const at::Tensor& var, double eps, int64_t activation, bool) {
    TORCH_CHECK(!(requires_grad(weight) || requires_grad(bias) || mean.requires_grad() ||
                  var.requires_grad()),
                "frozen_bn_act differentiates the input and the residual only; for gradients of "
                "the statistics use frozen_bn followed by the activation");
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool silu = activation == static_cast<int64_t>(Activation::kSiLU);
    auto [out, scale, preact] =
        call_act_forward(input, residual, weight, bias, mean, var, eps, activation, silu);
    ctx->saved_data["activation"] = activation;
    const bool identity = activation == static_cast<int64_t>(Activation::kIdentity);
    ctx->save_for_backward({scale, identity ? at::Tensor() : (silu ? preact : out)});
    ctx->mark_non_differentiable({scale, preact});
    ctx->set_materialize_grads(false);  // no zeros for the gradients of scale and preact
    return {out, scale, preact};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t activation = ctx->saved_data["activation"].toInt();
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "frozen_bn_act does not support double backward; use frozen_bn followed by the "
                "activation where second derivatives are needed");
    variable_list out(9);
    if (!grads[0].defined()) return out;  // the output took no part in the loss
    const bool need_residual = ctx->needs_input_grad(1);
    if (activation == static_cast<int64_t>(Activation::kIdentity)) {
      if (ctx->needs_input_grad(0)) out[0] = call_backward(grads[0], saved[0]);
      if (need_residual) out[1] = grads[0];
      return out;
    }
    auto [grad_input, grad_residual] =
        call_act_backward(grads[0], saved[1], saved[0], activation, need_residual);
    out[0] = grad_input;
    if (need_residual) out[1] = grad_residual;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> frozen_bn_act_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
    int64_t activation, bool save_preact) {
  if (!at::GradMode::is_enabled() ||
      !(input.requires_grad() || requires_grad(residual) || requires_grad(weight) ||
        requires_grad(bias) || running_mean.requires_grad() || running_var.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;  // nothing to record
    return call_act_forward(input, residual, weight, bias, running_mean, running_var, eps,
                            activation, save_preact);
  }
  auto out = FrozenBNActFunction::apply(input, residual, weight, bias, running_mean, running_var,
                                        eps, activation, save_preact);
  return {out[0], out[1], out[2]};
}

// The fused backward is not itself differentiable: calling it on tensors that require grad
// under grad mode (a double backward through frozen_bn_act) says so.
std::tuple<at::Tensor, at::Tensor> frozen_bn_act_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& saved, const at::Tensor& scale,
    int64_t activation, bool residual_grad) {
  TORCH_CHECK(!at::GradMode::is_enabled() ||
                  !(grad_output.requires_grad() || saved.requires_grad() || scale.requires_grad()),
              "frozen_bn_act_backward is not differentiable (no double backward through the fused "
              "epilogue; use frozen_bn followed by the activation)");
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_act_backward(grad_output, saved, scale, activation, residual_grad);
}

std::tuple<at::Tensor, at::Tensor> frozen_bn_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double eps) {
  if (!at::GradMode::is_enabled() ||
      !(input.requires_grad() || requires_grad(weight) || requires_grad(bias) ||
        running_mean.requires_grad() || running_var.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;  // nothing to record
    return call_forward(input, weight, bias, running_mean, running_var, eps);
  }
  auto out = FrozenBNFunction::apply(input, weight, bias, running_mean, running_var, eps);
  return {out[0], out[1]};
}

at::Tensor frozen_bn_backward_autograd(const at::Tensor& grad_output, const at::Tensor& scale) {
  return FrozenBNBackwardFunction::apply(grad_output, scale)[0];
}

}  // namespace
}  // namespace frozennorm

TORCH_LIBRARY_IMPL(frozennorm, Autograd, m) {
  m.impl("frozen_bn", &frozennorm::frozen_bn_autograd);
  m.impl("frozen_bn_backward", &frozennorm::frozen_bn_backward_autograd);
  m.impl("frozen_bn_act", &frozennorm::frozen_bn_act_autograd);
  m.impl("frozen_bn_act_backward", &frozennorm::frozen_bn_act_backward_autograd);
}
