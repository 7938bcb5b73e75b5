// The backward when the affine parameters (or the statistics) train, on the CPU (per
// capability; see channel_walk.h): in one pass over grad_output, saved and input, the input's
// and the residual's gradients (those of frozen_bn_act_backward: ActGrad's ga, times the
// scale) and, per channel, the sums of ga and of ga * (input - mean).
//
// The sums are the same bits whatever the number of threads: the tensor, [outer, C, inner] in
// flat memory, is cut into tiles whose extents depend on its shape alone (Tiles); a tile sums
// each of its channels into one partial (vector lanes, then across the lanes), the threads
// share out whole tiles, and a channel's partials are then added in a fixed pairwise order.
// An accumulator adds at most kMaxDepth values in sequence (2 kMaxDepth in float64 with 4
// lanes), so the error stays within ~(kMaxDepth + log2 of the number of tiles) roundings of
// the sum of |terms|, where one running sum over a channel's n values would make it ~n.
#pragma once

#include "act_kernel.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>

namespace frozennorm::cpu {
namespace CPU_CAPABILITY {

// A tile holds about this many elements (a parallel grain of its own)...
constexpr int64_t kTileElements = 1 << 15;
// ...of at most this many values per accumulator in sequence...
constexpr int64_t kMaxDepth = 1 << 10;
// ...and a plane's run in a tile is at most this long (kMaxDepth per lane of an 8-lane
// float vector, the narrowest build's).
constexpr int64_t kMaxRun = kMaxDepth * 8;
// Channels-last rows are summed this many at a time in registers, then into the partials
// (one load and store of the partials per kRowBlock rows, not per row).
constexpr int64_t kRowBlock = 4;
// Plane runs are a multiple of this many elements (a whole number of streaming-store widths
// for every dtype), so that runs start as aligned as their planes do.
constexpr int64_t kRunMultiple = 32;

constexpr int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The partition of a [outer, C, inner] tensor into tiles of outer_step outer indices x
// channel_step channels x inner_step inner positions: a function of the shape alone. Each
// tile writes the partial sums of its channels into one row of partials, shared with the
// tiles of the same outer and inner ranges (the other channel blocks): a row holds the 2 C
// values [sum of ga per channel, sum of ga * (input - mean) per channel].
struct Tiles {
  int64_t outer, C, inner;
  int64_t outer_step, channel_step, inner_step;
  int64_t outer_tiles, channel_tiles, inner_tiles;

  Tiles(int64_t numel, int64_t C_, int64_t inner_) : C(C_), inner(inner_) {
    outer = numel / (C * inner);
    // about equal runs of at most kMaxRun, a multiple of kRunMultiple where the planes are
    inner_step = std::min(inner, ceil_div(ceil_div(inner, ceil_div(inner, kMaxRun)), kRunMultiple) *
                                     kRunMultiple);
    const int64_t cross_section = inner_step * C;  // one outer index, every channel
    // several outer indices where they are small (channels-last rows: inner_step == 1), but
    // at most kMaxDepth values of a channel (the element-by-element path adds them in turn)
    outer_step = std::clamp<int64_t>(
        std::min(kTileElements / cross_section, kMaxDepth / inner_step), 1, outer);
    channel_step = cross_section <= kTileElements
        ? C : std::clamp<int64_t>(kTileElements / inner_step, 1, C);
    outer_tiles = ceil_div(outer, outer_step);
    channel_tiles = ceil_div(C, channel_step);
    inner_tiles = ceil_div(inner, inner_step);
  }
  int64_t count() const {
    return outer_tiles * channel_tiles * inner_tiles;
  }
  int64_t rows() const {
    return outer_tiles * inner_tiles;
  }
  int64_t elements() const {
    return outer_step * channel_step * inner_step;
  }
};

// Per element: the outputs, and the terms added to the sums.
template <typename scalar_t, typename acc_t_, Activation kAct>
struct AffineBackwardOp {
  using acc_t = acc_t_;
  using IO = VecIO<scalar_t, acc_t>;
  using V = typename IO::AccVec;
  using Grad = ActGrad<scalar_t, acc_t, kAct>;
  static constexpr int kParts = IO::kParts;

