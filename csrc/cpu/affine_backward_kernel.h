// The backward when the affine parameters (or the statistics) train, on the CPU (per
// capability; see channel_walk.h): in one pass over grad_output, saved and input, the input's
// and the residual's gradients (those of frozen_bn_act_backward: ActGrad's ga, times the
// scale) and, per channel, the sums of ga and of ga * (input - mean).
//
// The sums are the same bits whatever the number of threads: the tensor, [outer, C, inner] in
// flat memory, is cut into tiles whose extents depend on its shape, dtype and the build alone,
// never on the threads (Tiles); a tile sums each of its channels into one partial (vector
// lanes, then across the lanes), the threads share out whole tiles, and a channel's partials
// are then added in a fixed pairwise order.
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
// Plane runs are a multiple of this many elements (a whole number of streaming-store widths
// for every dtype), so that runs start as aligned as their planes do.
constexpr int64_t kRunMultiple = 32;
// A channels-last tile holds whole rows of up to this many channels (wider rows are cut into
// blocks of it: their parameters and partials, 4 values per channel, 32 KiB in float32, in
// L1 across the tile's rows)...
constexpr int64_t kRowChannels = 2048;
// ...and at least this many rows where the tensor has them (kEvenTiles may take them down to
// about 3/4 of it): each tile writes its partials (2 floats per channel) once, and the
// pairwise sum reads them back, so with 128 rows they are 1/32 of what a 16-bit tile reads.
// (Tiles of about kTileElements, 32 rows of 2048 channels cut into two blocks of 1024:
// forward + backward over the frozen op's on cls-c5/det-c5 channels-last 1.42-1.44x in
// bfloat16, 1.20x in float32; whole rows and 128 of them: 1.28-1.30x and 1.09-1.12x, in the
// same run, interleaved.)
constexpr int64_t kMinRows = 128;
// Channels-last tiles come in multiples of this many where there are as many (Tiles).
constexpr int64_t kEvenTiles = 8;
// Channels-last rows go kRowBlock at a time, a kRowBlock-th of the tile apart (each a
// sequential stream), their terms summed in registers before they are added to the partials
// (one load and store of the partials per kRowBlock rows).
// (Forward + backward over the frozen op's on the channels-last sweep shapes, geometric mean:
// 1.42x this way; 1.47-1.55x with rows one at a time in memory order, the partials loaded and
// stored per vector, or with kRowBlock adjacent rows interleaved.)
constexpr int kRowBlock = 4;

constexpr int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The partition of a [outer, C, inner] tensor into tiles of outer_step outer indices x
// channel_step channels x inner_step inner positions: a function of the shape alone (and of
// flat_rows, how many outer indices the walk takes at once, and group, its width in
// channels: both from the dtype and the build). Each tile writes the partial sums of its
// channels into one row of partials, shared with the tiles of the same outer and inner
// ranges (the other channel blocks): a row holds the 2 C values [sum of ga per channel, sum
// of ga * (input - mean) per channel].
struct Tiles {
  int64_t outer, C, inner;
  int64_t outer_step, channel_step, inner_step;
  int64_t outer_tiles, channel_tiles, inner_tiles;
  int64_t flat_rows;

