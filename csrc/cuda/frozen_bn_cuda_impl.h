// Host side of the CUDA ops below the fronts every device shares (op_fronts.h): layout
// analysis, vector width, index width and grid choice, dtype dispatch. Templated on a
// Launcher so that the same code drives real kernel launches (frozen_bn_cuda.cu) and the CPU
// emulation of the grid used by the tests.
//
// A Launcher provides:
//   int64_t max_blocks(int threads_per_block)   // blocks that fill the device once
//   template <class K> void launch(Dim2 grid, Dim2 block, const K& kernel)
#pragma once

#include "../op_fronts.h"
#include "act_kernels.cuh"
#include "affine_kernels.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>

namespace frozennorm::cuda {

constexpr int kThreads = 256;

inline StatType stat_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return StatType::kFloat;
    case at::kDouble:
      return StatType::kDouble;
    case at::kHalf:
      return StatType::kHalf;
    case at::kBFloat16:
      return StatType::kBFloat16;
    default:
      TORCH_CHECK(false, "frozen_bn: unsupported statistics dtype ", t);
  }
}

inline uint32_t ceil_div(int64_t a, int64_t b) {
  return static_cast<uint32_t>((a + b - 1) / b);
}

inline int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Largest power of two <= max_vec that divides `divisor` and the alignment of every pointer.
inline int pick_vec(int max_vec, int64_t elem_size, int64_t divisor,
                    std::initializer_list<const void*> ptrs) {
  int vec = max_vec;
  while (vec > 1) {
    bool ok = divisor % vec == 0;
    for (const void* p : ptrs) ok &= reinterpret_cast<uintptr_t>(p) % (vec * elem_size) == 0;
    if (ok) break;
    vec /= 2;
  }
  return vec;
}

// Sizes/strides of a non-dense input and its dense output, outermost first, with size-1
// dims dropped and neighbours merged where both tensors allow it. Returns false when more
// than kMaxStridedDims dimensions remain.
inline bool strided_geometry(const at::Tensor& in, const at::Tensor& out, StridedGeometry& g) {
  std::vector<int64_t> order(in.dim());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return out.stride(a) > out.stride(b); });
  int n = 0;
  g.channel_dim = -1;
  for (int64_t d : order) {
    const int64_t size = in.size(d);
    if (size == 1) continue;
    const bool is_channel = d == 1;
    if (n > 0 && !is_channel && g.channel_dim != n - 1 &&
        g.out_strides[n - 1] == out.stride(d) * size &&
        g.in_strides[n - 1] == in.stride(d) * size) {
      g.sizes[n - 1] *= size;  // merge into the outer neighbour
      g.in_strides[n - 1] = in.stride(d);
      g.out_strides[n - 1] = out.stride(d);
      continue;
    }
    if (n == kMaxStridedDims) return false;
    g.sizes[n] = size;
    g.in_strides[n] = in.stride(d);
    g.out_strides[n] = out.stride(d);
    if (is_channel) g.channel_dim = n;
    ++n;
  }
  g.ndim = n;
  return true;
}

// Writes every channel's scale when there are no elements to launch a kernel for.
template <typename acc_t, typename Src, typename Launcher>
void launch_scales_only(Launcher& L, const Src& src, acc_t* scale_out, int64_t C) {
  if (scale_out == nullptr || C == 0) return;
  using Op = AffineOp<float, acc_t, false>;  // no element is touched
  L.launch({1, 1}, {kThreads, 1},
           PlanesKernel<1, acc_t, Op, Src>{Op{nullptr, nullptr}, src, scale_out, 0, C, Divider(1), 0});
}

