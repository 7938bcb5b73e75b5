// The frozen affine map on the CPU (per capability; see channel_walk.h):
//   forward:  out = (in - mean) * scale + shift      backward:  out = in * scale
#pragma once

#include "channel_walk.h"

#include <ATen/Dispatch.h>

namespace frozennorm::cpu {
namespace CPU_CAPABILITY {

template <typename scalar_t, typename acc_t_, bool kShift_>
struct AffineOp {
  using acc_t = acc_t_;
  static constexpr bool kShift = kShift_;  // has a mean and shift (the forward)
  using IO = VecIO<scalar_t, acc_t>;
  using V = typename IO::AccVec;

  const scalar_t* in;
  scalar_t* out;

  static acc_t apply(acc_t x, acc_t m, acc_t s, acc_t b) {
    if constexpr (kShift) {
      return fma_scalar(x - m, s, b);
    } else {
      return x * s;
    }
  }

  bool aligned(int64_t k) const {
    return aligned_at(out + k);
  }

  void scalar(int64_t k, acc_t m, acc_t s, acc_t b) const {
    out[k] = static_cast<scalar_t>(apply(static_cast<acc_t>(in[k]), m, s, b));
  }

  template <bool kStream>
  FROZENNORM_ALWAYS_INLINE void step(int64_t k, const V* m, const V* s, const V* b) const {
    if constexpr (IO::kVectorized) {
      V v[IO::kParts];
      IO::load(in + k, v);
      for (int part = 0; part < IO::kParts; ++part) {
        if constexpr (kShift) {
          v[part] = at::vec::fmadd(v[part] - m[part], s[part], b[part]);
        } else {
          v[part] = v[part] * s[part];
        }
      }
      IO::template store<kStream>(out + k, v);
    }
  }
};

// A TensorIterator loop over (out, in, [mean,] scale[, shift]) with any strides.
template <typename scalar_t, typename acc_t, bool kShift>
struct AffineIterLoop {
  static constexpr int kOperands = kShift ? 5 : 3;
  static constexpr int kOut = 0, kIn = 1, kMean = 2, kScale = kShift ? 3 : 2, kShiftOp = 4;
  using Op = AffineOp<scalar_t, acc_t, kShift>;

  // A strided input is gathered this many elements at a time into a buffer for the vector loop.
  static constexpr int64_t kGather = 256;

  void operator()(char** data, const int64_t* strides, int64_t n, int64_t rows) const {
    char* ptrs[kOperands];
    for (int64_t r = 0; r < rows; ++r) {
      for (int k = 0; k < kOperands; ++k) ptrs[k] = data[k] + r * strides[kOperands + k];
      bool params_const = true, params_contig = true;
      for (int k = kIn + 1; k < kOperands; ++k) {
        params_const &= strides[k] == 0;
        params_contig &= strides[k] == sizeof(acc_t);
      }
      const auto* in = reinterpret_cast<const scalar_t*>(ptrs[kIn]);
      auto* out = reinterpret_cast<scalar_t*>(ptrs[kOut]);
      const auto* m = kShift ? reinterpret_cast<const acc_t*>(ptrs[kMean]) : nullptr;
      const auto* s = reinterpret_cast<const acc_t*>(ptrs[kScale]);
      const auto* b = kShift ? reinterpret_cast<const acc_t*>(ptrs[kShiftOp]) : nullptr;
      // out[j + i] for i in [0, len) from from[i] (dense), in channel j + i (params_contig)
      // or all in one channel (params_const)
      auto vectors = [&](const scalar_t* from, int64_t j, int64_t len) {
        const Op op{from, out + j};
        params_const ? walk_run<false, false>(op, 0, len, 0, m, s, b)
                     : walk_run<true, false>(op, 0, len, j, m, s, b);
      };
      const bool vectorizable = strides[kOut] == sizeof(scalar_t) && (params_const || params_contig);
      if (vectorizable && strides[kIn] == sizeof(scalar_t)) {
        vectors(in, 0, n);
      } else if (vectorizable) {  // a strided input (x[..., ::2]): gathered, then the vector loop
        scalar_t buf[kGather];
        for (int64_t j = 0; j < n; j += kGather) {
          const int64_t len = std::min(kGather, n - j);
          const char* from = ptrs[kIn] + j * strides[kIn];
          for (int64_t i = 0; i < len; ++i) {
            buf[i] = *reinterpret_cast<const scalar_t*>(from + i * strides[kIn]);
          }
          vectors(buf, j, len);
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          auto at = [&](int k) { return ptrs[k] + j * strides[k]; };
          const acc_t mj = kShift ? *reinterpret_cast<const acc_t*>(at(kMean)) : acc_t(0);
          const acc_t bj = kShift ? *reinterpret_cast<const acc_t*>(at(kShiftOp)) : acc_t(0);
          *reinterpret_cast<scalar_t*>(at(kOut)) = static_cast<scalar_t>(Op::apply(
              static_cast<acc_t>(*reinterpret_cast<const scalar_t*>(at(kIn))), mj,
              *reinterpret_cast<const acc_t*>(at(kScale)), bj));
        }
      }
    }
  }
};

inline void affine_dense_impl(const DenseProblem& p) {
  dispatch_types(p.data_type, p.acc_type, [&](auto data_tag, auto acc_tag) {
    using scalar_t = decltype(data_tag);
    using acc_t = decltype(acc_tag);
    const auto* in = static_cast<const scalar_t*>(p.in);
    auto* out = static_cast<scalar_t*>(p.out);
    if (p.mean != nullptr) {
      walk_dense(p, AffineOp<scalar_t, acc_t, true>{in, out});
    } else {
      walk_dense(p, AffineOp<scalar_t, acc_t, false>{in, out});
    }
  });
}

inline void affine_iter_impl(at::TensorIteratorBase& iter, bool with_shift) {
  dispatch_types(iter.dtype(1), iter.dtype(with_shift ? 3 : 2), [&](auto data_tag, auto acc_tag) {
    using scalar_t = decltype(data_tag);
    using acc_t = decltype(acc_tag);
    if (with_shift) {
      iter.for_each(AffineIterLoop<scalar_t, acc_t, true>{});
    } else {
      iter.for_each(AffineIterLoop<scalar_t, acc_t, false>{});
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace frozennorm::cpu
