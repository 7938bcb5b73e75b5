// The CPU loops of the frozen affine map, compiled once per CPU capability
// (affine_kernel.cpp: the compiler's baseline; affine_kernel_avx2.cpp: AVX2+FMA+F16C) and
// chosen at run time by frozen_bn_cpu.cpp.
//
//   forward:  out = (in - mean) * scale + shift      backward:  out = in * scale
//
// Runs of constant channel (NCHW-like layouts) broadcast the parameters; runs of consecutive
// channels (channels-last) load them as vectors. fp16/bf16 are converted in vector registers
// and the arithmetic is float32 (float64 for float64 data). Large outputs are written with
// non-temporal stores where the build has them, so that writing them costs no extra read.
#pragma once

#include "affine_problem.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#ifndef CPU_CAPABILITY
#error "affine_kernel.h needs CPU_CAPABILITY (the namespace of this build's vector code)"
#endif

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace frozennorm::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// a * b + c, rounded once where the build has FMA (as the vector path's fmadd is).
template <typename T>
inline T fma_scalar(T a, T b, T c) {
#if defined(CPU_CAPABILITY_AVX2)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Loads/stores kStep elements of scalar_t as kParts vectors of acc_t.
template <typename scalar_t, typename acc_t, typename = void>
struct VecIO {
  static constexpr bool kVectorized = false;
};

// Non-temporal store of one 32-byte vector to a 32-byte aligned address.
#if defined(CPU_CAPABILITY_AVX2)
inline void stream_store(float* p, const Vectorized<float>& v) {
  _mm256_stream_ps(p, v);
}
inline void stream_store(double* p, const Vectorized<double>& v) {
  _mm256_stream_pd(p, v);
}
template <typename T>  // float16 / bfloat16
inline void stream_store(T* p, const Vectorized<T>& v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
}
#else
template <typename T, typename V>
inline void stream_store(T* p, const V& v) {
  v.store(p);
}
#endif

template <typename T>
struct VecIO<T, T, std::enable_if_t<std::is_same_v<T, float> || std::is_same_v<T, double>>> {
  static constexpr bool kVectorized = true;
  using AccVec = Vectorized<T>;
  static constexpr int64_t kStep = AccVec::size();
  static constexpr int kParts = 1;
  static void load(const T* p, AccVec* out) {
    out[0] = AccVec::loadu(p);
  }
  template <bool kStream>
  static void store(T* p, const AccVec* in) {
    if constexpr (kStream) {
      stream_store(p, in[0]);
    } else {
      in[0].store(p);
    }
  }
};

template <typename T>
struct VecIO<
    T,
    float,
    std::enable_if_t<std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>>> {
  static constexpr bool kVectorized = true;
  using AccVec = Vectorized<float>;
  static constexpr int64_t kStep = Vectorized<T>::size();
  static constexpr int kParts = kStep / AccVec::size();
  static_assert(kParts == 2, "a reduced-precision vector converts to two float vectors");
  static void load(const T* p, AccVec* out) {
    std::tie(out[0], out[1]) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
  }
  template <bool kStream>
  static void store(T* p, const AccVec* in) {
    const auto v = at::vec::convert_from_float<T>(in[0], in[1]);
    if constexpr (kStream) {
      stream_store(p, v);
    } else {
      v.store(p);
    }
  }
};

constexpr int64_t kStreamAlign = 32;

template <typename scalar_t, typename acc_t, bool kShift>
struct Affine {
  using IO = VecIO<scalar_t, acc_t>;

  static acc_t apply1(scalar_t x, acc_t m, acc_t s, acc_t b) {
    const acc_t v = static_cast<acc_t>(x);
    if constexpr (kShift) {
      return fma_scalar(v - m, s, b);
    } else {
      return v * s;
    }
  }

  // y[0, n) from x[0, n). kContig: element j has parameters mean[j], scale[j], shift[j];
  // otherwise all have mean[0], scale[0], shift[0].
  template <bool kContig, bool kStream>
  static void run(const scalar_t* x, scalar_t* y, int64_t n, const acc_t* mean,
                  const acc_t* scale, const acc_t* shift) {
    auto scalar = [&](int64_t j) {
      const int64_t c = kContig ? j : 0;
      y[j] = static_cast<scalar_t>(
          apply1(x[j], kShift ? mean[c] : acc_t(0), scale[c], kShift ? shift[c] : acc_t(0)));
    };
    int64_t j = 0;
    if constexpr (IO::kVectorized) {
      using V = typename IO::AccVec;
      constexpr int64_t kLanes = V::size();
      if constexpr (kStream) {  // scalar until the output is aligned for streaming stores
        while (j < n && reinterpret_cast<uintptr_t>(y + j) % kStreamAlign != 0) scalar(j++);
      }
      const V bm(kShift ? mean[0] : acc_t(0)), bs(scale[0]), bb(kShift ? shift[0] : acc_t(0));
      V v[IO::kParts];
      for (; j + IO::kStep <= n; j += IO::kStep) {
        IO::load(x + j, v);
#pragma unroll
        for (int part = 0; part < IO::kParts; ++part) {
          const int64_t off = j + part * kLanes;
          const V s = kContig ? V::loadu(scale + off) : bs;
          if constexpr (kShift) {
            const V m = kContig ? V::loadu(mean + off) : bm;
            const V b = kContig ? V::loadu(shift + off) : bb;
            v[part] = at::vec::fmadd(v[part] - m, s, b);
          } else {
            v[part] = v[part] * s;
          }
        }
        IO::template store<kStream>(y + j, v);
      }
    }
    for (; j < n; ++j) scalar(j);
  }

  // Planes shorter than this are processed as one flat stream (run_small_planes).
  static constexpr int64_t kSmallPlane = 256;

  // Consecutive small planes (kLanes <= inner < kSmallPlane) as one flat stream of full
  // vectors, starting in channel c at position pos of its plane: a lane group spans at most
  // two planes, whose parameters are blended. Aligned (and streamed, if asked) stores, and
  // no per-plane remainder, which short planes would otherwise pay for on every plane.
  template <bool kStream>
  static void run_small_planes(const scalar_t* x, scalar_t* y, int64_t n, int64_t c, int64_t pos,
                               int64_t inner, int64_t C, const acc_t* mean, const acc_t* scale,
                               const acc_t* shift) {
    using V = typename IO::AccVec;
    constexpr int64_t kLanes = V::size();
    auto next = [C](int64_t ch) { return ch + 1 == C ? int64_t{0} : ch + 1; };
    int64_t j = 0;
    auto scalar = [&] {
      y[j] = static_cast<scalar_t>(apply1(x[j], kShift ? mean[c] : acc_t(0), scale[c],
                                          kShift ? shift[c] : acc_t(0)));
      ++j;
      if (++pos == inner) {
        pos = 0;
        c = next(c);
      }
    };
    while (j < n && reinterpret_cast<uintptr_t>(y + j) % kStreamAlign != 0) scalar();
    V v[IO::kParts];
    for (; j + IO::kStep <= n; j += IO::kStep) {
      IO::load(x + j, v);
#pragma unroll
      for (int part = 0; part < IO::kParts; ++part) {
        const int64_t first = inner - pos;  // lanes [0, first) are in channel c
        V m, s, b;
        if (first > kLanes) {
          m = V(kShift ? mean[c] : acc_t(0));
          s = V(scale[c]);
          b = V(kShift ? shift[c] : acc_t(0));
          pos += kLanes;
        } else {
          const int64_t c2 = next(c);
          s = V::set(V(scale[c2]), V(scale[c]), first);
          if constexpr (kShift) {
            m = V::set(V(mean[c2]), V(mean[c]), first);
            b = V::set(V(shift[c2]), V(shift[c]), first);
          }
          pos = kLanes - first;
          c = c2;
          if (pos == inner) {  // only when inner == kLanes: the group ended with plane c2
            pos = 0;
            c = next(c);
          }
        }
        if constexpr (kShift) {
          v[part] = at::vec::fmadd(v[part] - m, s, b);
        } else {
          v[part] = v[part] * s;
        }
      }
      IO::template store<kStream>(y + j, v);
    }
    while (j < n) scalar();
  }

  static void dense(const DenseProblem& p) {
    const auto* x = static_cast<const scalar_t*>(p.in);
    auto* y = static_cast<scalar_t*>(p.out);
    const auto* mean = static_cast<const acc_t*>(p.mean);
    const auto* scale = static_cast<const acc_t*>(p.scale);
    const auto* shift = static_cast<const acc_t*>(p.shift);
    const int64_t C = p.C, inner = p.inner;
    at::parallel_for(0, p.numel, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      // Walk [begin, end) run by run: a run is the rest of a row of C consecutive channels
      // (inner == 1) or of a plane of `inner` elements of one channel. Only the first run
      // needs a division.
      const int64_t q = begin / inner;
      int64_t c = inner == 1 ? begin % C : q % C;
      int64_t pos = inner == 1 ? 0 : begin - q * inner;  // position in the current plane
      if constexpr (IO::kVectorized) {
        if (inner >= IO::AccVec::size() && inner < kSmallPlane) {
          p.stream ? run_small_planes<true>(x + begin, y + begin, end - begin, c, pos, inner, C,
                                            mean, scale, shift)
                   : run_small_planes<false>(x + begin, y + begin, end - begin, c, pos, inner,
                                             C, mean, scale, shift);
#if defined(CPU_CAPABILITY_AVX2)
          if (p.stream) _mm_sfence();
#endif
          return;
        }
      }
      for (int64_t k = begin; k < end;) {
        const int64_t len = inner == 1 ? std::min(C - c, end - k) : std::min(inner - pos, end - k);
        const acc_t* m = kShift ? mean + c : nullptr;
        const acc_t* b = kShift ? shift + c : nullptr;
        const bool stream = p.stream && len >= 8 * kStreamAlign;
        if (inner == 1) {
          stream ? run<true, true>(x + k, y + k, len, m, scale + c, b)
                 : run<true, false>(x + k, y + k, len, m, scale + c, b);
          c = 0;
        } else {
          stream ? run<false, true>(x + k, y + k, len, m, scale + c, b)
                 : run<false, false>(x + k, y + k, len, m, scale + c, b);
          pos = 0;
          c = c + 1 == C ? 0 : c + 1;
        }
        k += len;
      }
#if defined(CPU_CAPABILITY_AVX2)
      if (p.stream) _mm_sfence();
#endif
    });
  }

  // A TensorIterator loop over (out, in, [mean,] scale[, shift]) with any strides.
  struct IterLoop {
    static constexpr int kOperands = kShift ? 5 : 3;
    static constexpr int kOut = 0, kIn = 1, kMean = 2, kScale = kShift ? 3 : 2, kShiftOp = 4;

    void operator()(char** data, const int64_t* strides, int64_t n, int64_t rows) const {
      char* ptrs[kOperands];
      for (int64_t r = 0; r < rows; ++r) {
        for (int k = 0; k < kOperands; ++k) ptrs[k] = data[k] + r * strides[kOperands + k];
        const bool dense = strides[kOut] == sizeof(scalar_t) && strides[kIn] == sizeof(scalar_t);
        bool params_const = true, params_contig = true;
        for (int k = kIn + 1; k < kOperands; ++k) {
          params_const &= strides[k] == 0;
          params_contig &= strides[k] == sizeof(acc_t);
        }
        const auto* x = reinterpret_cast<const scalar_t*>(ptrs[kIn]);
        auto* y = reinterpret_cast<scalar_t*>(ptrs[kOut]);
        const auto* m = kShift ? reinterpret_cast<const acc_t*>(ptrs[kMean]) : nullptr;
        const auto* s = reinterpret_cast<const acc_t*>(ptrs[kScale]);
        const auto* b = kShift ? reinterpret_cast<const acc_t*>(ptrs[kShiftOp]) : nullptr;
        if (dense && params_const) {
          run<false, false>(x, y, n, m, s, b);
        } else if (dense && params_contig) {
          run<true, false>(x, y, n, m, s, b);
        } else {
          for (int64_t j = 0; j < n; ++j) {
            auto at = [&](int k) { return ptrs[k] + j * strides[k]; };
            const acc_t mj = kShift ? *reinterpret_cast<const acc_t*>(at(kMean)) : acc_t(0);
            const acc_t bj = kShift ? *reinterpret_cast<const acc_t*>(at(kShiftOp)) : acc_t(0);
            *reinterpret_cast<scalar_t*>(at(kOut)) = static_cast<scalar_t>(apply1(
                *reinterpret_cast<const scalar_t*>(at(kIn)), mj,
                *reinterpret_cast<const acc_t*>(at(kScale)), bj));
          }
        }
      }
    }
  };
};

