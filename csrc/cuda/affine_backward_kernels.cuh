// The kernels of frozen_bn_affine_backward on CUDA (host/device functors, device_support.cuh):
// in one pass over grad_output, saved and input, the input's and the residual's gradients
// (ActGrad's rule: ga = round(grad * act'(saved)), grad_input = round(ga * scale)) and, per
// channel, the sums of ga and of ga * (input - mean); no floating-point atomics, so the sums
// are the same bits run to run, whatever the order in which the blocks run:
//
//  * SumPlanesKernel — dense data whose channels are planes of `plane` > 1 elements (NCHW,
//    1d, 3d): block b owns channel b / chunks and one chunk of that channel's vectors (the
//    plane divisible by the vector width, so that no vector straddles two planes); each
//    thread sums its elements in sequence, then the block adds its 256 threads' sums in a
//    fixed tree (BlockSums) into one row of partials.
//  * SumRowsKernel   — dense data with channel stride 1 (channels-last, (N, C)): block b owns
//    a tile of bx x VEC channels by a chunk of rows; a thread keeps one sum per lane (each
//    lane one channel) down its rows, and the block adds its by threads' sums of each
//    channel in sequence.
//  * SumReduceKernel — the second launch: block c adds channel c's partials (one row per
//    chunk) in a fixed order into sum_grad[c] and sum_centered[c].
//
// The partition is a function of the shape and the vector width alone (never of the
// device's size), so the sums are the same bits on any GPU for the same input and
// alignment. The accuracy contract (tests/test_affine_backward.py's depth bound): a thread
// adds at most kMaxSumDepth terms in sequence per sum, the block at most 256 thread sums
// (rows; planes: 8 then 32), the reduction rows / 256 then 8 then 32.
//
// These kernels are block-cooperative: kPhases phases separated by a barrier, sharing
// K::Shared (device_support.cuh).
#pragma once

#include "../rules.h"
#include "act_kernels.cuh"
#include "launch.h"

namespace frozennorm::cuda {

// Terms a thread adds in sequence to one sum, at most.
constexpr int64_t kMaxSumDepth = 1024;
// Blocks a launch aims for (where the data allows): a constant, not the device's size, so
// that the partition, and the sums' bits, depend on the shape alone...
constexpr int64_t kSumTargetBlocks = 1024;
// ...but fewer where a thread would get fewer vectors (planes) or rows than this.
constexpr int64_t kMinSumSteps = 2;

// ga, grad_input and grad_residual of VEC elements, and their terms added to the sums.
// saved is null for the identity; grad_input and grad_residual may be null (uniform
// branches: one kernel for every combination). kUnroll: the vectors per thread and step of
// the planes kernel with 32-bit index math; the rows kernel (one sum per lane) and 64-bit
// index math take one, to stay within 96 registers (.ci/cuda_static_check.py).
template <typename scalar_t, typename acc_t_, Activation kAct>
struct AffineBackwardOp {
  using acc_t = acc_t_;
  static constexpr int kUnroll = kActUnroll<kAct>;
  const scalar_t* grad;
  const scalar_t* input;
  const scalar_t* saved;
  scalar_t* grad_input;
  scalar_t* grad_residual;

  template <int VEC>
  struct Regs {
    Pack<scalar_t, VEC> g, s, x, ga, gi;
  };

  template <int VEC, typename index_t>
  FROZENNORM_HD void load(index_t i, Regs<VEC>& r) const {
    r.g = load_pack<scalar_t, VEC>(grad + i);
    if constexpr (kAct != Activation::kIdentity) r.s = load_pack<scalar_t, VEC>(saved + i);
    r.x = load_pack<scalar_t, VEC>(input + i);
  }

  // Lane j with its channel's mean and scale: the outputs, and the sums' terms added.
  template <int VEC>
  FROZENNORM_HD void apply(Regs<VEC>& r, int j, acc_t mean, acc_t scale, acc_t& sum_g,
                           acc_t& sum_gx) const {
    if constexpr (kAct == Activation::kIdentity) {
      r.ga.v[j] = r.g.v[j];
    } else {
      r.ga.v[j] = static_cast<scalar_t>(
          act_backward<kAct, ScalarMath>(static_cast<acc_t>(r.g.v[j]), static_cast<acc_t>(r.s.v[j])));
    }
    const acc_t ga = static_cast<acc_t>(r.ga.v[j]);
    r.gi.v[j] = static_cast<scalar_t>(ga * scale);
    sum_g += ga;
    sum_gx = fma_rn(ga, static_cast<acc_t>(r.x.v[j]) - mean, sum_gx);
  }

