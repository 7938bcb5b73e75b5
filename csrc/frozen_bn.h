// Shared declarations of the frozennorm ops' host side: argument checks and layout helpers
// used by every backend (CPU, CUDA, and the CUDA emulation used in tests); the rules
// themselves (compute dtype, activations) are in rules.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include "rules.h"

#include <optional>

namespace frozennorm {

// The four statistics of a frozen BatchNorm, validated against the input and converted to
// one common floating dtype, contiguous. `weight`/`bias` are undefined when absent.
struct Stats {
  at::Tensor weight;
  at::Tensor bias;
  at::Tensor mean;
  at::Tensor var;
};

// Checks the arguments of frozen_bn (rank, dtype, device, statistic lengths) with errors
// that name the problem, and returns the statistics ready for a kernel.
Stats check_forward_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var);

// Checks what frozen_bn_act adds to frozen_bn's arguments: the residual (same shape, dtype
// and device as the input) and the activation code.
void check_act_args(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                    int64_t activation);

// Checks the arguments of frozen_bn_act_backward.
void check_act_backward_args(const at::Tensor& grad_output, const at::Tensor& saved,
                             const at::Tensor& scale, int64_t activation);

// Checks the arguments of frozen_bn_backward (errors named after `op`, the op checked).
void check_backward_args(const at::Tensor& grad_output, const at::Tensor& scale,
                         const char* op = "frozen_bn_backward");

// Checks the arguments of frozen_bn_affine_backward: frozen_bn_backward's, input and saved
// (saved optional for the identity) like grad_output, running_mean one value per channel.
void check_affine_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                const std::optional<at::Tensor>& saved,
                                const at::Tensor& running_mean, const at::Tensor& scale,
                                int64_t activation);

// Is t dense (non-overlapping, no gaps) with exactly like's strides?
bool is_dense_like(const at::Tensor& t, const at::Tensor& like);

// t itself if it is dense with like's strides, else a copy in like's layout.
at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like);

// t itself if it is dense, else a contiguous copy.
at::Tensor dense(const at::Tensor& t);

// Shape [1, C, 1, ...] of the input's rank, to broadcast a per-channel vector.
std::vector<int64_t> channel_shape(const at::Tensor& input);

}  // namespace frozennorm