  const scalar_t* grad;
  const scalar_t* input;
  const scalar_t* saved;
  scalar_t* grad_input;     // may be null
  scalar_t* grad_residual;  // may be null

  FROZENNORM_ALWAYS_INLINE void scalar(int64_t k, acc_t m, acc_t s, acc_t& sum_g,
                                       acc_t& sum_gx) const {
    const acc_t ga = Grad::scalar(grad, saved, k);
    if (grad_residual != nullptr) grad_residual[k] = static_cast<scalar_t>(ga);
    if (grad_input != nullptr) grad_input[k] = static_cast<scalar_t>(ga * s);
    sum_g += ga;
    sum_gx = fma_scalar(ga, static_cast<acc_t>(input[k]) - m, sum_gx);
  }

  // Whether the outputs at flat offset k are aligned for streaming stores.
  bool aligned(int64_t k) const {
    return (grad_input == nullptr || aligned_at(grad_input + k)) &&
        (grad_residual == nullptr || aligned_at(grad_residual + k));
  }

  // IO::kStep elements at k, the terms added lane by lane; with kMasked only the lanes set in
  // `keep` add theirs (the rest: a vector that overlaps the one before). kStream: the outputs
  // with non-temporal stores (k aligned).
  template <bool kMasked, bool kStream = false>
  FROZENNORM_ALWAYS_INLINE void step(int64_t k, const V* m, const V* s, V* sum_g, V* sum_gx,
                                     const V* keep) const {
    if constexpr (IO::kVectorized) {
      V g[kParts];
      Grad::vec(grad, saved, k, g);
      if (grad_residual != nullptr) IO::template store<kStream>(grad_residual + k, g);
      if (grad_input != nullptr) {
        V out[kParts];
        for (int part = 0; part < kParts; ++part) out[part] = g[part] * s[part];
        IO::template store<kStream>(grad_input + k, out);
      }
      V x[kParts];
      IO::load(input + k, x);
      for (int part = 0; part < kParts; ++part) {
        V ga = g[part];
        V xc = x[part] - m[part];
        if constexpr (kMasked) {  // zeros, not products with zero: x may hold an inf
          ga = V::blendv(V(acc_t(0)), ga, keep[part]);
          xc = V::blendv(V(acc_t(0)), xc, keep[part]);
        }
        sum_g[part] = sum_g[part] + ga;
        sum_gx[part] = at::vec::fmadd(ga, xc, sum_gx[part]);
      }
    }
  }
};

// keep[part]: the lanes of a kStep vector at index >= first.
template <typename IO, typename V>
FROZENNORM_ALWAYS_INLINE void lanes_from(int64_t first, V* keep) {
  using acc_t = typename V::value_type;
  for (int part = 0; part < IO::kParts; ++part) {
    keep[part] = V::arange(static_cast<acc_t>(part * V::size()), acc_t(1)) >=
        V(static_cast<acc_t>(first));
  }
}

// The sum of the lanes of IO::kParts vectors, pairwise.
template <typename IO, typename V>
FROZENNORM_ALWAYS_INLINE typename V::value_type lanes_sum(const V* v) {
  V total = v[0];
  for (int part = 1; part < IO::kParts; ++part) total = total + v[part];
  typename V::value_type lanes[V::size()];
  total.store(lanes);
  for (int width = V::size() / 2; width > 0; width /= 2) {
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  }
  return lanes[0];
}

// A tile of NCHW-like planes (inner > 1): channel by channel, its runs of inner_step
// positions in each of its outer indices summed into vector lanes (a last vector that would
// be partial overlaps the one before, its repeated lanes masked), element by element where
// a run is shorter than a vector. With `stream`, the whole vectors of a run whose outputs
// start aligned are written with non-temporal stores.
template <typename Op>
void plane_tile(const Op& op, const Tiles& t, int64_t o0, int64_t o1, int64_t c0, int64_t c1,
                int64_t i0, bool stream, const typename Op::acc_t* mean,
                const typename Op::acc_t* scale, typename Op::acc_t* row) {
  using acc_t = typename Op::acc_t;
  using IO = typename Op::IO;
  using V = typename IO::AccVec;
  const int64_t n = std::min(t.inner_step, t.inner - i0);
  for (int64_t c = c0; c < c1; ++c) {
    acc_t sum_g = 0, sum_gx = 0;
    bool vectors = false;
    if constexpr (IO::kVectorized) {
      if (n >= IO::kStep) {
        vectors = true;
        V m[Op::kParts], s[Op::kParts], vg[Op::kParts], vgx[Op::kParts], keep[Op::kParts];
        for (int part = 0; part < Op::kParts; ++part) {
          m[part] = V(mean[c]);
          s[part] = V(scale[c]);
          vg[part] = vgx[part] = V(acc_t(0));
        }
        const int64_t tail = n % IO::kStep;
        if (tail != 0) lanes_from<IO>(IO::kStep - tail, keep);
        for (int64_t o = o0; o < o1; ++o) {
          const int64_t k = (o * t.C + c) * t.inner + i0;
          if (stream && op.aligned(k)) {
            for (int64_t j = 0; j + IO::kStep <= n; j += IO::kStep) {
              op.template step<false, true>(k + j, m, s, vg, vgx, keep);
            }
          } else {
            for (int64_t j = 0; j + IO::kStep <= n; j += IO::kStep) {
              op.template step<false>(k + j, m, s, vg, vgx, keep);
            }
          }
          if (tail != 0) op.template step<true>(k + n - IO::kStep, m, s, vg, vgx, keep);
        }
        sum_g = lanes_sum<IO>(vg);
        sum_gx = lanes_sum<IO>(vgx);
      }
    }
    if (!vectors) {
      for (int64_t o = o0; o < o1; ++o) {
        const int64_t k = (o * t.C + c) * t.inner + i0;
        for (int64_t j = 0; j < n; ++j) op.scalar(k + j, mean[c], scale[c], sum_g, sum_gx);
      }
    }
    row[c] = sum_g;
    row[t.C + c] = sum_gx;
  }
}

// A tile of channels-last rows (inner == 1): kRowBlock rows at a time, channels [c0, c1) as
// vectors (each lane one channel) summed in registers over those rows, then added to the
// row of partials; the last vector of a row overlaps the one before (its repeated lanes
// masked). Element by element where the channels are fewer than a vector. With `stream`,
// where every row's outputs start aligned, whole vectors use non-temporal stores.
template <typename Op>
void row_tile(const Op& op, const Tiles& t, int64_t o0, int64_t o1, int64_t c0, int64_t c1,
              bool stream, const typename Op::acc_t* mean, const typename Op::acc_t* scale,
              typename Op::acc_t* row) {
  using acc_t = typename Op::acc_t;
  using IO = typename Op::IO;
  using V = typename IO::AccVec;
  const int64_t C = t.C;
  std::fill(row + c0, row + c1, acc_t(0));
  std::fill(row + C + c0, row + C + c1, acc_t(0));
  if constexpr (IO::kVectorized) {
    const int64_t n = c1 - c0;
    if (n >= IO::kStep) {
      V keep[Op::kParts];
      const int64_t tail = n % IO::kStep;
      if (tail != 0) lanes_from<IO>(IO::kStep - tail, keep);
      auto block = [&](auto masked, auto streamed, int64_t o, int64_t rows, int64_t c) {
        V m[Op::kParts], s[Op::kParts], vg[Op::kParts], vgx[Op::kParts];
        for (int part = 0; part < Op::kParts; ++part) {
          const int64_t ch = c + part * V::size();
          m[part] = V::loadu(mean + ch);
          s[part] = V::loadu(scale + ch);
          vg[part] = vgx[part] = V(acc_t(0));
        }
        for (int64_t r = 0; r < rows; ++r) {
          op.template step<decltype(masked)::value, decltype(streamed)::value>(
              (o + r) * C + c, m, s, vg, vgx, keep);
        }
        for (int part = 0; part < Op::kParts; ++part) {
          const int64_t ch = c + part * V::size();
          (V::loadu(row + ch) + vg[part]).store(row + ch);
          (V::loadu(row + C + ch) + vgx[part]).store(row + C + ch);
        }
      };
      const bool streams = stream && op.aligned(o0 * C + c0) && op.aligned(o0 * C + c0 + C);
      for (int64_t o = o0; o < o1; o += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, o1 - o);
        for (int64_t c = c0; c + IO::kStep <= c1; c += IO::kStep) {
          if (streams) {
            block(std::false_type{}, std::true_type{}, o, rows, c);
          } else {
            block(std::false_type{}, std::false_type{}, o, rows, c);
          }
        }
        if (tail != 0) block(std::true_type{}, std::false_type{}, o, rows, c1 - IO::kStep);
      }
      return;
    }
  }
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t c = c0; c < c1; ++c) op.scalar(o * C + c, mean[c], scale[c], row[c], row[C + c]);
  }
}