  template <int VEC, typename index_t>
  FROZENNORM_HD void store(index_t i, const Regs<VEC>& r) const {
    if (grad_input != nullptr) store_pack<scalar_t, VEC>(grad_input + i, r.gi);
    if (grad_residual != nullptr) store_pack<scalar_t, VEC>(grad_residual + i, r.ga);
  }
};

// A block's two sums (of ga, of ga * (x - mean)) over its kThreads threads, in a fixed tree:
// phase A every thread puts its pair; phase B threads 0..31 add 8 pairs each in sequence;
// phase C thread 0 adds those 32 in sequence.
template <typename acc_t>
struct BlockSums {
  static constexpr int kFirst = kThreads / 32;
  acc_t g[kThreads], gx[kThreads];
  acc_t g32[32], gx32[32];

  FROZENNORM_HD void put(uint32_t tid, acc_t sum_g, acc_t sum_gx) {
    g[tid] = sum_g;
    gx[tid] = sum_gx;
  }
  FROZENNORM_HD void fold(uint32_t tid) {
    if (tid >= 32) return;
    acc_t a = g[tid * kFirst], b = gx[tid * kFirst];
#pragma unroll
    for (int j = 1; j < kFirst; ++j) {
      a += g[tid * kFirst + j];
      b += gx[tid * kFirst + j];
    }
    g32[tid] = a;
    gx32[tid] = b;
  }
  // (thread 0's)
  FROZENNORM_HD void total(acc_t& sum_g, acc_t& sum_gx) const {
    sum_g = g32[0];
    sum_gx = gx32[0];
#pragma unroll 8
    for (int j = 1; j < 32; ++j) {
      sum_g += g32[j];
      sum_gx += gx32[j];
    }
  }
};

FROZENNORM_HD uint32_t flat_thread(const ThreadIdx& t) {
  return t.thread.y * t.block_dim.x + t.thread.x;
}

// Dense planes: block b sums channel c = b / chunks over vectors [chunk * chunk_vecs,
// + chunk_vecs) of the channel's channel_vecs (its outer x plane elements / VEC, in order
// of the outer index, then the position in the plane); its partials go to row `chunk`:
// partials[chunk * 2C + c] (ga) and [chunk * 2C + C + c] (ga * (x - mean)). Blocks of
// kThreads x 1.
template <int VEC, int UNROLL, typename index_t, typename Op>
struct SumPlanesKernel {
  static constexpr const char* kName = "sum-planes";
  static constexpr int kVec = VEC, kUnroll = UNROLL, kIndexBits = 8 * sizeof(index_t);
  static constexpr int kPhases = 3;
  using acc_t = typename Op::acc_t;
  using Shared = BlockSums<acc_t>;
  Op op;
  const acc_t* mean;
  const acc_t* scale;
  acc_t* partials;
  index_t C, chunks, chunk_vecs, channel_vecs;
  Divider<index_t> plane_vecs;  // by plane / VEC

  template <int P>
  FROZENNORM_HD void phase(const ThreadIdx& t, Shared& shared) const {
    const index_t c = static_cast<index_t>(t.block.x) / chunks;
    const index_t chunk = static_cast<index_t>(t.block.x) - c * chunks;
    if constexpr (P == 0) {
      const acc_t m = load1(mean + c), s = load1(scale + c);
      const index_t begin = chunk * chunk_vecs;
      const index_t end = begin + chunk_vecs < channel_vecs ? begin + chunk_vecs : channel_vecs;
      const index_t threads = t.block_dim.x;
      // vector v of the channel: outer index o = v / (plane / VEC), element
      // ((o * C + c) * plane / VEC + v - o * plane / VEC) * VEC
      const index_t gap = (C - 1) * plane_vecs.d;
      const index_t first = c * plane_vecs.d;
      acc_t sum_g(0), sum_gx(0);
      for (index_t base = begin + t.thread.x; base < end; base += threads * kUnroll) {
        unrolled_step<VEC, kUnroll>(
            op, base, threads, end,
            [&](index_t v) { return (v + plane_vecs.div(v) * gap + first) * VEC; },
            [&](auto& r, index_t) {
#pragma unroll
              for (int j = 0; j < VEC; ++j) op.template apply<VEC>(r, j, m, s, sum_g, sum_gx);
            });
      }
      shared.put(t.thread.x, sum_g, sum_gx);
    } else if constexpr (P == 1) {
      shared.fold(t.thread.x);
    } else if (t.thread.x == 0) {
      acc_t sum_g, sum_gx;
      shared.total(sum_g, sum_gx);
      acc_t* row = partials + chunk * 2 * C;
      store1(row + c, sum_g);
      store1(row + C + c, sum_gx);
    }
  }
};

// The block sums of SumRowsKernel: per thread (y, x), its VEC lanes' two sums.
template <typename acc_t, int VEC>
struct RowSums {
  acc_t v[2][kThreads * VEC];
};

// Dense rows of C channels, C % VEC == 0: block b owns channel tile b % tiles (bx x VEC
// channels; thread x the VEC from (tile * bx + x) * VEC) and rows [chunk * chunk_rows,
// + chunk_rows) for chunk = b / tiles, thread y every by-th of them; its partials go to row
// `chunk`.
template <int VEC, int UNROLL, typename index_t, typename Op>
struct SumRowsKernel {
  static constexpr const char* kName = "sum-rows";
  static constexpr int kVec = VEC, kUnroll = UNROLL, kIndexBits = 8 * sizeof(index_t);
  static constexpr int kPhases = 2;
  using acc_t = typename Op::acc_t;
  using Shared = RowSums<acc_t, VEC>;
  Op op;
  const acc_t* mean;
  const acc_t* scale;
  acc_t* partials;
  index_t rows, C, tiles, chunk_rows;

