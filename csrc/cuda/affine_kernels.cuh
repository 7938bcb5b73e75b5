// Kernel bodies of the frozen affine map on CUDA, written as host/device functors.
//
// Every kernel is a functor `K` with `void operator()(const ThreadIdx&) const`: on the GPU a
// single generic __global__ entry calls it with the built-in indices; the test suite's CUDA
// emulation (tests/cuda_emulation) compiles this same header as plain C++ and calls it for
// every (block, thread) of the grid, so the indexing below is exercised without a GPU. The
// kernels use no shared memory and no barriers, which makes that emulation exact.
//
// Three layouts, one pass over memory each:
//  * PlanesKernel — dense data whose channel stride `inner` is > 1 (NCHW and any other dense
//    layout where something is inside C): flat 128-bit vectors; the channel of flat index i
//    is (i / inner) % C, followed across a vector when it straddles two planes, and kept
//    from one vector to the next while the plane stays the same.
//  * RowsKernel   — dense data with channel stride 1 (channels_last, channels_last_3d, (N, C)):
//    rows of C channels; each thread owns VEC fixed channels, computes their parameters once
//    and walks down the rows.
//  * StridedKernel — anything else (sliced views, expanded gradients): per element, input and
//    output offsets from an N-d index.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FN_HD __host__ __device__
#define FN_INLINE __forceinline__
#else
#define FN_HD
#define FN_INLINE inline
#endif

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

// Correctly rounded (IEEE) arithmetic on host and device alike.
FN_HD FN_INLINE float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
FN_HD FN_INLINE double sqrt_rn(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
FN_HD FN_INLINE float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
FN_HD FN_INLINE double fma_rn(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// N consecutive elements, aligned so that one load/store instruction moves them all.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
FN_HD FN_INLINE Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}
template <typename T, int N>
FN_HD FN_INLINE void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

template <typename acc_t>
struct ChannelParams {
  acc_t mean, scale, shift;
};

// Dtype tag of a statistics vector, read with a uniform branch instead of one kernel
// instantiation per statistics dtype.
enum class StatType : int8_t { kFloat, kDouble, kHalf, kBFloat16 };

template <typename acc_t>
FN_HD FN_INLINE acc_t load_stat(const void* p, StatType t, int64_t c) {
  switch (t) {
    case StatType::kFloat:
      return static_cast<acc_t>(static_cast<const float*>(p)[c]);
    case StatType::kDouble:
      return static_cast<acc_t>(static_cast<const double*>(p)[c]);
    case StatType::kHalf:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(p)[c]));
    default:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[c]));
  }
}

// Forward parameters from the frozen statistics: scale = weight / sqrt(var + eps), rounded
// once per operation in acc_t. weight/bias may be null (affine=False sources).
template <typename acc_t>
struct StatsSource {
  const void* weight;
  const void* bias;
  const void* mean;
  const void* var;
  StatType type;
  acc_t eps;

  FN_HD FN_INLINE ChannelParams<acc_t> operator()(int64_t c) const {
    const acc_t w = weight != nullptr ? load_stat<acc_t>(weight, type, c) : acc_t(1);
    ChannelParams<acc_t> p;
    p.scale = w / sqrt_rn(load_stat<acc_t>(var, type, c) + eps);
    p.mean = load_stat<acc_t>(mean, type, c);
    p.shift = bias != nullptr ? load_stat<acc_t>(bias, type, c) : acc_t(0);
    return p;
  }
};

// Backward parameters: the per-channel scale the forward returned.
template <typename acc_t>
struct ScaleSource {
  const acc_t* scale;

  FN_HD FN_INLINE ChannelParams<acc_t> operator()(int64_t c) const {
    return {acc_t(0), scale[c], acc_t(0)};
  }
};

// out = (in - mean) * scale + shift (kShift) or out = in * scale, on VEC elements whose
// channel parameters are p[0..VEC).
template <typename scalar_t, typename acc_t, bool kShift>
struct AffineOp {
  const scalar_t* in;
  scalar_t* out;

