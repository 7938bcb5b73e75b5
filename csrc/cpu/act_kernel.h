// Fused epilogues on the CPU (per capability; see channel_walk.h): frozen BN, optionally a
// residual added, then an activation, in one pass forward and one pass backward. Every
// intermediate is rounded to the data dtype exactly where the unfused sequence
// frozen_bn -> add -> activation would store it, so the results are those of that sequence.
#pragma once

#include "channel_walk.h"

#include <ATen/Dispatch.h>

namespace frozennorm::cpu {
namespace CPU_CAPABILITY {

// rules.h's M for this build's loops: at::vec vectors (the clamps as max/min instructions: a
// compare and blend in their place made the bfloat16 ReLU/ReLU6 forward 1.4-1.8x slower), and
// float/double for the scalar tails, as ScalarMath. (All of it always inlined: no function
// compiled with this build's instructions is shared with another build.)
struct Math : ScalarMath {
  using ScalarMath::clamp;
  using ScalarMath::clamp_min;
  using ScalarMath::select;
  template <typename T>
  static FROZENNORM_ALWAYS_INLINE Vectorized<T> clamp_min(const Vectorized<T>& a,
                                                         const Vectorized<T>& lo) {
    return at::vec::clamp_min(a, lo);  // max(lo, a): NaN passes
  }
  template <typename T>
  static FROZENNORM_ALWAYS_INLINE Vectorized<T> clamp(const Vectorized<T>& a,
                                                     const Vectorized<T>& lo,
                                                     const Vectorized<T>& hi) {
    return at::vec::clamp(a, lo, hi);
  }
  template <typename T>
  static FROZENNORM_ALWAYS_INLINE Vectorized<T> select(const Vectorized<T>& mask,
                                                      const Vectorized<T>& a,
                                                      const Vectorized<T>& b) {
    return Vectorized<T>::blendv(b, a, mask);
  }
  template <typename T>
  static FROZENNORM_ALWAYS_INLINE Vectorized<T> exp_neg(const Vectorized<T>& x) {
    return x.neg().exp();
  }
  using ScalarMath::exp_neg;
};

// out = act(round(round((in - mean) * scale + shift) + residual)); extra = the pre-activation.
// residual and extra may be null (predictable branches: one loop for every case).
template <typename scalar_t, typename acc_t_, Activation kAct>
struct ActForwardOp {
  using acc_t = acc_t_;
  static constexpr bool kShift = true;
  using IO = VecIO<scalar_t, acc_t>;
  using V = typename IO::AccVec;

  const scalar_t* in;
  const scalar_t* residual;
  scalar_t* out;
  scalar_t* extra;

  bool aligned(int64_t k) const {
    return aligned_at(out + k) && (extra == nullptr || aligned_at(extra + k));
  }

  void scalar(int64_t k, acc_t m, acc_t s, acc_t b) const {
    acc_t a = round_to<scalar_t>(fma_scalar(static_cast<acc_t>(in[k]) - m, s, b));
    if (residual != nullptr) a = round_to<scalar_t>(a + static_cast<acc_t>(residual[k]));
    if (extra != nullptr) extra[k] = static_cast<scalar_t>(a);
    out[k] = static_cast<scalar_t>(act_forward<kAct, Math>(a));
  }

  template <bool kStream>
  FROZENNORM_ALWAYS_INLINE void step(int64_t k, const V* m, const V* s, const V* b) const {
    if constexpr (IO::kVectorized) {
      V v[IO::kParts];
      IO::load(in + k, v);
      for (int part = 0; part < IO::kParts; ++part) v[part] = at::vec::fmadd(v[part] - m[part], s[part], b[part]);
      if (residual != nullptr) {
        IO::round(v);
        V r[IO::kParts];
        IO::load(residual + k, r);
        for (int part = 0; part < IO::kParts; ++part) v[part] = v[part] + r[part];
      }
      // The activation of the rounded value: but for SiLU the same as the rounded activation,
      // whose one rounding is the store's.
      if constexpr (!kRoundingCommutes<kAct>) IO::round(v);
      if (extra != nullptr) IO::template store<kStream>(extra + k, v);
      for (int part = 0; part < IO::kParts; ++part) v[part] = act_forward<kAct, Math>(v[part]);
      IO::template store<kStream>(out + k, v);
    }
  }
};

// The gradient after the activation, ga = grad * act'(saved) rounded to the data dtype, at
// flat offset k: the one rule of the fused backwards (ActBackwardOp, and AffineBackwardOp in
// affine_backward_kernel.h). For the identity ga is grad itself and saved is not read.
template <typename scalar_t, typename acc_t, Activation kAct>
struct ActGrad {
  using IO = VecIO<scalar_t, acc_t>;
  using V = typename IO::AccVec;

