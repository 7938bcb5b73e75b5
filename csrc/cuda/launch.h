// The host side of every CUDA launch here: the Launcher a kernel is run through, grid sizes,
// and the index and vector widths a launch may use. (The kernels' side: device_support.cuh.)
//
// A Launcher runs kernels: real launches on the current stream (frozen_bn_cuda.cu), or the
// tests' emulation of the grid (tests/cuda_emulation). It provides
//   template <class K> int64_t max_blocks()      blocks of kThreads threads running K that
//                                                fill the device once (occupancy x SMs)
//   template <class K> void launch(Dim2 grid, Dim2 block, const K& kernel)
//   bool index64_only() const                    never choose 32-bit index math (a test switch)
#pragma once

#include "device_support.cuh"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace frozennorm::cuda {

// Threads of every block.
constexpr int kThreads = 256;
// Hardware limits of a grid.
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;

// ceil(a / b) for a >= 0, b > 0, without overflow.
inline int64_t ceil_div(int64_t a, int64_t b) {
  TORCH_INTERNAL_ASSERT(a >= 0 && b > 0, "ceil_div(", a, ", ", b, ")");
  return a / b + (a % b != 0);
}

inline int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// A grid dimension of `blocks` (1 <= blocks <= limit, else an error naming both).
inline uint32_t grid_dim(int64_t blocks, int64_t limit) {
  TORCH_CHECK(blocks >= 1 && blocks <= limit, "frozennorm: a CUDA grid dimension of ", blocks,
              " blocks is outside [1, ", limit, "]");
  return static_cast<uint32_t>(blocks);
}

// Whether a launch over `numel` elements whose largest element offset is `max_offset` may
// do its index math in 32 bits: every index and offset (and their sums in the kernels'
// loops, which stay below 2^32) then fits. ATen's canUse32BitIndexMath, for one tensor.
inline bool use_32bit_index(int64_t numel, int64_t max_offset, bool index64_only) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  return !index64_only && numel <= kMax && max_offset <= kMax;
}

// Calls f(uint32_t{}) or f(uint64_t{}): the index type of a launch.
template <typename F>
void dispatch_index(bool use_32bit, const F& f) {
  if (use_32bit) {
    f(uint32_t{});
  } else {
    f(uint64_t{});
  }
}

// The largest power of two <= max_vec that divides `multiple_of` and at which every pointer
// is aligned to a whole vector (vec * elem_size bytes).
inline int vector_width(int max_vec, int64_t elem_size, int64_t multiple_of,
                        std::initializer_list<const void*> ptrs) {
  int vec = max_vec;
  for (; vec > 1; vec /= 2) {
    bool ok = multiple_of % vec == 0;
    for (const void* p : ptrs) ok &= reinterpret_cast<uintptr_t>(p) % (vec * elem_size) == 0;
    if (ok) break;
  }
  return vec;
}

// Calls f(std::integral_constant<int, vec>{}) for vec, a power of two <= kMax: one kernel
// instantiation per width.
template <int kMax, typename F>
void dispatch_vec(int vec, const F& f) {
  if constexpr (kMax > 1) {
    if (vec < kMax) return dispatch_vec<kMax / 2>(vec, f);
  }
  f(std::integral_constant<int, kMax>{});
}

}  // namespace frozennorm::cuda