// partials: `rows` rows of `width` values, added pairwise into the first in a fixed order,
// column by column: the same whatever the columns' split among threads.
template <typename acc_t>
void add_rows_pairwise(acc_t* partials, int64_t rows, int64_t width) {
  using V = Vectorized<acc_t>;
  const int64_t grain = std::max<int64_t>(V::size(), kTileElements / std::max<int64_t>(rows, 1));
  at::parallel_for(0, width, grain, [&](int64_t begin, int64_t end) {
    for (int64_t stride = 1; stride < rows; stride *= 2) {
      for (int64_t r = 0; r + stride < rows; r += 2 * stride) {
        acc_t* to = partials + r * width;
        const acc_t* from = to + stride * width;
        int64_t j = begin;
        for (; j + V::size() <= end; j += V::size()) {
          (V::loadu(to + j) + V::loadu(from + j)).store(to + j);
        }
        for (; j < end; ++j) to[j] += from[j];
      }
    }
  });
}

inline void affine_backward_impl(const AffineBackwardProblem& p) {
  const Tiles tiles(p.numel, p.C, p.inner);
  const int64_t C = p.C;
  dispatch_types(p.data_type, p.acc_type, [&](auto data_tag, auto acc_tag) {
    using scalar_t = decltype(data_tag);
    using acc_t = decltype(acc_tag);
    const auto* mean = static_cast<const acc_t*>(p.mean);
    const auto* scale = static_cast<const acc_t*>(p.scale);
    // every tile writes all of its values: no initialisation
    std::unique_ptr<acc_t[]> partials(new acc_t[tiles.rows() * 2 * C]);
    dispatch_act(p.act, /*identity_ok=*/true, [&](auto act_tag) {
      using Op = AffineBackwardOp<scalar_t, acc_t, decltype(act_tag)::value>;
      const Op op{static_cast<const scalar_t*>(p.grad), static_cast<const scalar_t*>(p.input),
                  static_cast<const scalar_t*>(p.saved), static_cast<scalar_t*>(p.grad_input),
                  static_cast<scalar_t*>(p.grad_residual)};
      const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / tiles.elements());
      // non-temporal stores for outputs too large to stay in the caches, from aligned bases
      const int64_t out_bytes = p.numel * static_cast<int64_t>(sizeof(scalar_t)) *
          ((p.grad_input != nullptr) + (p.grad_residual != nullptr));
      const bool stream = out_bytes >= kStreamBytes && op.aligned(0);
      at::parallel_for(0, tiles.count(), grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i % tiles.inner_tiles;
          const int64_t cb = i / tiles.inner_tiles % tiles.channel_tiles;
          const int64_t a = i / tiles.inner_tiles / tiles.channel_tiles;
          const int64_t o0 = a * tiles.outer_step, o1 = std::min(o0 + tiles.outer_step, tiles.outer);
          const int64_t c0 = cb * tiles.channel_step, c1 = std::min(c0 + tiles.channel_step, C);
          acc_t* row = partials.get() + (a * tiles.inner_tiles + b) * 2 * C;
          if (tiles.inner == 1) {
            row_tile(op, tiles, o0, o1, c0, c1, stream, mean, scale, row);
          } else {
            plane_tile(op, tiles, o0, o1, c0, c1, b * tiles.inner_step, stream, mean, scale, row);
          }
        }
        if (stream) stream_fence();
      });
    });
    add_rows_pairwise(partials.get(), tiles.rows(), 2 * C);
    std::memcpy(p.sum_grad, partials.get(), C * sizeof(acc_t));
    std::memcpy(p.sum_centered, partials.get() + C, C * sizeof(acc_t));
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace frozennorm::cpu
