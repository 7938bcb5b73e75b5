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

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>

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

bool defined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// A Function's needs_input_grad takes autograd edges, which skip the absent optional
// tensors (and the non-tensor arguments): the forward records each argument's edge (-1:
// none), and needs_grad asks by argument position.
void record_edges(AutogradContext* ctx, std::initializer_list<bool> is_tensor) {
  std::vector<int64_t> edges;
  int64_t next = 0;
  for (const bool t : is_tensor) edges.push_back(t ? next++ : -1);
  ctx->saved_data["edges"] = edges;
}

bool needs_grad(AutogradContext* ctx, size_t argument) {
  const int64_t edge = ctx->saved_data["edges"].toIntList()[argument];
  return edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(edge));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_affine_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& saved,
    const at::Tensor& mean, const at::Tensor& scale, int64_t activation, bool input_grad,
    bool residual_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("frozennorm::frozen_bn_affine_backward", "")
                       .typed<decltype(call_affine_backward)>();
  return op.call(grad_output, input, saved, mean, scale, activation, input_grad, residual_grad);
}

// 1 / sqrt(var + eps) in acc, differentiable. eps goes in as a 0-dim CPU tensor of dtype acc
// (a scalar operand on any device): a double would be wrapped and cast on every call.
at::Tensor invstd_of(const at::Tensor& var, double eps, at::ScalarType acc) {
  const at::Tensor v = var.to(acc);
  return at::rsqrt(v + at::scalar_tensor(eps, at::TensorOptions().dtype(acc)));
}

// Whether this code may read and write t's data itself, past the dispatcher: a strided CPU
// tensor with nothing in front of its kernel but autograd (not a fake, functional, batched
// or grad-transform tensor), and no Python dispatch mode active (make_fx, FakeTensorMode,
// FlopCounterMode, ...: they must see the ops, or a traced graph would hold their results
// as constants).
bool direct_cpu(const at::Tensor& t) {
  static const c10::DispatchKeySet plain({c10::DispatchKey::CPU, c10::DispatchKey::AutogradCPU,
                                          c10::DispatchKey::ADInplaceOrView,
                                          c10::DispatchKey::AutocastCPU});
  return t.is_cpu() && t.layout() == at::kStrided && plain.isSupersetOf(t.key_set()) &&
      !c10::impl::dispatch_mode_enabled();
}

// The statistics a backward keeps: the running mean, or a copy of it where it does not
// require grad, and var where it requires grad, else invstd_of(var). Where neither requires
// grad and both are plain CPU tensors, one loop writes the copy and invstd (in acc, the same
// values, checked bit for bit): the clone, add and rsqrt it replaces took 12-35 us of a
// forward + backward of 1x256x56x56, whose frozen op takes 120-220 us (interleaved, at
// b012384).
std::pair<at::Tensor, at::Tensor> kept_statistics(const at::Tensor& mean, const at::Tensor& var,
                                                  double eps, at::ScalarType acc) {
  if (mean.requires_grad() || var.requires_grad() || !direct_cpu(mean) || !direct_cpu(var)) {
    return {mean.requires_grad() ? mean : mean.detach().clone(),
            var.requires_grad() ? var : invstd_of(var.detach(), eps, acc)};
  }
  const at::Tensor m = mean.to(acc).contiguous(), v = var.to(acc).contiguous();
  at::Tensor mean_copy = at::empty_like(m), invstd = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(acc, "kept_statistics", [&] {
    const scalar_t* from_mean = m.const_data_ptr<scalar_t>();
    const scalar_t* from_var = v.const_data_ptr<scalar_t>();
    scalar_t* to_mean = mean_copy.mutable_data_ptr<scalar_t>();
    scalar_t* to_invstd = invstd.mutable_data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eps);
    // the count hoisted: numel() in the condition is reread after every store, which kept
    // the loops scalar
    const int64_t n = m.numel();
    std::copy(from_mean, from_mean + n, to_mean);
    for (int64_t c = 0; c < n; ++c) to_invstd[c] = scalar_t(1) / std::sqrt(from_var[c] + e);
  });
  return {mean_copy, invstd};
}

