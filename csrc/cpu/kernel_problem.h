// What the CPU front (frozen_bn_cpu.cpp) hands to the loops that are compiled once per CPU
// capability (*_kernel.cpp, chosen at run time: dispatch.h).
#pragma once

#include "../frozen_bn.h"

#include <ATen/TensorIterator.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace frozennorm::cpu {

using frozennorm::Activation;

// Dense tensors with identical strides, seen as their flat memory: the channel of flat
// offset k is (k / inner) % C. Parameters are C-element arrays of the compute dtype.
// Outputs (out, extra) never alias the inputs: the loops may write an element twice.
struct DenseProblem {
  const void* in;     // forward: the input; backward: grad_output
  void* out;          // forward: the output; backward: grad_input
  const void* mean;   // null for the backward
  const void* scale;
  const void* shift;  // null for the backward
  int64_t numel;
  int64_t C;
  int64_t inner;
  at::ScalarType data_type;
  at::ScalarType acc_type;
  bool stream;  // write the outputs with non-temporal stores (large outputs)
  // Fused epilogues only:
  Activation act = Activation::kIdentity;
  const void* residual = nullptr;  // forward: added before the activation
  const void* saved = nullptr;     // backward: the output (ReLU/ReLU6) or pre-activation (SiLU)
  void* extra = nullptr;           // forward: the pre-activation to save (SiLU);
                                   // backward: the gradient of the residual
};

// The backward when the affine parameters (or the statistics) train, over dense tensors with
// identical strides seen as DenseProblem's flat memory [outer, C, inner]:
//   ga = grad * act'(saved), rounded to the data dtype (ga = grad for the identity),
//   grad_input = ga * scale and grad_residual = ga (each only where not null),
//   sum_grad[c] = sum of ga, sum_centered[c] = sum of ga * (input - mean[c]) over channel c.
// mean and scale are C values of the compute dtype, the sums C values of it to fill.
struct AffineBackwardProblem {
  const void* grad;
  const void* input;
  const void* saved;  // null for the identity
  const void* mean;
  const void* scale;
  void* grad_input;     // may be null
  void* grad_residual;  // may be null
  void* sum_grad;
  void* sum_centered;
  int64_t numel;
  int64_t C;
  int64_t inner;
  at::ScalarType data_type;
  at::ScalarType acc_type;
  Activation act;
};

}  // namespace frozennorm::cpu
