// The rules every backend of the frozennorm ops follows, written once: the activation codes
// and their math, and the compute dtype (the dtype of the per-channel parameters and of the
// arithmetic). Host and device code alike include it: the CPU front and the CPU loops of
// every capability, the CUDA kernels and their host side, the CUDA emulation of the tests.
// The Python side's copy of these rules (frozennorm/_op/rules.py and fallback.py) is checked
// against the kernels by tests/test_op.py and tests/test_act_op.py.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(_MSC_VER)
#define FROZENNORM_ALWAYS_INLINE __forceinline
#else
#define FROZENNORM_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

// Host and device code, always inlined (which also keeps what a CPU capability's build
// compiles of these functions inside that build: no shared copy with its instructions).
#if defined(__CUDACC__)
#define FROZENNORM_HD __host__ __device__ __forceinline__
#else
#define FROZENNORM_HD FROZENNORM_ALWAYS_INLINE
#endif

namespace frozennorm {

// ---- the compute dtype ------------------------------------------------------------------

// float64 for float64 data, and for float32 data with float64 statistics (so that a float64
// mean is not rounded to float32 where |mean| >> std); float32 otherwise. For float16/bfloat16
// data float32 is exact enough: the single rounding to the data's dtype dominates.
inline at::ScalarType compute_dtype(at::ScalarType data, at::ScalarType stats) {
  if (data == at::kDouble || (data == at::kFloat && stats == at::kDouble)) return at::kDouble;
  return at::kFloat;
}

// Calls f(scalar_t{}, acc_t{}) for the data dtype and the compute dtype `acc` that
// compute_dtype() chose for it; only the pairs the rule allows are compiled.
template <typename F>
void dispatch_types(at::ScalarType data, at::ScalarType acc, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, data, "frozennorm", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      f(double{}, double{});
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      acc == at::kDouble ? f(float{}, double{}) : f(float{}, float{});
    } else {
      f(scalar_t{}, float{});
    }
  });
}

// ---- the activations of the fused ops ---------------------------------------------------

// The codes of frozen_bn_act / frozen_bn_act_backward (frozennorm/_op/rules.py's
// activation_code() gives the same).
enum class Activation : int64_t { kIdentity = 0, kReLU = 1, kReLU6 = 2, kSiLU = 3 };

// The activation and its gradient, on a value of the compute type T: a scalar or, in the CPU
// loops, a vector. M supplies the operations the formulas need on T:
//   M::clamp_min(a, lo)    lo where a < lo, else a (so NaN passes, as in torch)
//   M::clamp(a, lo, hi)    the same, and hi where a > hi
//   M::select(mask, a, b)  a where the mask (of comparisons of T) is set, else b
//   M::exp_neg(x)          exp(-x)
// ScalarMath below is M for float and double on the host and on the GPU; the CPU loops pass
// their own, which adds at::vec vectors (cpu/act_kernel.h).
template <Activation kAct, typename M, typename T>
FROZENNORM_HD T act_forward(const T& a) {
  if constexpr (kAct == Activation::kReLU) {
    return M::clamp_min(a, T(0));
  } else if constexpr (kAct == Activation::kReLU6) {
    return M::clamp(a, T(0), T(6));
  } else if constexpr (kAct == Activation::kSiLU) {
    return a / (T(1) + M::exp_neg(a));
  } else {
    return a;
  }
}

// grad * act'(saved), at the saved value: the output for ReLU/ReLU6 (zero where torch's
// threshold/hardtanh backward gives zero; NaN passes as there), the pre-activation for SiLU.
template <Activation kAct, typename M, typename T>
FROZENNORM_HD T act_backward(const T& g, const T& saved) {
  if constexpr (kAct == Activation::kReLU) {
    return M::select(saved <= T(0), T(0), g);
  } else if constexpr (kAct == Activation::kReLU6) {
    return M::select((saved <= T(0)) | (saved >= T(6)), T(0), g);
  } else if constexpr (kAct == Activation::kSiLU) {
    const T one(1);
    const T sig = one / (one + M::exp_neg(saved));
    return g * sig * (one + saved * (one - sig));
  } else {
    return g;
  }
}

// act(round(v)) == round(act(v)), and act'(saved) * grad is exact (grad or 0): true of all but
// SiLU (rounding is monotonic, and ReLU6's bounds 0 and 6 are exact in every dtype). Loops
// may then round once, after the activation, instead of before and after it.
template <Activation kAct>
constexpr bool kRoundingCommutes = kAct != Activation::kSiLU;

// Calls f(std::integral_constant<Activation, A>{}) for `act`; the identity only where
// `identity_ok` (the forward's residual add without activation; the identity backward is
// frozen_bn_backward's).
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
      TORCH_INTERNAL_ASSERT(identity_ok, "no kernel for the identity here: ",
                            static_cast<int64_t>(act));
      return f(std::integral_constant<Activation, Activation::kIdentity>{});
  }
}

// M of act_forward/act_backward for float and double scalars, host and device (expf on the
// GPU, as torch's own CUDA SiLU).
struct ScalarMath {
  template <typename T>
  static FROZENNORM_HD T clamp_min(T a, T lo) {
    return a < lo ? lo : a;
  }
  template <typename T>
  static FROZENNORM_HD T clamp(T a, T lo, T hi) {
    return a < lo ? lo : (a > hi ? hi : a);
  }
  template <typename T>
  static FROZENNORM_HD T select(bool mask, T a, T b) {
    return mask ? a : b;
  }
  static FROZENNORM_HD float exp_neg(float x) {
#if defined(__CUDA_ARCH__)
    return ::expf(-x);
#else
    return std::exp(-x);
#endif
  }
  static FROZENNORM_HD double exp_neg(double x) {
#if defined(__CUDA_ARCH__)
    return ::exp(-x);
#else
    return std::exp(-x);
#endif
  }
};

}  // namespace frozennorm
