// Fused epilogues on CUDA: the Ops the PlanesKernel / RowsKernel of affine_kernels.cuh run
// for frozen_bn_act (frozen BN, optionally + residual, then an activation) and its backward.
// Every intermediate is rounded to the data dtype exactly where the unfused sequence
// frozen_bn -> add -> activation would store it, so the results are those of that sequence.
// The activations' math is rules.h's.
#pragma once

#include "../rules.h"
#include "affine_kernels.cuh"

namespace frozennorm::cuda {

// out = act(round(round((in - mean) * scale + shift) + residual)); extra = the pre-activation.
// residual and extra may be null (uniform branches: one kernel for both cases).
template <typename scalar_t, typename acc_t, Activation kAct>
struct ActForwardOp {
  const scalar_t* in;
  const scalar_t* residual;
  scalar_t* out;
  scalar_t* extra;

  template <int VEC>
  FN_HD FN_INLINE void operator()(int64_t i, const ChannelParams<acc_t> (&p)[VEC]) const {
    const Pack<scalar_t, VEC> x = load_pack<scalar_t, VEC>(in + i);
    Pack<scalar_t, VEC> a;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      a.v[j] = static_cast<scalar_t>(fma_rn(static_cast<acc_t>(x.v[j]) - p[j].mean, p[j].scale, p[j].shift));
    }
    if (residual != nullptr) {
      const Pack<scalar_t, VEC> r = load_pack<scalar_t, VEC>(residual + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        a.v[j] = static_cast<scalar_t>(static_cast<acc_t>(a.v[j]) + static_cast<acc_t>(r.v[j]));
      }
    }
    if (extra != nullptr) store_pack<scalar_t, VEC>(extra + i, a);
    Pack<scalar_t, VEC> y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      y.v[j] = static_cast<scalar_t>(act_forward<kAct, ScalarMath>(static_cast<acc_t>(a.v[j])));
    }
    store_pack<scalar_t, VEC>(out + i, y);
  }
};

// ga = round(grad * act'(saved)); out = ga * scale; extra (may be null) = ga, the residual's
// gradient.
template <typename scalar_t, typename acc_t, Activation kAct>
struct ActBackwardOp {
  const scalar_t* grad;
  const scalar_t* saved;
  scalar_t* out;
  scalar_t* extra;

  template <int VEC>
  FN_HD FN_INLINE void operator()(int64_t i, const ChannelParams<acc_t> (&p)[VEC]) const {
    const Pack<scalar_t, VEC> g = load_pack<scalar_t, VEC>(grad + i);
    const Pack<scalar_t, VEC> s = load_pack<scalar_t, VEC>(saved + i);
    Pack<scalar_t, VEC> gi, ga;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      ga.v[j] = static_cast<scalar_t>(
          act_backward<kAct, ScalarMath>(static_cast<acc_t>(g.v[j]), static_cast<acc_t>(s.v[j])));
      gi.v[j] = static_cast<scalar_t>(static_cast<acc_t>(ga.v[j]) * p[j].scale);
    }
    store_pack<scalar_t, VEC>(out + i, gi);
    if (extra != nullptr) store_pack<scalar_t, VEC>(extra + i, ga);
  }
};

}  // namespace frozennorm::cuda
