// The host side of the four ops up to their loops, one for every device: the argument
// checks, the compute dtype, the layouts the loops need, the outputs, the identity
// shortcuts. A device supplies only its loops, as a type with four methods:
//
//   at::Tensor forward(const Forward&)           // fills out (and preact), returns the scale
//   void backward(const Backward&)               // fills grad_input (and grad_residual)
//   at::Tensor act_forward(const Forward&)       // the same for the fused epilogues
//   void act_backward(const Backward&)
//   void affine_backward(const Backward&)       // also fills sum_grad and sum_centered
//
// (CPU: cpu/frozen_bn_cpu.cpp; CUDA and its emulation in the tests: cuda/frozen_bn_cuda_impl.h.)
// The loops must accept empty tensors: a forward still returns every channel's scale.
#pragma once

#include "frozen_bn.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <tuple>

namespace frozennorm {

// What a forward's loops get: out = act(round((input - mean) * scale + shift) [+ residual]).
struct Forward {
  Stats stats;           // checked, one dtype, contiguous
  double eps;
  at::ScalarType acc;    // compute_dtype()
  at::Tensor input;      // frozen_bn: any layout; the fused op: dense
  at::Tensor out;        // empty, in the input's layout
  // the fused op only:
  Activation act = Activation::kIdentity;
  at::Tensor residual;   // undefined, or dense in the input's layout
  at::Tensor preact;     // undefined, or empty in the input's layout (SiLU's saved tensor)
};

// What a backward's loops get: ga = act'(saved) * grad, rounded to the data dtype;
// grad_input = ga * scale, grad_residual = ga. The affine backward also sums, per channel,
// ga into sum_grad and ga * (input - mean) into sum_centered.
struct Backward {
  at::Tensor grad;        // frozen_bn_backward: any layout; the fused ops: in saved's layout
                          // (the affine backward: in input's)
  at::Tensor scale;       // in the compute dtype, contiguous
  at::ScalarType acc;
  at::Tensor grad_input;  // empty, in grad's layout (the affine backward: undefined if unwanted)
  // the fused ops only:
  Activation act = Activation::kIdentity;
  at::Tensor saved;          // dense: the forward's output (ReLU/ReLU6) or pre-activation (SiLU);
                             // undefined for the identity
  at::Tensor grad_residual;  // undefined, or empty in saved's layout
  // the affine backward only:
  at::Tensor input;         // dense: the forward's input
  at::Tensor mean;          // in the compute dtype, contiguous
  at::Tensor sum_grad;      // C values of the compute dtype, to fill
  at::Tensor sum_centered;  // the same
};

// The checked statistics and the compute dtype of a forward (both ops).
inline Forward checked_forward(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const at::Tensor& running_mean, const at::Tensor& running_var,
                               double eps) {
  Forward f{check_forward_args(input, weight, bias, running_mean, running_var), eps};
  f.acc = compute_dtype(input.scalar_type(), f.stats.mean.scalar_type());
  return f;
}

// frozen_bn's loops on a checked forward (also the fused op's, without activation and
// residual).
template <typename Loops>
std::tuple<at::Tensor, at::Tensor> run_forward(Loops& loops, Forward& f, const at::Tensor& input) {
  f.input = input;
  f.out = at::empty_like(input);
  at::Tensor scale = loops.forward(f);
  return {f.out, scale};
}

// The compute dtype and the scale in it, for a backward whose arguments were checked.
inline Backward checked_backward(const at::Tensor& grad_output, const at::Tensor& scale) {
  Backward b;
  b.acc = compute_dtype(grad_output.scalar_type(), scale.scalar_type());
  b.scale = scale.to(b.acc).contiguous();
  return b;
}

// frozen_bn_backward's loops on a checked backward (also the fused op's without activation).
template <typename Loops>
at::Tensor run_backward(Loops& loops, Backward& b, const at::Tensor& grad_output) {
  b.grad = grad_output;
  b.grad_input = at::empty_like(grad_output);
  loops.backward(b);
  return b.grad_input;
}

template <typename Loops>
std::tuple<at::Tensor, at::Tensor> frozen_bn_front(
    Loops& loops, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double eps) {
  Forward f = checked_forward(input, weight, bias, running_mean, running_var, eps);
  return run_forward(loops, f, input);
}

template <typename Loops>
at::Tensor frozen_bn_backward_front(Loops& loops, const at::Tensor& grad_output,
                                    const at::Tensor& scale) {
  check_backward_args(grad_output, scale);
  Backward b = checked_backward(grad_output, scale);
  return run_backward(loops, b, grad_output);
}

template <typename Loops>
std::tuple<at::Tensor, at::Tensor, at::Tensor> frozen_bn_act_front(
    Loops& loops, const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
    int64_t activation, bool save_preact) {
  Forward f = checked_forward(input, weight, bias, running_mean, running_var, eps);
  check_act_args(input, residual, activation);
  const bool has_residual = residual.has_value() && residual->defined();
  f.act = static_cast<Activation>(activation);
  if (f.act == Activation::kIdentity && !has_residual) {
    auto [out, scale] = run_forward(loops, f, input);
    return {out, scale, at::empty({0}, out.options())};
  }
  // The fused loops need dense data, the residual in the same layout (normally free).
  f.input = dense(input);
  f.out = at::empty_like(f.input);
  if (has_residual) f.residual = in_layout_of(*residual, f.input);
  if (save_preact && f.act == Activation::kSiLU) f.preact = at::empty_like(f.input);
  at::Tensor scale = loops.act_forward(f);
  return {f.out, scale, f.preact.defined() ? f.preact : at::empty({0}, f.input.options())};
}

template <typename Loops>
std::tuple<at::Tensor, at::Tensor> frozen_bn_act_backward_front(
    Loops& loops, const at::Tensor& grad_output, const at::Tensor& saved,
    const at::Tensor& scale, int64_t activation, bool residual_grad) {
  check_act_backward_args(grad_output, saved, scale, activation);
  Backward b = checked_backward(grad_output, scale);
  b.act = static_cast<Activation>(activation);
  if (b.act == Activation::kIdentity) {  // the residual's gradient is grad_output itself
    return {run_backward(loops, b, grad_output),
            residual_grad ? grad_output.clone() : at::empty({0}, grad_output.options())};
  }
  // Everything in the layout of the saved tensor (the forward's output or pre-activation).
  b.saved = dense(saved);
  b.grad = in_layout_of(grad_output, b.saved);
  b.grad_input = at::empty_like(b.saved);
  if (residual_grad) b.grad_residual = at::empty_like(b.saved);
  loops.act_backward(b);
  return {b.grad_input,
          residual_grad ? b.grad_residual : at::empty({0}, b.saved.options())};
}

// Outputs in the dense layout of the input (itself if dense, else contiguous), grad_output
// and saved brought to it; zero sums for an empty input.
template <typename Loops>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> frozen_bn_affine_backward_front(
    Loops& loops, const at::Tensor& grad_output, const at::Tensor& input,
    const std::optional<at::Tensor>& saved, const at::Tensor& running_mean,
    const at::Tensor& scale, int64_t activation, bool input_grad, bool residual_grad) {
  check_affine_backward_args(grad_output, input, saved, running_mean, scale, activation);
  Backward b = checked_backward(grad_output, scale);
  b.act = static_cast<Activation>(activation);
  b.input = dense(input);
  b.grad = in_layout_of(grad_output, b.input);
  if (b.act != Activation::kIdentity) b.saved = in_layout_of(*saved, b.input);
  b.mean = running_mean.to(b.acc).contiguous();
  if (input_grad) b.grad_input = at::empty_like(b.input);
  if (residual_grad) b.grad_residual = at::empty_like(b.input);
  const auto sums = b.input.options().dtype(b.acc);
  const int64_t C = b.input.size(1);
  if (b.input.numel() == 0) {
    b.sum_grad = at::zeros({C}, sums);
    b.sum_centered = at::zeros({C}, sums);
  } else {
    b.sum_grad = at::empty({C}, sums);
    b.sum_centered = at::empty({C}, sums);
    loops.affine_backward(b);
  }
  auto none = [&] { return at::empty({0}, b.input.options()); };  // (outputs never alias)
  return {input_grad ? b.grad_input : none(), residual_grad ? b.grad_residual : none(),
          b.sum_grad, b.sum_centered};
}

}  // namespace frozennorm
