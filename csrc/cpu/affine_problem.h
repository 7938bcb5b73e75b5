// What the CPU front (frozen_bn_cpu.cpp) hands to the per-capability loops (affine_kernel.h).
#pragma once

#include <ATen/TensorIterator.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace frozennorm::cpu {

// A dense tensor (input and output with identical strides) seen as its flat memory: the
// channel of flat offset k is (k / inner) % C. Parameters are C-element arrays of the compute
// dtype; mean and shift are null for the backward (out = in * scale).
struct DenseProblem {
  const void* in;
  void* out;
  const void* mean;
  const void* scale;
  const void* shift;
  int64_t numel;
  int64_t C;
  int64_t inner;
  at::ScalarType data_type;
  at::ScalarType acc_type;
  bool stream;  // write the output with non-temporal stores (large outputs)
};

void affine_dense_default(const DenseProblem& p);
bool affine_dense_avx2(const DenseProblem& p);  // false if this build has no AVX2 code

// Any other layout, through a TensorIterator over (out, in, mean, scale, shift) or
// (out, in, scale), the parameters broadcast from shape [1, C, 1, ...].
void affine_iter_default(at::TensorIteratorBase& iter, bool with_shift);
bool affine_iter_avx2(at::TensorIteratorBase& iter, bool with_shift);

}  // namespace frozennorm::cpu