  FN_HD FN_INLINE static scalar_t apply1(scalar_t x, const ChannelParams<acc_t>& p) {
    const acc_t v = static_cast<acc_t>(x);
    if constexpr (kShift) {
      return static_cast<scalar_t>(fma_rn(v - p.mean, p.scale, p.shift));
    } else {
      return static_cast<scalar_t>(v * p.scale);
    }
  }

  template <int VEC>
  FN_HD FN_INLINE void operator()(int64_t i, const ChannelParams<acc_t> (&p)[VEC]) const {
    const Pack<scalar_t, VEC> x = load_pack<scalar_t, VEC>(in + i);
    Pack<scalar_t, VEC> y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) y.v[j] = apply1(x.v[j], p[j]);
    store_pack<scalar_t, VEC>(out + i, y);
  }
};

// Block 0 writes every channel's scale (the forward's second output).
template <typename index_t, typename Src, typename acc_t>
FN_HD FN_INLINE void write_scales(const ThreadIdx& t, const Src& src, index_t C, acc_t* scale_out) {
  if (scale_out == nullptr || t.block.x != 0 || t.block.y != 0) return;
  const index_t tid = t.thread.y * t.block_dim.x + t.thread.x;
  const index_t nthreads = t.block_dim.x * t.block_dim.y;
  for (index_t c = tid; c < C; c += nthreads) scale_out[c] = src(c).scale;
}

// Division by a divisor fixed at launch, as a multiply-high, an add and a shift
// (n < 2^63, divisor >= 1): 64-bit indices for every tensor size, at the cost of a few
// instructions per vector.
struct Divider {
  uint64_t d, magic;
  uint32_t shift;
  explicit Divider(int64_t divisor) : d(static_cast<uint64_t>(divisor)), shift(0) {
    while (shift < 64 && (uint64_t{1} << shift) < d) ++shift;
    // magic = floor(2^64 * (2^shift - d) / d) + 1, which fits in 64 bits
    const unsigned __int128 num = (static_cast<unsigned __int128>(1) << 64) *
        ((static_cast<unsigned __int128>(1) << shift) - d);
    magic = static_cast<uint64_t>(num / d + 1);
  }
  FN_HD FN_INLINE int64_t div(int64_t n) const {
    const uint64_t un = static_cast<uint64_t>(n);
#if defined(__CUDA_ARCH__)
    const uint64_t hi = __umul64hi(un, magic);
#else
    const uint64_t hi = static_cast<uint64_t>((static_cast<unsigned __int128>(un) * magic) >> 64);
#endif
    return static_cast<int64_t>((hi + un) >> shift);
  }
};

// Dense data, channel stride `inner` (the channel of flat index i is (i / inner) % C).
// Each block takes one contiguous chunk of VEC-element vectors, its threads side by side,
// so that a thread's next vector is usually in the same plane and its channel parameters
// are reused; then the numel % VEC tail.
template <int VEC, typename acc_t, typename Op, typename Src>
struct PlanesKernel {
  using index_t = int64_t;
  Op op;
  Src src;
  acc_t* scale_out;  // nullptr: don't write the scales
  index_t numel, C;
  Divider inner;
  index_t vecs_per_block;