// Runs `op` once over dense data of `numel` elements (every pointer in `ptrs` with the same
// strides) whose channel of flat offset k is (k / inner) % C, and writes every channel's
// scale to `scale_out` when it is not null. One launch.
template <typename scalar_t, typename acc_t, typename Op, typename Src, typename Launcher>
void launch_dense(Launcher& L, const Op& op, const Src& src, acc_t* scale_out, int64_t numel,
                  int64_t C, int64_t inner, std::initializer_list<const void*> ptrs) {
  constexpr int kMaxVec = 16 / sizeof(scalar_t);
  const int64_t max_blocks = L.max_blocks(kThreads);
  // 128-bit vectors when every pointer is aligned (and, channels-last, C divides); else
  // one element at a time (rare: offset views, odd channel counts).
  const bool rows = inner == 1;
  const bool wide = pick_vec(kMaxVec, sizeof(scalar_t), rows ? C : 1, ptrs) == kMaxVec;
  auto run = [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    if (rows) {
      const int64_t groups = C / VEC;
      const int64_t nrows = numel / C;
      const uint32_t bx = static_cast<uint32_t>(std::min<int64_t>(pow2_ceil(groups), 32));
      const uint32_t by = kThreads / bx;
      const uint32_t gx = ceil_div(groups, bx);
      const uint32_t gy = static_cast<uint32_t>(std::min<int64_t>(
          {static_cast<int64_t>(ceil_div(nrows, by)), std::max<int64_t>(1, max_blocks / gx), 65535}));
      L.launch({gx, gy}, {bx, by}, RowsKernel<VEC, acc_t, Op, Src>{op, src, scale_out, nrows, C});
    } else {
      const int64_t nvec = numel / VEC;
      const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(nvec, kThreads), max_blocks));
      const int64_t per_block = (nvec + blocks - 1) / blocks;
      L.launch({static_cast<uint32_t>(blocks), 1}, {kThreads, 1},
               PlanesKernel<VEC, acc_t, Op, Src>{op, src, scale_out, numel, C, Divider(inner), per_block});
    }
  };
  if (wide) {
    run(std::integral_constant<int, kMaxVec>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
}

// In a dense tensor the channel of memory offset k is (k / stride(1)) % C.
inline int64_t channel_period(const at::Tensor& t) {
  return t.size(1) == 1 ? t.numel() : t.stride(1);
}

// out = op(in) with per-channel parameters from `src`; also writes every channel's scale to
// `scale_out` when it is not null. `out` is empty_like(in). Exactly one launch, also for an
// empty tensor when scales must be written.
template <typename scalar_t, typename acc_t, bool kShift, typename Src, typename Launcher>
void launch_affine(Launcher& L, const at::Tensor& in, const at::Tensor& out, const Src& src,
                   acc_t* scale_out, int64_t C) {
  using Op = AffineOp<scalar_t, acc_t, kShift>;
  const int64_t numel = in.numel();
  if (numel == 0) return launch_scales_only(L, src, scale_out, C);
  const Op op{in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>()};
  if (is_dense_like(in, out)) {
    return launch_dense<scalar_t>(L, op, src, scale_out, numel, C, channel_period(in), {op.in, op.out});
  }
  StridedGeometry geo;
  if (!strided_geometry(in, out, geo)) {
    // Only for > 8 non-mergeable dims: copy to a dense layout first (two launches).
    launch_affine<scalar_t, acc_t, kShift>(L, in.contiguous(), out, src, scale_out, C);
    return;
  }
  const uint32_t blocks = static_cast<uint32_t>(
      std::min<int64_t>(ceil_div(numel, kThreads), L.max_blocks(kThreads)));
  L.launch({blocks, 1}, {kThreads, 1},
           StridedKernel<scalar_t, acc_t, kShift, Src>{
               in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), src, scale_out, geo, numel, C});
}

template <typename acc_t>
StatsSource<acc_t> stats_source(const Stats& s, double eps) {
  return StatsSource<acc_t>{
      s.weight.defined() ? s.weight.const_data_ptr() : nullptr,
      s.bias.defined() ? s.bias.const_data_ptr() : nullptr,
      s.mean.const_data_ptr(),
      s.var.const_data_ptr(),
      stat_type(s.mean.scalar_type()),
      static_cast<acc_t>(eps)};
}

