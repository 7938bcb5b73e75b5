// The building blocks of every CUDA kernel here (and of kernels to come, e.g. a per-channel
// reduction): the calling thread's indices, aligned vector packs and the loads and stores of
// global memory, correctly rounded arithmetic, division by a divisor fixed at launch.
//
// A kernel is a functor `K` with `void operator()(const ThreadIdx&) const`: on the GPU a
// single generic __global__ entry calls it with the built-in indices (frozen_bn_cuda.cu);
// the tests' CUDA emulation (tests/cuda_emulation) compiles the same headers as plain C++
// with FROZENNORM_CUDA_EMULATION defined and calls it for every (block, thread) of the grid.
// Kernels use no shared memory and no barriers, which makes that emulation exact, and they
// touch global memory only through load_pack/store_pack, which report every access to the
// emulation (it checks alignment and bounds and counts each byte's writes).
#pragma once

#include "../rules.h"  // FROZENNORM_HD

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace frozennorm::cuda {

struct Dim2 {
  uint32_t x = 1, y = 1;
};

// The built-in indices of the calling thread (blockIdx, threadIdx, gridDim, blockDim).
struct ThreadIdx {
  Dim2 block, thread, grid, block_dim;
#if defined(__CUDACC__)
  __device__ static ThreadIdx current() {
    return {{blockIdx.x, blockIdx.y}, {threadIdx.x, threadIdx.y}, {gridDim.x, gridDim.y},
            {blockDim.x, blockDim.y}};
  }
#endif
};

#if defined(FROZENNORM_CUDA_EMULATION)
namespace emulation {
// Every global load and store of the kernels, reported before it happens
// (tests/cuda_emulation/emulation.cpp).
void on_access(const void* p, std::size_t bytes, bool store);
}  // namespace emulation
#endif

// N consecutive elements, aligned so that one load/store instruction moves them all
// (N * sizeof(T) <= 16 bytes; the 32-byte pack of four doubles takes two).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
FROZENNORM_HD Pack<T, N> load_pack(const T* p) {
#if defined(FROZENNORM_CUDA_EMULATION)
  emulation::on_access(p, sizeof(Pack<T, N>), false);
#endif
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
FROZENNORM_HD void store_pack(T* p, const Pack<T, N>& v) {
#if defined(FROZENNORM_CUDA_EMULATION)
  emulation::on_access(p, sizeof(Pack<T, N>), true);
#endif
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

template <typename T>
FROZENNORM_HD T load1(const T* p) {
  return load_pack<T, 1>(p).v[0];
}

template <typename T>
FROZENNORM_HD void store1(T* p, T v) {
  store_pack<T, 1>(p, Pack<T, 1>{{v}});
}

// Correctly rounded (IEEE) arithmetic on host and device alike (T: float or double).
template <typename T>
FROZENNORM_HD T sqrt_rn(T x) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) return __fsqrt_rn(x);
  else return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
template <typename T>
FROZENNORM_HD T fma_rn(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) return __fmaf_rn(a, b, c);
  else return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// Index math is done in uint32_t where every offset of the launch is below 2^31 (launch.h
// decides) and in uint64_t otherwise.
template <typename index_t>
using WideIndex = std::conditional_t<sizeof(index_t) == 4, uint64_t, unsigned __int128>;

// The high half of a * b.
template <typename index_t>
FROZENNORM_HD index_t mul_hi(index_t a, index_t b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(index_t) == 4) return __umulhi(a, b);
  else return __umul64hi(a, b);
#else
  return static_cast<index_t>((static_cast<WideIndex<index_t>>(a) * b) >> (8 * sizeof(index_t)));
#endif
}

// n / d for a divisor d >= 1 fixed at launch, as a multiply-high, an add and a shift
// (Granlund & Montgomery; no division instruction, which GPUs emulate in dozens of
// instructions, 64-bit ones in software). Exact for n < 2^31 (uint32_t) or n < 2^63
// (uint64_t): every index of a tensor.
template <typename index_t>
struct Divider {
  static constexpr int kBits = 8 * sizeof(index_t);
  index_t d = 1, magic = 1;
  uint32_t shift = 0;

  Divider() = default;
  explicit Divider(index_t divisor) : d(divisor) {
    while (shift < kBits && (index_t{1} << shift) < d) ++shift;
    // magic = floor(2^kBits * (2^shift - d) / d) + 1 < 2^kBits
    using wide_t = WideIndex<index_t>;
    const wide_t num = (static_cast<wide_t>(1) << kBits) * ((static_cast<wide_t>(1) << shift) - d);
    magic = static_cast<index_t>(num / d + 1);
  }

  FROZENNORM_HD index_t div(index_t n) const {
    return (mul_hi(n, magic) + n) >> shift;
  }
};

}  // namespace frozennorm::cuda
