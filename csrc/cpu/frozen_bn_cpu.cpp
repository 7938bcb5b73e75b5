// CPU implementation of frozennorm::frozen_bn and frozennorm::frozen_bn_backward.
#include "../frozen_bn.h"
#include "affine_problem.h"

#include <ATen/Dispatch.h>
#include <ATen/TensorIterator.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

namespace frozennorm::cpu {
namespace {

// Outputs at least this large are written with non-temporal stores: they will not fit in
// the cache anyway, and streaming them avoids reading each output line before writing it.
constexpr int64_t kStreamBytes = 16 << 20;

// AVX2 when the CPU has it, unless ATEN_CPU_CAPABILITY=default asks for the baseline (the
// same switch ATen's own kernels honour).
bool use_avx2() {
  static const bool avx2 = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    if (env != nullptr && std::strcmp(env, "default") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c");
#else
    return false;
#endif
  }();
  return avx2;
}

// A C-element vector of the compute dtype, converted only if it is not one already.
at::Tensor as_compute(const at::Tensor& t, at::ScalarType acc) {
  return t.scalar_type() == acc ? t : t.to(acc);
}

// out = in (op) per-channel parameters (mean/shift undefined for the backward's in * scale).
void run_affine(const at::Tensor& out, const at::Tensor& in, const at::Tensor& mean,
                const at::Tensor& scale, const at::Tensor& shift) {
  const int64_t numel = in.numel();
  if (numel == 0) return;
  const int64_t C = in.size(1);
  const bool with_shift = mean.defined();
  if (in.is_non_overlapping_and_dense() && in.strides() == out.strides()) {
    // In a dense tensor the channel of memory offset k is (k / stride(1)) % C.
    const DenseProblem p{
        in.const_data_ptr(), out.mutable_data_ptr(),
        with_shift ? mean.const_data_ptr() : nullptr, scale.const_data_ptr(),
        with_shift ? shift.const_data_ptr() : nullptr,
        numel, C, C == 1 ? numel : in.stride(1), in.scalar_type(), scale.scalar_type(),
        numel * static_cast<int64_t>(in.element_size()) >= kStreamBytes};
    if (!(use_avx2() && affine_dense_avx2(p))) affine_dense_default(p);
    return;
  }
  const auto shape = channel_shape(in);
  at::TensorIteratorConfig config;
  config.check_all_same_dtype(false).add_output(out).add_const_input(in);
  const at::Tensor views[3] = {with_shift ? mean.view(shape) : at::Tensor(), scale.view(shape),
                               with_shift ? shift.view(shape) : at::Tensor()};
  for (const auto& v : views) {
    if (v.defined()) config.add_const_input(v);
  }
  auto iter = config.build();
  if (!(use_avx2() && affine_iter_avx2(iter, with_shift))) affine_iter_default(iter, with_shift);
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

}  // namespace
}  // namespace frozennorm::cpu

TORCH_LIBRARY_IMPL(frozennorm, CPU, m) {
  m.impl("frozen_bn", &frozennorm::cpu::frozen_bn_cpu);
  m.impl("frozen_bn_backward", &frozennorm::cpu::frozen_bn_backward_cpu);
}