// The CUDA loops behind op_fronts.h's fronts: kernel launches through L (real ones, or the
// tests' emulation of the grid).
template <typename Launcher>
struct Loops {
  Launcher& L;

  at::Tensor forward(const Forward& f) {
    const int64_t C = f.input.size(1);
    at::Tensor scale = at::empty({C}, f.input.options().dtype(f.acc));
    dispatch_types(f.input.scalar_type(), f.acc, [&](auto data_tag, auto acc_tag) {
      using scalar_t = decltype(data_tag);
      using acc_t = decltype(acc_tag);
      launch_affine<scalar_t, acc_t, true>(L, f.input, f.out, stats_source<acc_t>(f.stats, f.eps),
                                           scale.mutable_data_ptr<acc_t>(), C);
    });
    return scale;
  }

  void backward(const Backward& b) {
    dispatch_types(b.grad.scalar_type(), b.acc, [&](auto data_tag, auto acc_tag) {
      using scalar_t = decltype(data_tag);
      using acc_t = decltype(acc_tag);
      const ScaleSource<acc_t> src{b.scale.const_data_ptr<acc_t>()};
      launch_affine<scalar_t, acc_t, false>(L, b.grad, b.grad_input, src,
                                            static_cast<acc_t*>(nullptr), b.grad.size(1));
    });
  }

  at::Tensor act_forward(const Forward& f) {
    const at::Tensor& x = f.input;
    const int64_t C = x.size(1);
    at::Tensor scale = at::empty({C}, x.options().dtype(f.acc));
    dispatch_types(x.scalar_type(), f.acc, [&](auto data_tag, auto acc_tag) {
      using scalar_t = decltype(data_tag);
      using acc_t = decltype(acc_tag);
      const auto src = stats_source<acc_t>(f.stats, f.eps);
      acc_t* scale_out = scale.mutable_data_ptr<acc_t>();
      if (x.numel() == 0) return launch_scales_only(L, src, scale_out, C);
      const scalar_t* in = x.const_data_ptr<scalar_t>();
      const scalar_t* r = f.residual.defined() ? f.residual.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* o = f.out.mutable_data_ptr<scalar_t>();
      scalar_t* e = f.preact.defined() ? f.preact.mutable_data_ptr<scalar_t>() : nullptr;
      dispatch_act(f.act, /*identity_ok=*/true, [&](auto act_tag) {
        using Op = ActForwardOp<scalar_t, acc_t, decltype(act_tag)::value>;
        launch_dense<scalar_t>(L, Op{in, r, o, e}, src, scale_out, x.numel(), C, channel_period(x),
                               {in, r, o, e});
      });
    });
    return scale;
  }

  void act_backward(const Backward& b) {
    const at::Tensor& g = b.grad;
    if (g.numel() == 0) return;
    dispatch_types(g.scalar_type(), b.acc, [&](auto data_tag, auto acc_tag) {
      using scalar_t = decltype(data_tag);
      using acc_t = decltype(acc_tag);
      const ScaleSource<acc_t> src{b.scale.const_data_ptr<acc_t>()};
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* sp = b.saved.const_data_ptr<scalar_t>();
      scalar_t* gi = b.grad_input.mutable_data_ptr<scalar_t>();
      scalar_t* gr = b.grad_residual.defined() ? b.grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
      dispatch_act(b.act, /*identity_ok=*/false, [&](auto act_tag) {
        using Op = ActBackwardOp<scalar_t, acc_t, decltype(act_tag)::value>;
        launch_dense<scalar_t>(L, Op{gp, sp, gi, gr}, src, static_cast<acc_t*>(nullptr), g.numel(),
                               g.size(1), channel_period(g), {gp, sp, gi, gr});
      });
    });
  }
};

}  // namespace frozennorm::cuda