  template <int P>
  FROZENNORM_HD void phase(const ThreadIdx& t, Shared& shared) const {
    const index_t chunk = static_cast<index_t>(t.block.x) / tiles;
    const index_t tile = static_cast<index_t>(t.block.x) - chunk * tiles;
    const index_t width = static_cast<index_t>(t.block_dim.x) * VEC;  // the tile's channels
    if constexpr (P == 0) {
      acc_t sum_g[VEC], sum_gx[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum_g[j] = sum_gx[j] = acc_t(0);
      const index_t first = tile * width + t.thread.x * VEC;
      if (first < C) {
        acc_t m[VEC], s[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          m[j] = load1(mean + first + j);
          s[j] = load1(scale + first + j);
        }
        const index_t begin = chunk * chunk_rows;
        const index_t end = begin + chunk_rows < rows ? begin + chunk_rows : rows;
        const index_t threads = t.block_dim.y;
        for (index_t base = begin + t.thread.y; base < end; base += threads * kUnroll) {
          unrolled_step<VEC, kUnroll>(
              op, base, threads, end, [&](index_t row) { return row * C + first; },
              [&](auto& r, index_t) {
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                  op.template apply<VEC>(r, j, m[j], s[j], sum_g[j], sum_gx[j]);
                }
              });
        }
      }
      const index_t at = t.thread.y * width + t.thread.x * VEC;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        shared.v[0][at + j] = sum_g[j];
        shared.v[1][at + j] = sum_gx[j];
      }
    } else {
      // column (which, lane): the sum of one of the tile's channels over the block's threads y
      acc_t* row = partials + chunk * 2 * C;
      const index_t by = t.block_dim.y;
      for (index_t col = flat_thread(t); col < 2 * width; col += kThreads) {
        const index_t which = col >= width;
        const index_t lane = col - which * width;
        const index_t channel = tile * width + lane;
        if (channel >= C) continue;
        acc_t sum = shared.v[which][lane];
        for (index_t y = 1; y < by; ++y) sum += shared.v[which][y * width + lane];
        store1(row + which * C + channel, sum);
      }
    }
  }
};

// The second launch: block c adds channel c's partials of `rows` rows in a fixed order
// (thread t rows t, t + kThreads, ... in sequence, then BlockSums' tree).
template <typename acc_t>
struct SumReduceKernel {
  static constexpr const char* kName = "sum-reduce";
  static constexpr int kVec = 1, kUnroll = 1, kIndexBits = 64;
  static constexpr int kPhases = 3;
  using Shared = BlockSums<acc_t>;
  const acc_t* partials;
  acc_t* sum_grad;
  acc_t* sum_centered;
  int64_t rows, C;

  template <int P>
  FROZENNORM_HD void phase(const ThreadIdx& t, Shared& shared) const {
    const int64_t c = t.block.x;
    if constexpr (P == 0) {
      acc_t g(0), gx(0);
      for (int64_t r = t.thread.x; r < rows; r += t.block_dim.x) {
        g += load1(partials + r * 2 * C + c);
        gx += load1(partials + r * 2 * C + C + c);
      }
      shared.put(t.thread.x, g, gx);
    } else if constexpr (P == 1) {
      shared.fold(t.thread.x);
    } else if (t.thread.x == 0) {
      acc_t g, gx;
      shared.total(g, gx);
      store1(sum_grad + c, g);
      store1(sum_centered + c, gx);
    }
  }
};

}  // namespace frozennorm::cuda
