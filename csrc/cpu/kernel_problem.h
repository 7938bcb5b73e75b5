// What the CPU fronts (frozen_bn_cpu.cpp, frozen_bn_act_cpu.cpp) hand to the loops that are
// compiled once per CPU capability (*_default.cpp, *_avx2.cpp).
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

// out = (in - mean) * scale + shift, or out = in * scale (mean == shift == null).
void affine_dense_default(const DenseProblem& p);
bool affine_dense_avx2(const DenseProblem& p);  // false if this build has no AVX2 code

// The same on any layout, through a TensorIterator over (out, in, mean, scale, shift) or
// (out, in, scale), the parameters broadcast from shape [1, C, 1, ...].
void affine_iter_default(at::TensorIteratorBase& iter, bool with_shift);
bool affine_iter_avx2(at::TensorIteratorBase& iter, bool with_shift);

// Fused epilogue forward: out = act(round(z) [+ residual]), z = (in - mean) * scale + shift,
// every intermediate rounded to the data dtype as the unfused ops would; `extra`, if set,
// receives the pre-activation.
void act_forward_dense_default(const DenseProblem& p);
bool act_forward_dense_avx2(const DenseProblem& p);

// Fused epilogue backward: ga = grad_output * act'(saved), rounded to the data dtype;
// out = ga * scale, and `extra`, if set, receives ga (the residual's gradient).
void act_backward_dense_default(const DenseProblem& p);
bool act_backward_dense_avx2(const DenseProblem& p);

}  // namespace frozennorm::cpu