// Calls f(scalar_t{}, acc_t{}) for the data and compute dtypes.
template <typename F>
void dispatch_types(at::ScalarType data, at::ScalarType acc, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, data, "frozen_bn_cpu", [&] {
    if (acc == at::kDouble) {
      f(scalar_t{}, double{});
    } else {
      f(scalar_t{}, float{});
    }
  });
}

inline void affine_dense_impl(const DenseProblem& p) {
  dispatch_types(p.data_type, p.acc_type, [&](auto data_tag, auto acc_tag) {
    using scalar_t = decltype(data_tag);
    using acc_t = decltype(acc_tag);
    if (p.mean != nullptr) {
      Affine<scalar_t, acc_t, true>::dense(p);
    } else {
      Affine<scalar_t, acc_t, false>::dense(p);
    }
  });
}

inline void affine_iter_impl(at::TensorIteratorBase& iter, bool with_shift) {
  dispatch_types(iter.dtype(1), iter.dtype(with_shift ? 3 : 2), [&](auto data_tag, auto acc_tag) {
    using scalar_t = decltype(data_tag);
    using acc_t = decltype(acc_tag);
    if (with_shift) {
      iter.for_each(typename Affine<scalar_t, acc_t, true>::IterLoop{});
    } else {
      iter.for_each(typename Affine<scalar_t, acc_t, false>::IterLoop{});
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace frozennorm::cpu
