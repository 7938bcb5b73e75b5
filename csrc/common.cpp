// Argument checks and layout helpers shared by every backend of the frozennorm ops.
#include "frozen_bn.h"

#include <ATen/ops/empty_like.h>

namespace frozennorm {

namespace {

bool is_supported_floating(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void check_stat(const at::Tensor& t, const char* name, const at::Tensor& input, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(
      t.device() == input.device(), op, ": ", name, " is on ", t.device(),
      " but the input is on ", input.device(), "; move the statistics to the input's device");
  TORCH_CHECK(
      is_supported_floating(t.scalar_type()), op, ": ", name,
      " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
      t.scalar_type());
  TORCH_CHECK(
      t.dim() == 1 && t.size(0) == input.size(1), op, ": ", name,
      " must be a 1-D tensor with one value per channel (", input.size(1),
      " channels, input.shape[1]), got shape ", t.sizes());
}

void check_data(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(
      t.dim() >= 2, op, ": expected ", name, " of shape (N, C, *) with at least 2 dimensions, got a ",
      t.dim(), "-D tensor of shape ", t.sizes());
  TORCH_CHECK(
      is_supported_floating(t.scalar_type()), op, ": ", name,
      " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

void check_activation(int64_t activation, const char* op) {
  TORCH_CHECK(activation >= 0 && activation <= static_cast<int64_t>(Activation::kSiLU), op,
              ": activation must be 0 (identity), 1 (relu), 2 (relu6) or 3 (silu), got ",
              activation);
}

}  // namespace

Stats check_forward_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var) {
  constexpr const char* op = "frozen_bn";
  check_data(input, "input", op);
  Stats s;
  s.mean = running_mean;
  s.var = running_var;
  check_stat(s.mean, "running_mean", input, op);
  check_stat(s.var, "running_var", input, op);
  if (weight.has_value() && weight->defined()) {
    s.weight = *weight;
    check_stat(s.weight, "weight", input, op);
  }
  if (bias.has_value() && bias->defined()) {
    s.bias = *bias;
    check_stat(s.bias, "bias", input, op);
  }
  // One dtype for all statistics: they normally share one already (this is then free).
  at::ScalarType common = c10::promoteTypes(s.mean.scalar_type(), s.var.scalar_type());
  if (s.weight.defined()) common = c10::promoteTypes(common, s.weight.scalar_type());
  if (s.bias.defined()) common = c10::promoteTypes(common, s.bias.scalar_type());
  for (at::Tensor* t : {&s.weight, &s.bias, &s.mean, &s.var}) {
    if (!t->defined()) continue;
    if (t->scalar_type() != common) *t = t->to(common);
    if (!t->is_contiguous()) *t = t->contiguous();
  }
  return s;
}

void check_backward_args(const at::Tensor& grad_output, const at::Tensor& scale, const char* op) {
  check_data(grad_output, "grad_output", op);
  TORCH_CHECK(scale.defined(), op, ": scale is an undefined tensor");
  TORCH_CHECK(
      scale.device() == grad_output.device(), op, ": scale is on ", scale.device(),
      " but grad_output is on ", grad_output.device());
  TORCH_CHECK(
      scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble, op,
      ": scale must be float32 or float64 (the per-channel scale frozen_bn returns), got ",
      scale.scalar_type());
  TORCH_CHECK(
      scale.dim() == 1 && scale.size(0) == grad_output.size(1), op,
      ": scale must be a 1-D tensor with one value per channel (", grad_output.size(1),
      " channels), got shape ", scale.sizes());
}

void check_act_args(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                    int64_t activation) {
  constexpr const char* op = "frozen_bn_act";
  check_activation(activation, op);
  if (!residual.has_value() || !residual->defined()) return;
  const at::Tensor& r = *residual;
  TORCH_CHECK(r.device() == input.device(), op, ": residual is on ", r.device(),
              " but the input is on ", input.device());
  TORCH_CHECK(r.scalar_type() == input.scalar_type(), op, ": residual must have the input's dtype ",
              input.scalar_type(), ", got ", r.scalar_type());
  TORCH_CHECK(r.sizes() == input.sizes(), op, ": residual must have the input's shape ",
              input.sizes(), ", got ", r.sizes());
}

void check_act_backward_args(const at::Tensor& grad_output, const at::Tensor& saved,
                             const at::Tensor& scale, int64_t activation) {
  constexpr const char* op = "frozen_bn_act_backward";
  check_backward_args(grad_output, scale);
  TORCH_CHECK(activation >= 0 && activation <= static_cast<int64_t>(Activation::kSiLU), op,
              ": activation must be 0..3, got ", activation);
  if (activation == static_cast<int64_t>(Activation::kIdentity)) return;
  TORCH_CHECK(saved.device() == grad_output.device() && saved.scalar_type() == grad_output.scalar_type() &&
                  saved.sizes() == grad_output.sizes(),
              op, ": saved must be the forward's output (ReLU/ReLU6) or pre-activation (SiLU), "
              "with grad_output's shape, dtype and device; got ", saved.sizes(), " ", saved.scalar_type(),
              " on ", saved.device());
}

void check_affine_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                const std::optional<at::Tensor>& saved,
                                const at::Tensor& running_mean, const at::Tensor& scale,
                                int64_t activation) {
  constexpr const char* op = "frozen_bn_affine_backward";
  check_backward_args(grad_output, scale, op);
  check_activation(activation, op);
  const bool has_saved = saved.has_value() && saved->defined();
  auto like_grad = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
    TORCH_CHECK(t.sizes() == grad_output.sizes() && t.scalar_type() == grad_output.scalar_type() &&
                    t.device() == grad_output.device(),
                op, ": ", name, " must have grad_output's shape ", grad_output.sizes(), ", dtype ",
                grad_output.scalar_type(), " and device ", grad_output.device(), "; got ",
                t.sizes(), " ", t.scalar_type(), " on ", t.device());
  };
  like_grad(input, "input");
  if (has_saved) like_grad(*saved, "saved");
  TORCH_CHECK(has_saved || activation == static_cast<int64_t>(Activation::kIdentity), op,
              ": saved (the forward's output, or pre-activation for SiLU) is needed for "
              "activation ", activation);
  check_stat(running_mean, "running_mean", grad_output, op);
}

bool is_dense_like(const at::Tensor& t, const at::Tensor& like) {
  return t.is_non_overlapping_and_dense() && t.strides() == like.strides();
}

at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  return is_dense_like(t, like) ? t : at::empty_like(like).copy_(t);
}

at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

std::vector<int64_t> channel_shape(const at::Tensor& input) {
  std::vector<int64_t> shape(input.dim(), 1);
  shape[1] = input.size(1);
  return shape;
}

}  // namespace frozennorm