// When statistics require grad (trainable affine parameters, or functional use), a backward
// needs the forward's input and the statistics too. Saved as
// {scale, saved, input, weight, mean, var or invstd} (saved: the activation's tensor, or
// undefined). The running mean is saved as a copy unless it requires grad itself: DDP
// overwrites module buffers in place between forwards, which would fail the backward. The
// variance is needed only as 1 / sqrt(var + eps), computed here (a new tensor, no copy)
// unless var requires grad: then var itself, and the backward differentiates that formula
// (kept_statistics).
bool save_statistics(AutogradContext* ctx, const at::Tensor& scale, const at::Tensor& saved,
                     const at::Tensor& input, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                     const at::Tensor& var, double eps) {
  const bool stats_grad = requires_grad(weight) || requires_grad(bias) || mean.requires_grad() ||
      var.requires_grad();
  ctx->saved_data["stats_grad"] = stats_grad;
  if (stats_grad) {
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["bias_dtype"] =
        bias.has_value() && bias->defined() ? bias->scalar_type() : at::kFloat;
    ctx->saved_data["var_dtype"] = var.scalar_type();
    auto [kept_mean, kept_var] = kept_statistics(mean, var, eps, scale.scalar_type());
    ctx->save_for_backward({scale, saved, input, weight.has_value() ? *weight : at::Tensor(),
                            kept_mean, kept_var});
  } else {
    ctx->save_for_backward({scale, saved});
  }
  return stats_grad;
}

// 1 / sqrt(var + eps) from what save_statistics kept (the last saved tensor).
at::Tensor saved_invstd(AutogradContext* ctx, const at::Tensor& kept, at::ScalarType acc) {
  if (!kept.requires_grad()) return kept;
  return invstd_of(kept, ctx->saved_data["eps"].toDouble(), acc);
}

// The gradients of weight, bias, running_mean, running_var (into out[first..first + 3],
// where ctx needs them) from the per-channel sums of the BatchNorm output's gradient g and
// of g * (input - mean): d/dweight = sum(g (x - m)) / sqrt(v + eps), d/dbias = sum(g),
// d/dmean = -sum(g) * scale, d/dvar = -sum(g (x - m)) * scale / (2 (v + eps)).
void statistics_grads(AutogradContext* ctx, variable_list& out, size_t first,
                      const at::Tensor& sum_grad, const at::Tensor& sum_centered,
                      const at::Tensor& scale, const at::Tensor& invstd, const at::Tensor& weight,
                      const at::Tensor& mean) {
  if (needs_grad(ctx, first)) {
    // On the CPU, outside a double backward, the kernel's sums (a new tensor) are scaled in
    // place where nothing else reads them (the mul it replaces: 5-19 us of the forward +
    // backward that kept_statistics measures)
    if (!at::GradMode::is_enabled() && direct_cpu(sum_centered) && direct_cpu(invstd) &&
        !needs_grad(ctx, first + 3) &&
        weight.scalar_type() == sum_centered.scalar_type() &&
        invstd.scalar_type() == sum_centered.scalar_type() && invstd.is_contiguous() &&
        sum_centered.is_contiguous()) {
      at::Tensor grad_weight = sum_centered;
      AT_DISPATCH_FLOATING_TYPES(grad_weight.scalar_type(), "grad_weight", [&] {
        scalar_t* to = grad_weight.mutable_data_ptr<scalar_t>();
        const scalar_t* factor = invstd.const_data_ptr<scalar_t>();
        const int64_t n = grad_weight.numel();  // hoisted, as in kept_statistics
        for (int64_t c = 0; c < n; ++c) to[c] *= factor[c];
      });
      out[first] = grad_weight;
    } else {
      out[first] = (sum_centered * invstd).to(weight.scalar_type());
    }
  }
  if (needs_grad(ctx, first + 1)) {
    out[first + 1] = sum_grad.to(ctx->saved_data["bias_dtype"].toScalarType());
  }
  if (needs_grad(ctx, first + 2)) out[first + 2] = (-sum_grad * scale).to(mean.scalar_type());
  if (needs_grad(ctx, first + 3)) {
    out[first + 3] = (sum_centered * scale * invstd * invstd * -0.5)
                         .to(ctx->saved_data["var_dtype"].toScalarType());
  }
}