  Tiles(int64_t numel, int64_t C_, int64_t inner_, int64_t flat_rows_ = 1, int64_t group = 1)
      : C(C_), inner(inner_), flat_rows(flat_rows_) {
    outer = numel / (C * inner);
    // about equal runs of at most kMaxRun, a multiple of kRunMultiple where the planes are
    inner_step = std::min(inner, ceil_div(ceil_div(inner, ceil_div(inner, kMaxRun)), kRunMultiple) *
                                     kRunMultiple);
    // one outer index, every channel (at most kRowChannels of channels-last rows)
    const int64_t row_channels = inner == 1 ? std::min(C, kRowChannels) : C;
    const int64_t cross_section = inner_step * row_channels;
    // several outer indices where they are small (channels-last rows: inner_step == 1, and
    // at least kMinRows of them), but at most kMaxDepth values of a channel (the
    // element-by-element path adds them in turn)
    const int64_t fill = kTileElements / cross_section;
    outer_step = std::clamp<int64_t>(
        std::min(inner == 1 ? std::max(fill, kMinRows) : fill, kMaxDepth / inner_step), 1, outer);
    inner_tiles = ceil_div(inner, inner_step);
    // Planes cut into several runs: one channel per tile, so that tiles in index order (the
    // inner range fastest) walk memory in order. (With a block of channels per tile, the walk
    // went from a channel's run to the next channel's, a plane apart, and came back for the
    // next range: forward + backward 1.20-1.56x the frozen op's on the large NCHW sweep
    // shapes, against 1.13-1.43x this way, interleaved; the sums are the same bits.)
    channel_step = inner_tiles > 1 ? 1
        : cross_section <= kTileElements ? row_channels
        : std::clamp<int64_t>(kTileElements / inner_step, 1, C);
    // Short planes walked flat_rows outer indices at a time (plane_tile; inner_step is then
    // inner, below kMaxDepth / flat_rows): a multiple of flat_rows of them (unless the
    // tensor or the depth bound has fewer: the rest go one at a time), and where they hold
    // more than kTileElements, a multiple of `group` channels (flat_planes' width), so that
    // no channel is left to go alone.
    if (flat_rows > 1) {
      outer_step = std::clamp<int64_t>(std::max(fill / flat_rows * flat_rows, flat_rows), 1,
                                       std::min(outer, kMaxDepth / inner_step));
      if (cross_section * outer_step > kTileElements) {
        const int64_t fits = kTileElements / (inner_step * outer_step);
        channel_step = std::clamp<int64_t>(fits / group * group, std::min(group, C), C);
      }
    }
    outer_tiles = ceil_div(outer, outer_step);
    // Channels-last row tiles, where there are kEvenTiles or more: a multiple of kEvenTiles
    // of them, of (about) equal rows, so that 1, 2, 4 or 8 threads get equal shares (13
    // tiles of 128 rows made 7 and 6 on 2 threads: forward + backward over the frozen op's
    // on cls-c5/det-c5 channels-last 1.14-1.55x -> 1.10-1.46x, interleaved).
    if (inner == 1 && outer_tiles >= kEvenTiles) {
      outer_step = ceil_div(outer, ceil_div(outer_tiles, kEvenTiles) * kEvenTiles);
      outer_tiles = ceil_div(outer, outer_step);
    }
    channel_tiles = ceil_div(C, channel_step);
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

  // IO::kStep elements at k: ga and the input, as kParts vectors each. (Callers load before
  // they store: the compiler may not move a load past a store that could alias it.)
  FROZENNORM_ALWAYS_INLINE void load(int64_t k, V* g, V* x) const {
    Grad::vec(grad, saved, k, g);
    IO::load(input + k, x);
  }

  // The outputs of IO::kStep elements at k from their ga, s: the scale per lane.
  template <bool kStream = false>
  FROZENNORM_ALWAYS_INLINE void store(int64_t k, const V* g, const V* s) const {
    if (grad_residual != nullptr) IO::template store<kStream>(grad_residual + k, g);
    if (grad_input != nullptr) {
      V out[kParts];
      for (int part = 0; part < kParts; ++part) out[part] = g[part] * s[part];
      IO::template store<kStream>(grad_input + k, out);
    }
  }

  // IO::kStep elements at k, the terms added lane by lane; with kMasked only the lanes set in
  // `keep` add theirs (the rest: a vector that overlaps the one before). kStream: the outputs
  // with non-temporal stores (k aligned).
  template <bool kMasked, bool kStream = false>
  FROZENNORM_ALWAYS_INLINE void step(int64_t k, const V* m, const V* s, V* sum_g, V* sum_gx,
                                     const V* keep) const {
    if constexpr (IO::kVectorized) {
      V g[kParts], x[kParts];
      load(k, g, x);
      store<kStream>(k, g, s);
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

// The sums of the lanes of two vectors (a run's two accumulators), in a fixed order: halves
// of halves. Float vectors on x86 reduce both at once in 256-bit registers (two 512-bit
// shuffle chains held about half of the samples on 7x7 planes; this way 32x2048x7x7
// bfloat16 went from 1.04 to 0.78 ms on one thread); otherwise each through memory.
template <typename V>
FROZENNORM_ALWAYS_INLINE void lanes_sums(const V& ta, const V& tb, typename V::value_type& sum_a,
                                         typename V::value_type& sum_b) {
  using acc_t = typename V::value_type;
#if defined(FROZENNORM_X86_SIMD)
  if constexpr (std::is_same_v<acc_t, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 za = ta, zb = tb;
    const __m256 ya = _mm256_add_ps(_mm512_castps512_ps256(za), _mm512_extractf32x8_ps(za, 1));
    const __m256 yb = _mm256_add_ps(_mm512_castps512_ps256(zb), _mm512_extractf32x8_ps(zb, 1));
#else
    const __m256 ya = ta, yb = tb;
#endif
    // [a's 4 halves' sums | b's], then pairs within each half, twice
    __m256 t = _mm256_add_ps(_mm256_permute2f128_ps(ya, yb, 0x20),
                             _mm256_permute2f128_ps(ya, yb, 0x31));
    t = _mm256_hadd_ps(t, t);
    t = _mm256_hadd_ps(t, t);
    sum_a = _mm256_cvtss_f32(t);
    sum_b = _mm_cvtss_f32(_mm256_extractf128_ps(t, 1));
    return;
  }
#endif
  for (auto [total, sum] : {std::pair<const V&, acc_t&>(ta, sum_a), {tb, sum_b}}) {
    acc_t lanes[V::size()];
    total.store(lanes);
    for (int width = V::size() / 2; width > 0; width /= 2) {
      for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
    }
    sum = lanes[0];
  }
}

// A run of one channel, [k + j, k + n) from j on, its terms summed into vector lanes (the
// parts folded into one vector, in order) as far as whole vectors go (j is left after
// them); without streaming stores (and n >= IO::kStep) a last vector that would be partial
// overlaps the one before, its repeated lanes masked (`keep`: lanes_from(kStep - n % kStep),
// from the caller), and j is left at n.
template <bool kStream, typename Op, typename V = typename Op::IO::AccVec>
FROZENNORM_ALWAYS_INLINE void run_lanes(const Op& op, int64_t k, int64_t& j, int64_t n,
                                        typename Op::acc_t m, typename Op::acc_t s,
                                        const V* keep, V& lanes_g, V& lanes_gx) {
  using acc_t = typename Op::acc_t;
  using IO = typename Op::IO;
  V vm[Op::kParts], vs[Op::kParts], vg[Op::kParts], vgx[Op::kParts];
  for (int part = 0; part < Op::kParts; ++part) {
    vm[part] = V(m);
    vs[part] = V(s);
    vg[part] = vgx[part] = V(acc_t(0));
  }
  for (; j + IO::kStep <= n; j += IO::kStep) {
    op.template step<false, kStream>(k + j, vm, vs, vg, vgx, keep);
  }
  if (!kStream && j < n) {
    op.template step<true>(k + n - IO::kStep, vm, vs, vg, vgx, keep);
    j = n;
  }
  lanes_g = vg[0];
  lanes_gx = vgx[0];
  for (int part = 1; part < Op::kParts; ++part) {
    lanes_g = lanes_g + vg[part];
    lanes_gx = lanes_gx + vgx[part];
  }
}

#if defined(FROZENNORM_X86_SIMD)
// Short planes (a horizontal sum per run would cost about as much as the run itself):
// V::size() consecutive channels' runs at a time, their lane vectors reduced together, in
// a transposition that adds the same pairs in the same order as lanes_sums does for each
// (the same bits), into one vector of per-channel sums. merge<kLevel> joins two vectors
// that each hold 2^(kLevel-1) runs' partial sums into one holding 2^kLevel runs' (halved).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMergeLevels = 4;
template <int kLevel>
FROZENNORM_ALWAYS_INLINE __m512 merge(__m512 a, __m512 b) {
  if constexpr (kLevel == 1) {  // [a's 256-bit halves summed | b's]
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
  } else if constexpr (kLevel == 2) {  // [a: 4 runs' 128-bit halves summed | b: 4 more]
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  } else {  // within 128-bit lanes: adjacent pairs, a's then b's (as hadd)
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
}
// lane 4 j + i holds run j + 4 i: back in order
FROZENNORM_ALWAYS_INLINE __m512 merged_in_order(__m512 v) {
  return _mm512_permutexvar_ps(
      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), v);
}
#else
constexpr int kMergeLevels = 3;
template <int kLevel>
FROZENNORM_ALWAYS_INLINE __m256 merge(__m256 a, __m256 b) {
  if constexpr (kLevel == 1) {  // [a's 128-bit halves summed | b's]
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  } else {  // within 128-bit lanes: adjacent pairs, a's then b's (as hadd)
    return _mm256_add_ps(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
}
// lane 4 j + i holds run j + 2 i: back in order
FROZENNORM_ALWAYS_INLINE __m256 merged_in_order(__m256 v) {
  return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
#endif

// 2^kLevel runs of n elements, `stride` apart from k, of the channels with parameters
// mean[0..], scale[0..]: their lane vectors merged (lane r: run r's lanes, partly summed).
template <int kLevel, typename Op, typename V = typename Op::IO::AccVec>
FROZENNORM_ALWAYS_INLINE void group_lanes(const Op& op, int64_t k, int64_t stride, int64_t n,
                                          const float* mean, const float* scale, const V* keep,
                                          V& lanes_g, V& lanes_gx) {
  if constexpr (kLevel == 0) {
    int64_t j = 0;
    run_lanes<false>(op, k, j, n, *mean, *scale, keep, lanes_g, lanes_gx);
  } else {
    constexpr int half = 1 << (kLevel - 1);
    V g0, gx0, g1, gx1;
    group_lanes<kLevel - 1>(op, k, stride, n, mean, scale, keep, g0, gx0);
    group_lanes<kLevel - 1>(op, k + half * stride, stride, n, mean + half, scale + half, keep,
                            g1, gx1);
    lanes_g = merge<kLevel>(g0, g1);
    lanes_gx = merge<kLevel>(gx0, gx1);
  }
}

// merge<> over 2^kLevel runs' lane vectors, stored one after another from `lanes` (as
// group_lanes merges them).
template <int kLevel, typename V>
FROZENNORM_ALWAYS_INLINE V merged(const float* lanes) {
  if constexpr (kLevel == 0) {
    return V::loadu(lanes);
  } else {
    constexpr int half = 1 << (kLevel - 1);
    return merge<kLevel>(merged<kLevel - 1, V>(lanes),
                         merged<kLevel - 1, V>(lanes + half * V::size()));
  }
}

// IO::kStep whole planes of n elements each (n >= V::size()), adjacent from flat offset k,
// of the channels with parameters mean[0..], scale[0..], walked as one flat run: n full
// vectors of IO::kStep elements, whose parts (V::size() lanes) each hold the end of at most
// one plane (n >= V::size()), that part's parameters blended across it. Short planes thus
// pay no overlapping last vector (a 7x7 plane in 16 bits: 49 elements in 2 vectors of 32,
// 64 lanes of work; here 49). Each plane's terms are summed into one lane vector, the lane
// vectors merged as group_lanes merges them, and added to sum_g[0..kStep), sum_gx[0..kStep).
// below[i]: the lanes below lane i, i = 0..V::size(). kStream: the outputs with
// non-temporal stores (k aligned: the group's n vectors are then all aligned). kRows: as
// many such groups, `stride` elements apart (the same channels of consecutive outer
// indices), walked in step: a plane's lane vector sums the terms of all kRows of its
// planes, which share its ends and its merge.
template <bool kStream, int kRows, typename Op>
void flat_planes(const Op op, int64_t k, int64_t stride, int64_t n, const float* mean,
                 const float* scale, const typename Op::IO::AccVec* below, float* sum_g,
                 float* sum_gx) {
  using IO = typename Op::IO;
  using V = typename IO::AccVec;
  constexpr int L = V::size();
  constexpr int kParts = Op::kParts;
  const V zero(0.f);
  alignas(64) float lanes_g[IO::kStep * L];
  alignas(64) float lanes_gx[IO::kStep * L];
  int64_t ch = 0;
  int64_t left = n;  // of the current plane, from the current part on
  V vm(mean[0]), vs(scale[0]), acc_g(zero), acc_gx(zero);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t at = k + j * IO::kStep;
    V g[kRows][kParts], x[kRows][kParts], s[kParts];
    for (int r = 0; r < kRows; ++r) op.load(at + r * stride, g[r], x[r]);
    for (int part = 0; part < kParts; ++part) {
      if (left > L) {  // inside the plane
        s[part] = vs;
        for (int r = 0; r < kRows; ++r) {
          acc_g = acc_g + g[r][part];
          acc_gx = at::vec::fmadd(g[r][part], x[r][part] - vm, acc_gx);
        }
        left -= L;
        continue;
      }
      // the plane ends at lane `left`: lanes before it finish its sums (zeros, not products
      // with zero, in the rest: x may hold an inf), the others start the next plane's
      const V mine = below[left];
      for (int r = 0; r < kRows; ++r) {
        const V ga = V::blendv(zero, g[r][part], mine);
        acc_g = acc_g + ga;
        acc_gx = at::vec::fmadd(ga, V::blendv(zero, x[r][part] - vm, mine), acc_gx);
      }
      acc_g.store(lanes_g + ch * L);
      acc_gx.store(lanes_gx + ch * L);
      s[part] = vs;
      if (++ch == IO::kStep) break;  // the group's end: the last part of the last vector
      vm = V(mean[ch]);
      vs = V(scale[ch]);
      if (left == L) {
        acc_g = acc_gx = zero;
        left = n;
      } else {
        s[part] = V::blendv(vs, s[part], mine);
        acc_g = V::blendv(g[0][part], zero, mine);
        acc_gx = acc_g * V::blendv(x[0][part] - vm, zero, mine);
        for (int r = 1; r < kRows; ++r) {
          const V ga = V::blendv(g[r][part], zero, mine);
          acc_g = acc_g + ga;
          acc_gx = at::vec::fmadd(ga, V::blendv(x[r][part] - vm, zero, mine), acc_gx);
        }
        left = n - (L - left);
      }
    }
    for (int r = 0; r < kRows; ++r) op.template store<kStream>(at + r * stride, g[r], s);
  }
  for (int64_t c = 0; c < IO::kStep; c += L) {
    (V::loadu(sum_g + c) + V(merged_in_order(merged<kMergeLevels, V>(lanes_g + c * L))))
        .store(sum_g + c);
    (V::loadu(sum_gx + c) + V(merged_in_order(merged<kMergeLevels, V>(lanes_gx + c * L))))
        .store(sum_gx + c);
  }
}
#endif

// Runs of one channel (NCHW-like planes, inner > 1): [k, k + n), its terms summed into
// vector lanes (run_lanes), then across them, and added to (sum_g, sum_gx). With streaming
// stores, elements before the first aligned vector and after the last whole one go one by
// one, so that no cache line takes both kinds of store. Runs shorter than a vector: element
// by element.
template <bool kStream, typename Op>
FROZENNORM_ALWAYS_INLINE void plane_run(const Op& op, int64_t k, int64_t n, typename Op::acc_t m,
                                        typename Op::acc_t s, const typename Op::IO::AccVec* keep,
                                        typename Op::acc_t& sum_g, typename Op::acc_t& sum_gx) {
  using acc_t = typename Op::acc_t;
  using IO = typename Op::IO;
  acc_t g = 0, gx = 0;
  int64_t j = 0;
  if constexpr (IO::kVectorized) {
    if (n >= IO::kStep) {
      if constexpr (kStream) {
        while (j < n && !op.aligned(k + j)) op.scalar(k + j++, m, s, g, gx);
      }
      typename IO::AccVec vg, vgx;
      run_lanes<kStream>(op, k, j, n, m, s, keep, vg, vgx);
      acc_t lanes_g, lanes_gx;
      lanes_sums(vg, vgx, lanes_g, lanes_gx);
      g += lanes_g;
      gx += lanes_gx;
    }
  }
  for (; j < n; ++j) op.scalar(k + j, m, s, g, gx);
  sum_g += g;
  sum_gx += gx;
}

// How many outer indices plane_tile walks at once: short whole planes that flat_planes takes
// without streaming stores go kFlatRows at a time (their walks in step share each plane end
// and merge: the backward of 16x2048x7x7 on one thread, float16 / bfloat16, 305-311 /
// 297-329 us one at a time -> 254-262 / 233-247 us four at a time, 16x2048x5x5 211-233 ->
// 142-154 us; the AVX2 build, whose 16 vector registers hold two rows' data, float16
// 245 us -> 223-231 us two at a time, 248-249 us four), otherwise one.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kFlatRows = 4;
#elif defined(FROZENNORM_X86_SIMD)
constexpr int kFlatRows = 2;
#endif
#if defined(FROZENNORM_X86_SIMD)
// Whether a tile's runs of n values (planes of `inner`) go as flat runs (flat_planes): whole
// planes, adjacent in memory, that a vector walk would end with an overlapping vector or
// (with `stream`) would write without non-temporal stores.
template <typename IO>
bool walks_flat(int64_t n, int64_t inner, bool stream) {
  return n == inner && n >= IO::AccVec::size() && (n % IO::kStep != 0 || stream);
}
#endif
template <typename IO>
int64_t flat_rows(int64_t inner, bool stream) {
#if defined(FROZENNORM_X86_SIMD)
  if constexpr (std::is_same_v<typename IO::AccVec::value_type, float>) {
    if (!stream && inner < kSmallPlane && walks_flat<IO>(inner, inner, stream)) return kFlatRows;
  }
#endif
  return 1;
}

// A tile of NCHW-like planes (inner > 1), in memory order: outer index by outer index,
// channel by channel, each plane's run of inner_step positions summed (plane_run) and added
// to its channel's partials. Float sums on x86 without streaming stores: whole planes of at
// least V::size() elements but not a whole number of vectors go IO::kStep channels at a time
// as one flat run (flat_planes: forward + backward of 32x2048x7x7 NCHW over the frozen
// module's, benchmarks/affine_backward.py, two runs of 3 passes each way, interleaved:
// bfloat16 1.58x, 1.72x -> 1.28x, 1.32x; float16 1.40x, 1.61x -> 1.36x, 1.36x; planes of
// 16-31 values in 16 bits, element by element before: the backward of 64x512x5x5 bfloat16
// 524 -> 106 us on 2 threads; the backward of 32x2048x8x8 bfloat16, whole vectors, was 2 %
// and 9 % slower this way in two interleaved runs, hence such planes stay below); then
// V::size() channels at a time (group_lanes: 32x2048x7x7 in 16 bits 1.63-1.67x the frozen
// op's -> 1.50-1.56x, interleaved; no change on longer planes). With `stream`, runs long
// enough to amortise their scalar ends (as channel_walk.h's) take non-temporal stores, and
// shorter whole planes go as flat runs from an aligned plane, whole vectors or not, with
// them (op forward + backward over the frozen op's, float32, 2 threads, three interleaved
// pairs each: 32x1024x14x14 1.47-1.58x -> 1.18-1.22x, 88x1024x7x7 1.51-1.65x ->
// 1.19-1.25x, 72x1024x8x8 1.44-1.52x -> 1.20-1.29x; their input gradients the same bits).
// Without `stream`, short flat planes go t.flat_rows outer indices at a time (flat_rows).
template <typename Op>
void plane_tile(const Op op, const Tiles& t, int64_t o0, int64_t o1, int64_t c0, int64_t c1,
                int64_t i0, bool stream, const typename Op::acc_t* mean,
                const typename Op::acc_t* scale, typename Op::acc_t* row) {
  using acc_t = typename Op::acc_t;
  const int64_t n = std::min(t.inner_step, t.inner - i0);
  std::fill(row + c0, row + c1, acc_t(0));
  std::fill(row + t.C + c0, row + t.C + c1, acc_t(0));
  const bool streams = stream && n >= kMinStreamRun;
  using IO = typename Op::IO;
  typename IO::AccVec keep[Op::kParts];
  if constexpr (IO::kVectorized) {
    if (n % IO::kStep != 0) lanes_from<IO>(IO::kStep - n % IO::kStep, keep);
  }
  // The channels [c, c1) of outer index o, after the flat groups: V::size() at a time
  // (group_lanes), then one by one.
  const auto rest = [&](int64_t o, int64_t c) {
#if defined(FROZENNORM_X86_SIMD)
    if constexpr (std::is_same_v<acc_t, float>) {
      using V = typename IO::AccVec;
      if (!streams && n >= IO::kStep) {
        for (; c + V::size() <= c1; c += V::size()) {
          V g, gx;
          group_lanes<kMergeLevels>(op, (o * t.C + c) * t.inner + i0, t.inner, n, mean + c,
                                    scale + c, keep, g, gx);
          (V::loadu(row + c) + V(merged_in_order(g))).store(row + c);
          (V::loadu(row + t.C + c) + V(merged_in_order(gx))).store(row + t.C + c);
        }
      }
    }
#endif
    for (; c < c1; ++c) {
      const int64_t k = (o * t.C + c) * t.inner + i0;
      if (streams) {
        plane_run<true>(op, k, n, mean[c], scale[c], keep, row[c], row[t.C + c]);
      } else {
        plane_run<false>(op, k, n, mean[c], scale[c], keep, row[c], row[t.C + c]);
      }
    }
  };
  int64_t o = o0;
#if defined(FROZENNORM_X86_SIMD)
  const bool flat = !streams && walks_flat<IO>(n, t.inner, stream);
  typename IO::AccVec below[IO::AccVec::size() + 1];  // below[i]: the lanes below lane i
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = typename IO::AccVec;
    if (flat) {
      for (int i = 0; i <= V::size(); ++i) {
        below[i] = V::arange(0.f, 1.f) < V(static_cast<float>(i));
      }
    }
    // t.flat_rows (flat_rows: such planes, without `stream`) outer indices at a time
    if (flat && t.flat_rows > 1) {
      for (; o + kFlatRows <= o1; o += kFlatRows) {
        int64_t c = c0;
        for (; c + IO::kStep <= c1; c += IO::kStep) {
          flat_planes<false, kFlatRows>(op, (o * t.C + c) * t.inner, t.C * t.inner, n, mean + c,
                                        scale + c, below, row + c, row + t.C + c);
        }
        for (int64_t r = 0; r < kFlatRows; ++r) rest(o + r, c);
      }
    }
  }
#endif
  for (; o < o1; ++o) {
    int64_t c = c0;
#if defined(FROZENNORM_X86_SIMD)
    if constexpr (std::is_same_v<acc_t, float>) {
      if (flat) {
        // With `stream`: groups from the first channel whose plane starts aligned (one comes
        // within kStep channels: kStep elements are one aligned width), the ones before it
        // plane by plane with ordinary stores. A group is n vectors of that width, so once
        // the first is aligned every group is, and no cache line takes both kinds of store.
        const int64_t first = stream ? std::min(c1, c0 + IO::kStep) : c0;
        while (c < first && !op.aligned((o * t.C + c) * t.inner)) {
          plane_run<false>(op, (o * t.C + c) * t.inner, n, mean[c], scale[c], keep, row[c],
                           row[t.C + c]);
          ++c;
        }
        const bool streamed = stream && op.aligned((o * t.C + c) * t.inner);
        for (; c + IO::kStep <= c1; c += IO::kStep) {
          const int64_t k = (o * t.C + c) * t.inner;
          if (streamed) {
            flat_planes<true, 1>(op, k, 0, n, mean + c, scale + c, below, row + c, row + t.C + c);
          } else {
            flat_planes<false, 1>(op, k, 0, n, mean + c, scale + c, below, row + c,
                                  row + t.C + c);
          }
        }
      }
    }
#endif
    rest(o, c);
  }
}

// Channels-last rows: kStep elements at flat offset k, channels [c, c + kStep), in kRows rows
// `stride` elements apart, their terms summed in registers, then added to the partials g and
// gx of those channels.
template <int kRows, bool kMasked, bool kStream, typename Op>
FROZENNORM_ALWAYS_INLINE void row_vector(const Op& op, int64_t k, int64_t c, int64_t stride,
                                         const typename Op::acc_t* mean,
                                         const typename Op::acc_t* scale, typename Op::acc_t* g,
                                         typename Op::acc_t* gx,
                                         const typename Op::IO::AccVec* keep) {
  using V = typename Op::IO::AccVec;
  V m[Op::kParts], s[Op::kParts], vg[Op::kParts], vgx[Op::kParts];
  for (int part = 0; part < Op::kParts; ++part) {
    const int64_t ch = c + part * V::size();
    m[part] = V::loadu(mean + ch);
    s[part] = V::loadu(scale + ch);
    vg[part] = V::loadu(g + ch);
    vgx[part] = V::loadu(gx + ch);
  }
  for (int r = 0; r < kRows; ++r) {
    op.template step<kMasked, kStream>(k + r * stride, m, s, vg, vgx, keep);
  }
  for (int part = 0; part < Op::kParts; ++part) {
    const int64_t ch = c + part * V::size();
    vg[part].store(g + ch);
    vgx[part].store(gx + ch);
  }
}

// kRows channels-last rows, row o and those `stride` elements apart, channels [c0, c1) (at
// least a vector): without streaming stores a last partial vector overlaps the one before
// (masked by `keep`); with them (the rows aligned alike), elements before the first aligned
// vector and after the last whole one go one by one.
template <int kRows, bool kStream, typename Op>
FROZENNORM_ALWAYS_INLINE void row_block(const Op& op, int64_t o, int64_t c0, int64_t c1,
                                        int64_t C, int64_t stride, const typename Op::acc_t* mean,
                                        const typename Op::acc_t* scale, typename Op::acc_t* g,
                                        typename Op::acc_t* gx,
                                        const typename Op::IO::AccVec* keep) {
  using IO = typename Op::IO;
  const int64_t k = o * C;
  int64_t c = c0;
  if constexpr (kStream) {
    for (; c < c1 && !op.aligned(k + c); ++c) op.scalar(k + c, mean[c], scale[c], g[c], gx[c]);
  }
  for (; c + IO::kStep <= c1; c += IO::kStep) {
    row_vector<kRows, false, kStream>(op, k + c, c, stride, mean, scale, g, gx, keep);
  }
  if (c == c1) return;
  if constexpr (kStream) {
    for (int r = 0; r < kRows; ++r) {
      for (int64_t i = c; i < c1; ++i) {
        op.scalar(k + r * stride + i, mean[i], scale[i], g[i], gx[i]);
      }
    }
  } else {
    row_vector<kRows, true, false>(op, k + c1 - IO::kStep, c1 - IO::kStep, stride, mean, scale,
                                   g, gx, keep);
  }
}

// Narrow channels-last rows of 16-bit data (register_rows): at most this many vector sums
// (2 per float vector of channels) held in registers across a tile's rows, half of the
// vector registers (32 with AVX-512, 16 with AVX2 and others); so rows of at most
// kRegisterSums / 4 whole vectors, and at most 4 (128 channels with AVX-512, 32 with AVX2).
// Not float32 or float64 rows (kMaxRegisterSteps 0): they gained nothing (backward op on
// two threads against row_rows, interleaved in one process: float32 2x64x400x608 1.03x the
// time, 8x64x56x56 1.15-1.21x; float64 8x32x56x56 0.97x).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kRegisterSums = 16;
#else
constexpr int kRegisterSums = 8;
#endif
template <typename IO>
constexpr int64_t kMaxRegisterSteps = IO::kParts == 2 ? std::min(4, kRegisterSums / 4) : 0;

// The rows [o0, o1) of a channels-last tile, kSteps whole vectors of channels from c0, in
// memory order: one sequential stream per tensor, each vector of channels' two sums in
// registers across all the rows, then stored as the tile's partials (no partials loaded or
// stored per row, as row_rows does per kRowBlock rows). Each level holds one vector of
// channels' parameters and sums in arrays of its own and adds its step to the row walk of
// the levels after it; the last walks the rows. (One array of all the vectors' sums: GCC
// kept it on the stack, loaded and stored on every row, or stored on every row.)
// (Backward op on two threads against row_rows' kRowBlock rows a quarter tile apart,
// interleaved in one process, 15-21 rounds: float16 / bfloat16 2x64x400x608 0.93-0.95x the
// time, 2x128x200x304 0.93x, float16 2x32x400x608 0.77x, 8x64x56x56 0.96x, bfloat16
// 8x128x28x28 0.97x; the AVX2 build 0.66-0.82x on rows of 16 and 32 channels, the AVX512
// build 0.76-0.96x. Wider rows with their channels cut into blocks of 2 or 4 vectors, each
// walked over all of the tile's rows in turn: 1.30-1.63x, the rows read in strides.)
template <int kSteps, int kLevel, bool kStream, typename Op, typename Steps>
FROZENNORM_ALWAYS_INLINE void register_level(const Op& op, int64_t o0, int64_t o1, int64_t c0,
                                             int64_t C, const typename Op::acc_t* mean,
                                             const typename Op::acc_t* scale,
                                             typename Op::acc_t* g, typename Op::acc_t* gx,
                                             const Steps& steps) {
  using IO = typename Op::IO;
  using V = typename IO::AccVec;
  if constexpr (kLevel == kSteps) {
    for (int64_t o = o0; o < o1; ++o) steps(o * C + c0);
  } else {
    const int64_t c = c0 + kLevel * IO::kStep;
    V m[Op::kParts], s[Op::kParts], vg[Op::kParts], vgx[Op::kParts];
    for (int part = 0; part < Op::kParts; ++part) {
      m[part] = V::loadu(mean + c + part * V::size());
      s[part] = V::loadu(scale + c + part * V::size());
      vg[part] = vgx[part] = V(typename Op::acc_t(0));
    }
    register_level<kSteps, kLevel + 1, kStream>(
        op, o0, o1, c0, C, mean, scale, g, gx, [&](int64_t k) {
          steps(k);
          op.template step<false, kStream>(k + kLevel * IO::kStep, m, s, vg, vgx, nullptr);
        });
    for (int part = 0; part < Op::kParts; ++part) {
      vg[part].store(g + c + part * V::size());
      vgx[part].store(gx + c + part * V::size());
    }
  }
}

template <int kSteps, bool kStream, typename Op>
void register_rows(const Op& op_, int64_t o0, int64_t o1, int64_t c0, int64_t C,
                   const typename Op::acc_t* mean, const typename Op::acc_t* scale,
                   typename Op::acc_t* g, typename Op::acc_t* gx) {
  const Op op = op_;  // a local copy: its pointers stay in registers across the stores
  register_level<kSteps, 0, kStream>(op, o0, o1, c0, C, mean, scale, g, gx, [](int64_t) {});
}

// register_rows for `steps` (1 to kMaxRegisterSteps) vectors.
template <bool kStream, typename Op, int kSteps = 1>
void register_rows(const Op& op, int64_t steps, int64_t o0, int64_t o1, int64_t c0, int64_t C,
                   const typename Op::acc_t* mean, const typename Op::acc_t* scale,
                   typename Op::acc_t* g, typename Op::acc_t* gx) {
  if constexpr (kSteps < kMaxRegisterSteps<typename Op::IO>) {
    if (steps > kSteps) {
      register_rows<kStream, Op, kSteps + 1>(op, steps, o0, o1, c0, C, mean, scale, g, gx);
      return;
    }
  }
  register_rows<kSteps, kStream>(op, o0, o1, c0, C, mean, scale, g, gx);
}

// The rows [o0, o1) of a channels-last tile: kRowBlock rows a kRowBlock-th of the tile apart,
// then the rest one by one.
template <bool kStream, typename Op>
void row_rows(const Op& op, int64_t o0, int64_t o1, int64_t c0, int64_t c1, int64_t C,
              const typename Op::acc_t* mean, const typename Op::acc_t* scale,
              typename Op::acc_t* g, typename Op::acc_t* gx, const typename Op::IO::AccVec* keep) {
  const int64_t q = (o1 - o0) / kRowBlock;
  for (int64_t i = 0; i < q; ++i) {
    row_block<kRowBlock, kStream>(op, o0 + i, c0, c1, C, q * C, mean, scale, g, gx, keep);
  }
  for (int64_t o = o0 + q * kRowBlock; o < o1; ++o) {
    row_block<1, kStream>(op, o, c0, c1, C, C, mean, scale, g, gx, keep);
  }
}

// A tile of channels-last rows (inner == 1): narrow 16-bit rows of whole vectors in memory
// order with their sums in registers (register_rows); other rows' channels [c0, c1) as
// vectors (each lane one channel), summed kRowBlock rows at a time (row_rows) into the
// partials. With `stream`, rows aligned alike, or long enough to amortise their scalar ends
// (as channel_walk.h's, then one at a time; register_rows only the former), take
// non-temporal stores. Element by element where the channels are fewer than a vector.
template <typename Op>
void row_tile(const Op op, const Tiles& t, int64_t o0, int64_t o1, int64_t c0, int64_t c1,
              bool stream, const typename Op::acc_t* mean, const typename Op::acc_t* scale,
              typename Op::acc_t* row) {
  using acc_t = typename Op::acc_t;
  using IO = typename Op::IO;
  const int64_t C = t.C;
  acc_t* g = row;
  acc_t* gx = row + C;
  std::fill(g + c0, g + c1, acc_t(0));
  std::fill(gx + c0, gx + c1, acc_t(0));
  if constexpr (IO::kVectorized) {
    using V = typename IO::AccVec;
    const int64_t width = c1 - c0;
    if (width >= IO::kStep) {
      V keep[Op::kParts];
      const int64_t tail = width % IO::kStep;
      if (tail != 0) lanes_from<IO>(IO::kStep - tail, keep);
      const bool aligned_rows = op.aligned(o0 * C + c0) && op.aligned((o0 + 1) * C + c0);
      if constexpr (kMaxRegisterSteps<IO> > 0) {
        const int64_t steps = width / IO::kStep;
        if (tail == 0 && steps <= kMaxRegisterSteps<IO> && (!stream || aligned_rows)) {
          stream ? register_rows<true>(op, steps, o0, o1, c0, C, mean, scale, g, gx)
                 : register_rows<false>(op, steps, o0, o1, c0, C, mean, scale, g, gx);
          return;
        }
      }
      if (!stream || !(aligned_rows || width >= kMinStreamRun)) {
        row_rows<false>(op, o0, o1, c0, c1, C, mean, scale, g, gx, keep);
      } else if (aligned_rows) {
        row_rows<true>(op, o0, o1, c0, c1, C, mean, scale, g, gx, keep);
      } else {  // each row's own scalar start
        for (int64_t o = o0; o < o1; ++o) {
          row_block<1, true>(op, o, c0, c1, C, C, mean, scale, g, gx, keep);
        }
      }
      return;
    }
  }
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t c = c0; c < c1; ++c) op.scalar(o * C + c, mean[c], scale[c], g[c], gx[c]);
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
  const int64_t C = p.C;
  dispatch_types(p.data_type, p.acc_type, [&](auto data_tag, auto acc_tag) {
    using scalar_t = decltype(data_tag);
    using acc_t = decltype(acc_tag);
    const auto* mean = static_cast<const acc_t*>(p.mean);
    const auto* scale = static_cast<const acc_t*>(p.scale);
    dispatch_act(p.act, /*identity_ok=*/true, [&](auto act_tag) {
      using Op = AffineBackwardOp<scalar_t, acc_t, decltype(act_tag)::value>;
      using IO = typename Op::IO;
      const Op op{static_cast<const scalar_t*>(p.grad), static_cast<const scalar_t*>(p.input),
                  static_cast<const scalar_t*>(p.saved), static_cast<scalar_t*>(p.grad_input),
                  static_cast<scalar_t*>(p.grad_residual)};
      // non-temporal stores for outputs too large to stay in the caches, from aligned bases
      const int64_t out_bytes = p.numel * static_cast<int64_t>(sizeof(scalar_t)) *
          ((p.grad_input != nullptr) + (p.grad_residual != nullptr));
      const bool stream = out_bytes >= kStreamBytes && op.aligned(0);
      const Tiles tiles(p.numel, C, p.inner, flat_rows<IO>(p.inner, stream), IO::kStep);
      // every tile writes all of its values: no initialisation
      std::unique_ptr<acc_t[]> partials(new acc_t[tiles.rows() * 2 * C]);
      const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / tiles.elements());
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
      add_rows_pairwise(partials.get(), tiles.rows(), 2 * C);
      std::memcpy(p.sum_grad, partials.get(), C * sizeof(acc_t));
      std::memcpy(p.sum_centered, partials.get() + C, C * sizeof(acc_t));
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace frozennorm::cpu
