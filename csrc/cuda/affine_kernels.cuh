// The kernels of the frozen affine map on CUDA, host/device functors (device_support.cuh):
//
//  * ParamsKernel  — the forward's first launch: every channel's scale = weight /
//    sqrt(var + eps), rounded once in acc_t (the forward's second output), and the channel's
//    {mean, scale, shift} in a table that the second launch reads: the per-channel values
//    are computed once per call, and the element kernels read a channel's with one 16-byte
//    load (from L1, after the first).
//  * PlanesKernel  — dense data whose channels are planes of `plane` > 1 consecutive
//    elements (NCHW, and any dense layout with something inside C): flat vectors; the
//    channel of flat index i is (i / plane) % C, followed element by element where a vector
//    straddles two (or, for planes smaller than a vector, more) planes; then the numel % VEC
//    tail.
//  * RowsKernel    — dense data with channel stride 1 (channels_last, channels_last_3d,
//    (N, C)): rows of C channels, C % VEC == 0; a thread owns VEC channels, loads their
//    parameters once and walks down the rows.
//  * StridedKernel — anything else (sliced views, expanded gradients): each output element
//    (the output is dense) gathers its input from the offset of its N-d index.
//
// "plane" is one name for one quantity: the number of consecutive elements of one channel in
// a dense tensor, its stride(1).
//
// The three element kernels run an Op (AffineOp below; the fused epilogues in
// act_kernels.cuh) Op::kUnroll vectors per thread and step, every load issued before the
// first store (unrolled_step; the strided kernel's own loop), so that enough bytes are in
// flight: 64 per thread with 16-byte vectors (SiLU: 16 or 32, act_kernels.cuh). An Op
// provides
//   using acc_t;                                         the compute type
//   static constexpr int kUnroll;                        vectors per thread and step
//   template <int VEC> struct Regs;                      one vector's registers
//   template <int VEC, class I> void load(I i, Regs<VEC>&) const    elements [i, i + VEC)
//   template <int VEC> void apply(Regs<VEC>&, int j, const ChannelParams<acc_t>&) const
//   template <int VEC, class I> void store(I i, const Regs<VEC>&) const
// (in the StridedKernel, load's i is the input offset and store's the output offset).
#pragma once

