// Fused epilogues on CUDA: the Ops the PlanesKernel / RowsKernel of affine_kernels.cuh run
// for frozen_bn_act (frozen BN, optionally + residual, then an activation) and its backward.
// Every intermediate is rounded to the data dtype exactly where the unfused sequence
// frozen_bn -> add -> activation would store it, so the results are those of that sequence.
// The activations' math is rules.h's.
#pragma once

#include "../rules.h"
#include "affine_kernels.cuh"

namespace frozennorm::cuda {

// Two vectors of each of two tensors (input and residual; gradient and saved tensor) per
// thread and step; one for SiLU, whose exp and IEEE division per element make it bound by
// instructions, not bytes (and whose division's slow-path call would spill the registers
// more vectors hold).
template <Activation kAct>
constexpr int kActUnroll = kAct == Activation::kSiLU ? 1 : 2;

// out = act(round(round((in - mean) * scale + shift) + residual)); extra = the pre-activation.
// residual and extra may be null (uniform branches: one kernel for both cases).
template <typename scalar_t, typename acc_t_, Activation kAct>
struct ActForwardOp {
  using acc_t = acc_t_;
  static constexpr int kUnroll = kActUnroll<kAct>;
  const scalar_t* in;
  const scalar_t* residual;
  scalar_t* out;
  scalar_t* extra;

  template <int VEC>
  struct Regs {
    Pack<scalar_t, VEC> x, res, pre, y;
  };

  template <int VEC, typename index_t>
  FROZENNORM_HD void load(index_t i, Regs<VEC>& r) const {
    r.x = load_pack<scalar_t, VEC>(in + i);
    if (residual != nullptr) r.res = load_pack<scalar_t, VEC>(residual + i);
  }

  template <int VEC>
  FROZENNORM_HD void apply(Regs<VEC>& r, int j, const ChannelParams<acc_t>& p) const {
    scalar_t a = static_cast<scalar_t>(fma_rn(static_cast<acc_t>(r.x.v[j]) - p.mean, p.scale, p.shift));
    if (residual != nullptr) {
      a = static_cast<scalar_t>(static_cast<acc_t>(a) + static_cast<acc_t>(r.res.v[j]));
    }
    r.pre.v[j] = a;
    r.y.v[j] = static_cast<scalar_t>(act_forward<kAct, ScalarMath>(static_cast<acc_t>(a)));
  }

  template <int VEC, typename index_t>
  FROZENNORM_HD void store(index_t i, const Regs<VEC>& r) const {
    if (extra != nullptr) store_pack<scalar_t, VEC>(extra + i, r.pre);
    store_pack<scalar_t, VEC>(out + i, r.y);
  }
};

// ga = round(grad * act'(saved)); out = ga * scale; extra (may be null) = ga, the residual's
// gradient.
template <typename scalar_t, typename acc_t_, Activation kAct>
struct ActBackwardOp {
  using acc_t = acc_t_;
  static constexpr int kUnroll = kActUnroll<kAct>;
  const scalar_t* grad;
  const scalar_t* saved;
  scalar_t* out;
  scalar_t* extra;

  template <int VEC>
  struct Regs {
    Pack<scalar_t, VEC> g, s, gi, ga;
  };

  template <int VEC, typename index_t>
  FROZENNORM_HD void load(index_t i, Regs<VEC>& r) const {
    r.g = load_pack<scalar_t, VEC>(grad + i);
    r.s = load_pack<scalar_t, VEC>(saved + i);
  }

  template <int VEC>
  FROZENNORM_HD void apply(Regs<VEC>& r, int j, const ChannelParams<acc_t>& p) const {
    r.ga.v[j] = static_cast<scalar_t>(
        act_backward<kAct, ScalarMath>(static_cast<acc_t>(r.g.v[j]), static_cast<acc_t>(r.s.v[j])));
    r.gi.v[j] = static_cast<scalar_t>(static_cast<acc_t>(r.ga.v[j]) * p.scale);
  }

  template <int VEC, typename index_t>
  FROZENNORM_HD void store(index_t i, const Regs<VEC>& r) const {
    store_pack<scalar_t, VEC>(out + i, r.gi);
    if (extra != nullptr) store_pack<scalar_t, VEC>(extra + i, r.ga);
  }
};

}  // namespace frozennorm::cuda