  FN_HD void operator()(const ThreadIdx& t) const {
    write_scales(t, src, C, scale_out);
    using P = ChannelParams<acc_t>;
    const index_t nvec = numel / VEC;
    const index_t first = static_cast<index_t>(t.block.x) * vecs_per_block;
    const index_t last = first + vecs_per_block < nvec ? first + vecs_per_block : nvec;
    index_t cached_q = -1, cached_c = 0;
    P cur{};
    for (index_t v = first + static_cast<index_t>(t.thread.x); v < last; v += t.block_dim.x) {
      const index_t i = v * VEC;
      const index_t q = inner.div(i);  // plane (n, c) of the vector's first element
      if (q != cached_q) {
        cached_q = q;
        cached_c = q % C;
        cur = src(cached_c);
      }
      const index_t plane = static_cast<index_t>(inner.d);
      index_t r = i - q * plane;  // position inside that plane
      P p[VEC];
      if (r + VEC <= plane) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) p[j] = cur;
      } else {  // the vector runs into the next plane(s)
        P here = cur;
        index_t c = cached_c;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          p[j] = here;
          if (++r == plane) {
            r = 0;
            c = (c + 1 == C) ? 0 : c + 1;
            here = src(c);
          }
        }
      }
      op.template operator()<VEC>(i, p);
    }
    const index_t tid = static_cast<index_t>(t.block.x) * t.block_dim.x + t.thread.x;
    const index_t nthreads = static_cast<index_t>(t.grid.x) * t.block_dim.x;
    for (index_t i = nvec * VEC + tid; i < numel; i += nthreads) {
      const P p[1] = {src(inner.div(i) % C)};
      op.template operator()<1>(i, p);
    }
  }
};

// Dense data with channel stride 1: `rows` rows of C channels, C % VEC == 0. Thread x owns
// channels [g * VEC, g * VEC + VEC) of every row it visits; y walks the rows.
template <int VEC, typename acc_t, typename Op, typename Src>
struct RowsKernel {
  using index_t = int64_t;
  Op op;
  Src src;
  acc_t* scale_out;
  index_t rows, C;

  FN_HD void operator()(const ThreadIdx& t) const {
    const index_t g = static_cast<index_t>(t.block.x) * t.block_dim.x + t.thread.x;
    if (g * VEC >= C) return;
    ChannelParams<acc_t> p[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) p[j] = src(g * VEC + j);
    if (scale_out != nullptr && t.block.y == 0 && t.thread.y == 0) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) scale_out[g * VEC + j] = p[j].scale;
    }
    const index_t row_stride = static_cast<index_t>(t.grid.y) * t.block_dim.y;
    for (index_t r = static_cast<index_t>(t.block.y) * t.block_dim.y + t.thread.y; r < rows;
         r += row_stride) {
      op.template operator()<VEC>(r * C + g * VEC, p);
    }
  }
};

constexpr int kMaxStridedDims = 8;

// Sizes and strides (in elements) of an N-d iteration, outermost dimension first; the
// output is written in this order, so consecutive threads write consecutive addresses.
struct StridedGeometry {
  int ndim;
  int channel_dim;  // position of dim 1 of the tensor in this order
  int64_t sizes[kMaxStridedDims];
  int64_t in_strides[kMaxStridedDims];
  int64_t out_strides[kMaxStridedDims];
};

template <typename scalar_t, typename acc_t, bool kShift, typename Src>
struct StridedKernel {
  const scalar_t* in;
  scalar_t* out;
  Src src;
  acc_t* scale_out;
  StridedGeometry geo;
  int64_t numel, C;

  FN_HD void operator()(const ThreadIdx& t) const {
    write_scales(t, src, C, scale_out);
    const int64_t tid = static_cast<int64_t>(t.block.x) * t.block_dim.x + t.thread.x;
    const int64_t stride = static_cast<int64_t>(t.grid.x) * t.block_dim.x;
    int64_t cached_c = -1;
    ChannelParams<acc_t> p{};
    for (int64_t k = tid; k < numel; k += stride) {
      int64_t rem = k, in_off = 0, out_off = 0, c = 0;
#pragma unroll
      for (int d = kMaxStridedDims - 1; d >= 0; --d) {
        if (d < geo.ndim) {
          const int64_t coord = rem % geo.sizes[d];
          rem /= geo.sizes[d];
          in_off += coord * geo.in_strides[d];
          out_off += coord * geo.out_strides[d];
          if (d == geo.channel_dim) c = coord;
        }
      }
      if (c != cached_c) {
        p = src(c);
        cached_c = c;
      }
      out[out_off] = AffineOp<scalar_t, acc_t, kShift>::apply1(in[in_off], p);
    }
  }
};

}  // namespace frozennorm::cuda
