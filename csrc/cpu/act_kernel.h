// Fused epilogues on the CPU (per capability; see channel_walk.h): frozen BN, optionally a
// residual added, then an activation, in one pass forward and one pass backward. Every
// intermediate is rounded to the data dtype exactly where the unfused sequence
// frozen_bn -> add -> activation would store it, so the results are those of that sequence.
#pragma once

#include "channel_walk.h"

#include <ATen/Dispatch.h>

namespace frozennorm::cpu {
namespace CPU_CAPABILITY {

template <Activation kAct>
struct Act {
  template <typename T>
  static T fwd(const T& a) {  // T: a scalar or a Vectorized of the compute dtype
    using std::exp;
    if constexpr (kAct == Activation::kReLU) {
      if constexpr (std::is_arithmetic_v<T>) {
        return a < T(0) ? T(0) : a;  // NaN passes, as torch.relu
      } else {
        return at::vec::clamp_min(a, T(0));
      }
    } else if constexpr (kAct == Activation::kReLU6) {
      if constexpr (std::is_arithmetic_v<T>) {
        return a < T(0) ? T(0) : (a > T(6) ? T(6) : a);
      } else {
        return at::vec::clamp(a, T(0), T(6));
      }
    } else if constexpr (kAct == Activation::kSiLU) {
      if constexpr (std::is_arithmetic_v<T>) {
        return a / (T(1) + exp(-a));
      } else {
        return a / (T(1) + a.neg().exp());
      }
    } else {
      return a;
    }
  }

  // The activation's gradient at the saved value: the output for ReLU/ReLU6 (zero where
  // torch's threshold/hardtanh backward gives zero, NaN passing as there), the
  // pre-activation for SiLU.
  template <typename T>
  static T bwd(const T& g, const T& saved) {
    if constexpr (kAct == Activation::kReLU) {
      if constexpr (std::is_arithmetic_v<T>) {
        return saved <= T(0) ? T(0) : g;
      } else {
        return T::blendv(g, T(0), saved <= T(0));
      }
    } else if constexpr (kAct == Activation::kReLU6) {
      if constexpr (std::is_arithmetic_v<T>) {
        return (saved <= T(0) || saved >= T(6)) ? T(0) : g;
      } else {
        return T::blendv(g, T(0), (saved <= T(0)) | (saved >= T(6)));
      }
    } else if constexpr (kAct == Activation::kSiLU) {
      using std::exp;
      if constexpr (std::is_arithmetic_v<T>) {
        const T sig = T(1) / (T(1) + exp(-saved));
        return g * sig * (T(1) + saved * (T(1) - sig));
      } else {
        const T one(1);
        const T sig = one / (one + saved.neg().exp());
        return g * sig * (one + saved * (one - sig));
      }
    } else {
      return g;
    }
  }
};

// act(round(v)) == round(act(v)), and act'(saved) * grad is exact (grad or 0): true of all but
// SiLU (rounding is monotonic, and ReLU6's bounds 0 and 6 are exact in every dtype).
template <Activation kAct>
constexpr bool kRoundingCommutes = kAct != Activation::kSiLU;

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
    out[k] = static_cast<scalar_t>(Act<kAct>::fwd(a));
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
      for (int part = 0; part < IO::kParts; ++part) v[part] = Act<kAct>::fwd(v[part]);
      IO::template store<kStream>(out + k, v);
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

  const scalar_t* grad;
  const scalar_t* saved;
  scalar_t* out;
  scalar_t* extra;

  bool aligned(int64_t k) const {
    return aligned_at(out + k) && (extra == nullptr || aligned_at(extra + k));
  }

  void scalar(int64_t k, acc_t, acc_t s, acc_t) const {
    const acc_t ga = round_to<scalar_t>(
        Act<kAct>::bwd(static_cast<acc_t>(grad[k]), static_cast<acc_t>(saved[k])));
    if (extra != nullptr) extra[k] = static_cast<scalar_t>(ga);
    out[k] = static_cast<scalar_t>(ga * s);
  }

  template <bool kStream>
  FROZENNORM_ALWAYS_INLINE void step(int64_t k, const V*, const V* s, const V*) const {
    if constexpr (IO::kVectorized) {
      V g[IO::kParts], sv[IO::kParts];
      IO::load(grad + k, g);
      IO::load(saved + k, sv);
      for (int part = 0; part < IO::kParts; ++part) g[part] = Act<kAct>::bwd(g[part], sv[part]);
      // (but for SiLU the gradient is grad_output or zero: already a value of the dtype)
      if constexpr (!kRoundingCommutes<kAct>) IO::round(g);
      if (extra != nullptr) IO::template store<kStream>(extra + k, g);
      for (int part = 0; part < IO::kParts; ++part) g[part] = g[part] * s[part];
      IO::template store<kStream>(out + k, g);
    }
  }
};

// Calls f(std::integral_constant<Activation, A>{}) for relu, relu6, silu (and identity when
// allowed: the forward's residual add without activation).
template <typename F>
void dispatch_act(Activation act, bool identity_ok, const F& f) {
  switch (act) {
    case Activation::kReLU:
      return f(std::integral_constant<Activation, Activation::kReLU>{});
    case Activation::kReLU6:
      return f(std::integral_constant<Activation, Activation::kReLU6>{});
    case Activation::kSiLU:
      return f(std::integral_constant<Activation, Activation::kSiLU>{});
    default:
      TORCH_INTERNAL_ASSERT(identity_ok, "the identity backward is frozen_bn_backward's");
      return f(std::integral_constant<Activation, Activation::kIdentity>{});
  }
}

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