#include "device_support.cuh"

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace frozennorm::cuda {

template <typename acc_t>
struct ChannelParams {
  acc_t mean, scale, shift;
};

// One channel's entry of the forward's parameter table: {mean, scale, shift, 0}.
template <typename acc_t>
using ParamsEntry = Pack<acc_t, 4>;

// Dtype tag of a statistics vector, read with a uniform branch instead of one kernel
// instantiation per statistics dtype.
enum class StatType : int8_t { kFloat, kDouble, kHalf, kBFloat16 };

template <typename acc_t>
FROZENNORM_HD acc_t load_stat(const void* p, StatType t, int64_t c) {
  switch (t) {
    case StatType::kFloat:
      return static_cast<acc_t>(load1(static_cast<const float*>(p) + c));
    case StatType::kDouble:
      return static_cast<acc_t>(load1(static_cast<const double*>(p) + c));
    case StatType::kHalf:
      return static_cast<acc_t>(static_cast<float>(load1(static_cast<const c10::Half*>(p) + c)));
    default:
      return static_cast<acc_t>(static_cast<float>(load1(static_cast<const c10::BFloat16*>(p) + c)));
  }
}

// One step of a thread's walk over dense data: the items base + k * spacing (k < UNROLL)
// below `end`, each a vector at element offset at(item), all loaded before the first is
// applied (apply(regs, offset)) and stored back at its offset.
template <int VEC, int UNROLL, typename Op, typename index_t, typename At, typename Apply>
FROZENNORM_HD void unrolled_step(const Op& op, index_t base, index_t spacing, index_t end,
                                 const At& at, const Apply& apply) {
  typename Op::template Regs<VEC> r[UNROLL];
  index_t offset[UNROLL];
#pragma unroll
  for (int k = 0; k < UNROLL; ++k) {
    const index_t item = base + k * spacing;
    offset[k] = at(item);
    if (item < end) op.template load<VEC>(offset[k], r[k]);
  }
#pragma unroll
  for (int k = 0; k < UNROLL; ++k) {
    if (base + k * spacing < end) {
      apply(r[k], offset[k]);
      op.template store<VEC>(offset[k], r[k]);
    }
  }
}

// The frozen statistics (weight and bias may be null: affine=False).
template <typename acc_t>
struct StatsSource {
  const void* weight;
  const void* bias;
  const void* mean;
  const void* var;
  StatType type;
  acc_t eps;

  FROZENNORM_HD ChannelParams<acc_t> operator()(int64_t c) const {
    const acc_t w = weight != nullptr ? load_stat<acc_t>(weight, type, c) : acc_t(1);
    ChannelParams<acc_t> p;
    p.scale = w / sqrt_rn(load_stat<acc_t>(var, type, c) + eps);
    p.mean = load_stat<acc_t>(mean, type, c);
    p.shift = bias != nullptr ? load_stat<acc_t>(bias, type, c) : acc_t(0);
    return p;
  }
};

// Grid-stride over the channels: scale_out[c] and (unless null: an empty input) table[c].
template <typename acc_t>
struct ParamsKernel {
  static constexpr const char* kName = "params";
  static constexpr int kVec = 1, kUnroll = 1, kIndexBits = 64;
  StatsSource<acc_t> stats;
  acc_t* scale_out;
  ParamsEntry<acc_t>* table;
  int64_t C;

  FROZENNORM_HD void operator()(const ThreadIdx& t) const {
    const int64_t step = static_cast<int64_t>(t.grid.x) * t.block_dim.x;
    for (int64_t c = static_cast<int64_t>(t.block.x) * t.block_dim.x + t.thread.x; c < C; c += step) {
      const ChannelParams<acc_t> p = stats(c);
      store1(scale_out + c, p.scale);
      if (table != nullptr) store_pack<acc_t, 4>(table[c].v, {{p.mean, p.scale, p.shift, acc_t(0)}});
    }
  }
};

// The forward's parameters, from ParamsKernel's table.
template <typename acc_t>
struct TableSource {
  const ParamsEntry<acc_t>* table;

  template <typename index_t>
  FROZENNORM_HD ChannelParams<acc_t> operator()(index_t c) const {
    const ParamsEntry<acc_t> e = load_pack<acc_t, 4>(table[c].v);
    return {e.v[0], e.v[1], e.v[2]};
  }
};

// The backward's parameters: the per-channel scale the forward returned.
template <typename acc_t>
struct ScaleSource {
  const acc_t* scale;

  template <typename index_t>
  FROZENNORM_HD ChannelParams<acc_t> operator()(index_t c) const {
    return {acc_t(0), load1(scale + c), acc_t(0)};
  }
};

// out = (in - mean) * scale + shift (kShift: the forward, one rounding of an FMA) or
// out = in * scale (the backward).
template <typename scalar_t, typename acc_t_, bool kShift>
struct AffineOp {
  using acc_t = acc_t_;
  static constexpr int kUnroll = 4;
  const scalar_t* in;
  scalar_t* out;

  template <int VEC>
  struct Regs {
    Pack<scalar_t, VEC> x, y;
  };

  template <int VEC, typename index_t>
  FROZENNORM_HD void load(index_t i, Regs<VEC>& r) const {
    r.x = load_pack<scalar_t, VEC>(in + i);
  }

  template <int VEC>
  FROZENNORM_HD void apply(Regs<VEC>& r, int j, const ChannelParams<acc_t>& p) const {
    const acc_t v = static_cast<acc_t>(r.x.v[j]);
    if constexpr (kShift) {
      r.y.v[j] = static_cast<scalar_t>(fma_rn(v - p.mean, p.scale, p.shift));
    } else {
      r.y.v[j] = static_cast<scalar_t>(v * p.scale);
    }
  }

  template <int VEC, typename index_t>
  FROZENNORM_HD void store(index_t i, const Regs<VEC>& r) const {
    store_pack<scalar_t, VEC>(out + i, r.y);
  }
};

// Dense data, channel planes of plane.d > 1 elements, C channels.
template <int VEC, int UNROLL, typename index_t, typename Op, typename Src>
struct PlanesKernel {
  static constexpr const char* kName = "planes";
  static constexpr int kVec = VEC, kUnroll = UNROLL, kIndexBits = 8 * sizeof(index_t);
  using P = ChannelParams<typename Op::acc_t>;
  Op op;
  Src src;
  index_t numel, C;
  Divider<index_t> plane;
  Divider<index_t> channels;  // by C

  FROZENNORM_HD void operator()(const ThreadIdx& t) const {
    const index_t nvec = numel / VEC;
    const index_t threads = t.block_dim.x;
    const index_t step = static_cast<index_t>(t.grid.x) * threads * UNROLL;
    for (index_t base = static_cast<index_t>(t.block.x) * threads * UNROLL + t.thread.x; base < nvec;
         base += step) {
      unrolled_step<VEC, UNROLL>(
          op, base, threads, nvec, [](index_t v) { return v * VEC; },
          [&](auto& r, index_t i) { apply<VEC>(i, r); });
    }
    if constexpr (VEC > 1) {  // the numel % VEC elements after the last whole vector
      const index_t i = nvec * VEC + static_cast<index_t>(t.block.x) * threads + t.thread.x;
      if (i < numel) {
        typename Op::template Regs<1> r;
        op.template load<1>(i, r);
        apply<1>(i, r);
        op.template store<1>(i, r);
      }
    }
  }

  // Applies the op to the N elements from flat index i, each with its channel's parameters.
  template <int N, typename R>
  FROZENNORM_HD void apply(index_t i, R& r) const {
    const index_t q = plane.div(i);  // plane (n, c) of element i
    index_t pos = i - q * plane.d;   // its position in that plane
    index_t c = q - channels.div(q) * C;
    P p = src(c);
    if (pos + N <= plane.d) {
#pragma unroll
      for (int j = 0; j < N; ++j) op.template apply<N>(r, j, p);
    } else {  // the vector runs into the next plane(s)
#pragma unroll
      for (int j = 0; j < N; ++j) {
        op.template apply<N>(r, j, p);
        if (j + 1 < N && ++pos == plane.d) {
          pos = 0;
          c = c + 1 == C ? 0 : c + 1;
          p = src(c);
        }
      }
    }
  }
};

// Dense data with channel stride 1: `rows` rows of C channels, C % VEC == 0. Thread x owns
// channels [first, first + VEC) of every row it visits; y walks the rows.
template <int VEC, int UNROLL, typename index_t, typename Op, typename Src>
struct RowsKernel {
  static constexpr const char* kName = "rows";
  static constexpr int kVec = VEC, kUnroll = UNROLL, kIndexBits = 8 * sizeof(index_t);
  Op op;
  Src src;
  index_t rows, C;

  FROZENNORM_HD void operator()(const ThreadIdx& t) const {
    const index_t first = (static_cast<index_t>(t.block.x) * t.block_dim.x + t.thread.x) * VEC;
    if (first >= C) return;
    ChannelParams<typename Op::acc_t> p[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) p[j] = src(first + j);
    const index_t threads = t.block_dim.y;
    const index_t step = static_cast<index_t>(t.grid.y) * threads * UNROLL;
    for (index_t base = static_cast<index_t>(t.block.y) * threads * UNROLL + t.thread.y; base < rows;
         base += step) {
      unrolled_step<VEC, UNROLL>(
          op, base, threads, rows, [&](index_t row) { return row * C + first; },
          [&](auto& r, index_t) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) op.template apply<VEC>(r, j, p[j]);
          });
    }
  }
};