  static FROZENNORM_ALWAYS_INLINE acc_t scalar(const scalar_t* grad, const scalar_t* saved,
                                               int64_t k) {
    if constexpr (kAct == Activation::kIdentity) {
      return static_cast<acc_t>(grad[k]);
    } else {
      return round_to<scalar_t>(
          act_backward<kAct, Math>(static_cast<acc_t>(grad[k]), static_cast<acc_t>(saved[k])));
    }
  }

  // IO::kStep values at k, as IO::kParts vectors (vectorized IO only)
  static FROZENNORM_ALWAYS_INLINE void vec(const scalar_t* grad, const scalar_t* saved,
                                           int64_t k, V* g) {
    if constexpr (IO::kVectorized) {
      IO::load(grad + k, g);
      if constexpr (kAct != Activation::kIdentity) {
        V sv[IO::kParts];
        IO::load(saved + k, sv);
        for (int part = 0; part < IO::kParts; ++part) g[part] = act_backward<kAct, Math>(g[part], sv[part]);
        // (but for SiLU the gradient is grad_output or zero: already a value of the dtype)
        if constexpr (!kRoundingCommutes<kAct>) IO::round(g);
      }
    }
  }
};

// ga = round(grad * act'(saved)); out = ga * scale; extra (may be null) = ga, the residual's
// gradient.
template <typename scalar_t, typename acc_t_, Activation kAct>
struct ActBackwardOp {
  using acc_t = acc_t_;
  static constexpr bool kShift = false;
  using IO = VecIO<scalar_t, acc_t>;
  using V = typename IO::AccVec;
  using Grad = ActGrad<scalar_t, acc_t, kAct>;

  const scalar_t* grad;
  const scalar_t* saved;
  scalar_t* out;
  scalar_t* extra;

  bool aligned(int64_t k) const {
    return aligned_at(out + k) && (extra == nullptr || aligned_at(extra + k));
  }

  void scalar(int64_t k, acc_t, acc_t s, acc_t) const {
    const acc_t ga = Grad::scalar(grad, saved, k);
    if (extra != nullptr) extra[k] = static_cast<scalar_t>(ga);
    out[k] = static_cast<scalar_t>(ga * s);
  }

  template <bool kStream>
  FROZENNORM_ALWAYS_INLINE void step(int64_t k, const V*, const V* s, const V*) const {
    if constexpr (IO::kVectorized) {
      V g[IO::kParts];
      Grad::vec(grad, saved, k, g);
      if (extra != nullptr) IO::template store<kStream>(extra + k, g);
      for (int part = 0; part < IO::kParts; ++part) g[part] = g[part] * s[part];
      IO::template store<kStream>(out + k, g);
    }
  }
};

inline void act_forward_dense_impl(const DenseProblem& p) {
  dispatch_types(p.data_type, p.acc_type, [&](auto data_tag, auto acc_tag) {
    using scalar_t = decltype(data_tag);
    using acc_t = decltype(acc_tag);
    dispatch_act(p.act, /*identity_ok=*/true, [&](auto act_tag) {
      using Op = ActForwardOp<scalar_t, acc_t, decltype(act_tag)::value>;
      walk_dense(p, Op{static_cast<const scalar_t*>(p.in), static_cast<const scalar_t*>(p.residual),
                       static_cast<scalar_t*>(p.out), static_cast<scalar_t*>(p.extra)});
    });
  });
}

inline void act_backward_dense_impl(const DenseProblem& p) {
  dispatch_types(p.data_type, p.acc_type, [&](auto data_tag, auto acc_tag) {
    using scalar_t = decltype(data_tag);
    using acc_t = decltype(acc_tag);
    dispatch_act(p.act, /*identity_ok=*/false, [&](auto act_tag) {
      using Op = ActBackwardOp<scalar_t, acc_t, decltype(act_tag)::value>;
      walk_dense(p, Op{static_cast<const scalar_t*>(p.in), static_cast<const scalar_t*>(p.saved),
                       static_cast<scalar_t*>(p.out), static_cast<scalar_t*>(p.extra)});
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace frozennorm::cpu