class FrozenBNFunction : public torch::autograd::Function<FrozenBNFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
      double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, scale] = call_forward(input, weight, bias, mean, var, eps);
    if (save_statistics(ctx, scale, at::Tensor(), input, weight, bias, mean, var, eps)) {
      record_edges(ctx, {true, defined(weight), defined(bias), true, true, false});
    }
    // scale is not differentiable: frozen_bn_autograd returns it detached (marking it so
    // here would break compiled autograd, whose CppNode asserts nothing was marked)
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
    const at::Tensor &forward_scale = saved[0], &input = saved[2], &weight = saved[3],
                     &mean = saved[4];
    const at::ScalarType acc = forward_scale.scalar_type();
    const at::Tensor invstd = saved_invstd(ctx, saved[5], acc);
    variable_list out(6);
    if (!at::GradMode::is_enabled()) {  // one fused pass
      auto [grad_input, unused, sum_grad, sum_centered] = call_affine_backward(
          grad, input, std::nullopt, mean, forward_scale,
          static_cast<int64_t>(Activation::kIdentity), need_input, false);
      if (need_input) out[0] = grad_input;
      statistics_grads(ctx, out, 1, sum_grad, sum_centered, forward_scale, invstd, weight, mean);
      return out;
    }
    // A double backward: differentiable ATen formulas. One rule for the scale: the forward
    // kernel's, whichever statistics require grad, with the derivative of ATen's
    // weight * invstd, whose value may differ from the kernel's by an ulp: that difference
    // is exact (Sterbenz), so adding it back gives the kernel's value bit for bit.
    const at::Tensor formula = weight.defined() ? weight.to(acc) * invstd : invstd;
    const at::Tensor scale = formula + (forward_scale - formula.detach());
    if (need_input) out[0] = call_backward(grad, scale);
    const auto dims = reduce_dims(input.dim());
    const at::Tensor g = grad.to(acc);
    const at::Tensor sum_grad = g.sum(dims);
    const at::Tensor sum_centered =
        (g * (input.to(acc) - mean.to(acc).view(channel_shape(input)))).sum(dims);
    statistics_grads(ctx, out, 1, sum_grad, sum_centered, scale, invstd, weight, mean);
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

// The fused epilogue: gradients for the input and the residual (and, when they require
// grad, the statistics). What is saved is what the unfused sequence would save: nothing of
// activation size for identity, the output for ReLU/ReLU6, the pre-activation for SiLU (the
// forward writes it only then), and the input when statistics require grad.
class FrozenBNActFunction : public torch::autograd::Function<FrozenBNActFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& residual,
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
      const at::Tensor& mean, const at::Tensor& var, double eps, int64_t activation, bool) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool silu = activation == static_cast<int64_t>(Activation::kSiLU);
    auto [out, scale, preact] =
        call_act_forward(input, residual, weight, bias, mean, var, eps, activation, silu);
    ctx->saved_data["activation"] = activation;
    const bool identity = activation == static_cast<int64_t>(Activation::kIdentity);
    save_statistics(ctx, scale, identity ? at::Tensor() : (silu ? preact : out), input, weight,
                    bias, mean, var, eps);
    record_edges(ctx, {true, defined(residual), defined(weight), defined(bias), true, true, false,
                       false, false});
    // scale and preact: returned detached (as FrozenBNFunction's scale)
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
    const bool need_input = ctx->needs_input_grad(0), need_residual = needs_grad(ctx, 1);
    if (ctx->saved_data["stats_grad"].toBool()) {
      const at::Tensor &scale = saved[0], &input = saved[2], &weight = saved[3],
                       &mean = saved[4];
      const std::optional<at::Tensor> act_saved =
          saved[1].defined() ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
      auto [grad_input, grad_residual, sum_grad, sum_centered] = call_affine_backward(
          grads[0], input, act_saved, mean, scale, activation, need_input, need_residual);
      if (need_input) out[0] = grad_input;
      if (need_residual) out[1] = grad_residual;
      const at::Tensor invstd = saved_invstd(ctx, saved[5], scale.scalar_type());
      statistics_grads(ctx, out, 2, sum_grad, sum_centered, scale, invstd, weight, mean);
      return out;
    }
    if (activation == static_cast<int64_t>(Activation::kIdentity)) {
      if (need_input) out[0] = call_backward(grads[0], saved[0]);
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
  return {out[0], out[1].detach(), out[2].detach()};
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
  return {out[0], out[1].detach()};
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