constexpr int kMaxStridedDims = 8;

// An N-d iteration over a dense output, outermost dimension first (so element e of the
// iteration is the output's element at offset e): each dimension's size (as a divider) and
// the input's stride along it. NDIM dimensions exactly (a shorter iteration is padded with
// size-1 dimensions on the outer side), so that the index math unrolls without tests.
template <int NDIM, typename index_t>
struct StridedGeometry {
  int channel_dim;  // the position of the tensor's dim 1 in this order; -1 if dropped (C == 1)
  Divider<index_t> sizes[NDIM];
  index_t in_strides[NDIM];

  // The input offset of iteration element e, and its channel.
  FROZENNORM_HD index_t offset(index_t e, index_t& channel) const {
    index_t rem = e, off = 0;
    channel = 0;
#pragma unroll
    for (int d = NDIM - 1; d > 0; --d) {
      const index_t q = sizes[d].div(rem);
      const index_t coord = rem - q * sizes[d].d;
      off += coord * in_strides[d];
      if (d == channel_dim) channel = coord;
      rem = q;
    }
    if (channel_dim == 0) channel = rem;  // the outermost coordinate needs no division
    return off + rem * in_strides[0];
  }
};

template <int NDIM, int UNROLL, typename index_t, typename Op, typename Src>
struct StridedKernel {
  static constexpr const char* kName = "strided";
  static constexpr int kVec = 1, kUnroll = UNROLL, kIndexBits = 8 * sizeof(index_t), kDims = NDIM;
  Op op;
  Src src;
  StridedGeometry<NDIM, index_t> geo;
  index_t numel;

  FROZENNORM_HD void operator()(const ThreadIdx& t) const {
    const index_t threads = t.block_dim.x;
    const index_t step = static_cast<index_t>(t.grid.x) * threads * UNROLL;
    for (index_t base = static_cast<index_t>(t.block.x) * threads * UNROLL + t.thread.x; base < numel;
         base += step) {
      typename Op::template Regs<1> r[UNROLL];
      index_t channel[UNROLL];
#pragma unroll
      for (int k = 0; k < UNROLL; ++k) {
        const index_t e = base + k * threads;
        if (e < numel) op.template load<1>(geo.offset(e, channel[k]), r[k]);
      }
#pragma unroll
      for (int k = 0; k < UNROLL; ++k) {
        const index_t e = base + k * threads;
        if (e < numel) {
          op.template apply<1>(r[k], 0, src(channel[k]));
          op.template store<1>(e, r[k]);
        }
      }
    }
  }
};

}  // namespace frozennorm::cuda
