// Host side of the CUDA ops below the fronts every device shares (op_fronts.h): layout
// analysis, index and vector widths, grids, dtype dispatch. Templated on a Launcher
// (launch.h), so that the same code drives real kernel launches (frozen_bn_cuda.cu) and the
// tests' CPU emulation of the grid.
//
// Launches per call: a forward, two (ParamsKernel, then the element kernel; one when the
// input is empty and only the scales are written); a backward, one.
#pragma once

#include "../op_fronts.h"
#include "act_kernels.cuh"
#include "affine_kernels.cuh"
#include "launch.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace frozennorm::cuda {

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

// The plane of a dense tensor: consecutive elements of one channel, its stride(1).
inline int64_t plane_size(const at::Tensor& t) {
  return t.size(1) == 1 ? t.numel() : t.stride(1);
}

// Typed data pointers through the untyped accessors, which also serve meta tensors (whose
// launches the tests plan without running them).
template <typename T>
const T* data_of(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_data_of(const at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// The largest element offset of t from its data pointer.
inline int64_t max_offset(const at::Tensor& t) {
  int64_t off = 0;
  for (int64_t d = 0; d < t.dim(); ++d) off += (t.size(d) - 1) * t.stride(d);
  return off;
}

template <typename Launcher>
bool use_32bit_index(const Launcher& L, const at::Tensor& t) {
  return use_32bit_index(t.numel(), max_offset(t), L.index64_only());
}

// The forward's first launch: every channel's scale, and (table not null) its parameters.
template <typename acc_t, typename Launcher>
void launch_params(Launcher& L, const StatsSource<acc_t>& stats, acc_t* scale_out,
                   ParamsEntry<acc_t>* table, int64_t C) {
  if (C == 0) return;
  using K = ParamsKernel<acc_t>;
  const int64_t blocks = std::min(ceil_div(C, kThreads), L.template max_blocks<K>());
  L.launch({grid_dim(blocks, kMaxGridX), 1}, {kThreads, 1}, K{stats, scale_out, table, C});
}

template <int VEC, typename index_t, typename Op, typename Src, typename Launcher>
void launch_planes(Launcher& L, const Op& op, const Src& src, int64_t numel, int64_t C, int64_t plane) {
  using K = PlanesKernel<VEC, Op::kUnroll, index_t, Op, Src>;
  const int64_t blocks = std::min(ceil_div(std::max<int64_t>(numel / VEC, 1), kThreads * Op::kUnroll),
                                  L.template max_blocks<K>());
  const auto n = static_cast<index_t>(numel), c = static_cast<index_t>(C);
  L.launch({grid_dim(blocks, kMaxGridX), 1}, {kThreads, 1},
           K{op, src, n, c, Divider<index_t>(static_cast<index_t>(plane)), Divider<index_t>(c)});
}

// Blocks of bx threads across the C / VEC channel groups (bx a power of two <= 32, so that a
// warp covers whole rows when the groups are few) times kThreads / bx rows.
template <int VEC, typename index_t, typename Op, typename Src, typename Launcher>
void launch_rows(Launcher& L, const Op& op, const Src& src, int64_t rows, int64_t C) {
  using K = RowsKernel<VEC, Op::kUnroll, index_t, Op, Src>;
  const int64_t groups = C / VEC;
  const int64_t bx = std::min<int64_t>(pow2_ceil(groups), 32);
  const int64_t by = kThreads / bx;
  const int64_t gx = ceil_div(groups, bx);
  const int64_t gy = std::max<int64_t>(
      1, std::min({ceil_div(rows, by * Op::kUnroll), L.template max_blocks<K>() / gx, kMaxGridY}));
  L.launch({grid_dim(gx, kMaxGridX), grid_dim(gy, kMaxGridY)},
           {static_cast<uint32_t>(bx), static_cast<uint32_t>(by)},
           K{op, src, static_cast<index_t>(rows), static_cast<index_t>(C)});
}

// Runs `op` once over dense data of `numel` > 0 elements (every pointer in `ptrs` with the
// same strides) whose channel of flat offset k is (k / plane) % C. Vectors of up to 16
// bytes, the widest every pointer's alignment allows (and, for rows, C divides): narrower
// ones, not single elements, for 8-byte-aligned views or C % 8 == 4 in float16.
template <typename scalar_t, typename Op, typename Src, typename Launcher>
void launch_dense(Launcher& L, const Op& op, const Src& src, int64_t numel, int64_t C, int64_t plane,
                  std::initializer_list<const void*> ptrs) {
  constexpr int kMaxVec = 16 / sizeof(scalar_t);
  const bool rows = plane == 1;
  // planes: a vector may straddle planes, so only the alignment limits it
  const int vec = vector_width(kMaxVec, sizeof(scalar_t), rows ? C : kMaxVec, ptrs);
  dispatch_index(use_32bit_index(numel, numel - 1, L.index64_only()), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    dispatch_vec<kMaxVec>(vec, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      if (rows) {
        launch_rows<VEC, index_t>(L, op, src, numel / C, C);
      } else {
        launch_planes<VEC, index_t>(L, op, src, numel, C, plane);
      }
    });
  });
}

// Sizes and strides of an iteration over a non-dense input `in` in the order of its dense
// output `out`, outermost first, with size-1 dimensions dropped and neighbours merged where
// the input allows it. Returns false when more than kMaxStridedDims dimensions remain.
struct StridedShape {
  int ndim = 0;
  int channel_dim = -1;
  int64_t sizes[kMaxStridedDims];
  int64_t in_strides[kMaxStridedDims];
  int64_t out_strides[kMaxStridedDims];
};

inline bool strided_shape(const at::Tensor& in, const at::Tensor& out, StridedShape& s) {
  std::vector<int64_t> order(in.dim());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return out.stride(a) > out.stride(b); });
  int n = 0;
  for (int64_t d : order) {
    const int64_t size = in.size(d);
    if (size == 1) continue;
    const bool is_channel = d == 1;
    if (n > 0 && !is_channel && s.channel_dim != n - 1 && s.in_strides[n - 1] == in.stride(d) * size) {
      s.sizes[n - 1] *= size;  // merge into the outer neighbour
      s.in_strides[n - 1] = in.stride(d);
      s.out_strides[n - 1] = out.stride(d);
      continue;
    }
    if (n == kMaxStridedDims) return false;
    s.sizes[n] = size;
    s.in_strides[n] = in.stride(d);
    s.out_strides[n] = out.stride(d);
    if (is_channel) s.channel_dim = n;
    ++n;
  }
  if (n == 0) {  // a single element
    s.sizes[0] = 1;
    s.in_strides[0] = s.out_strides[0] = 0;
    n = 1;
  }
  s.ndim = n;
  // The output is dense, so in this order its strides are the running products of the sizes,
  // and the iteration's element e is the output's element at offset e.
  int64_t expected = 1;
  for (int d = n - 1; d >= 0; --d) {
    TORCH_INTERNAL_ASSERT(s.sizes[d] == 1 || s.out_strides[d] == expected,
                          "frozen_bn: the output of a strided input is not dense");
    expected *= s.sizes[d];
  }
  return true;
}

// The geometry of NDIM >= s.ndim dimensions: s's, after NDIM - s.ndim outer ones of size 1.
template <int NDIM, typename index_t>
StridedGeometry<NDIM, index_t> strided_geometry(const StridedShape& s) {
  StridedGeometry<NDIM, index_t> g{};
  const int pad = NDIM - s.ndim;
  g.channel_dim = s.channel_dim < 0 ? -1 : s.channel_dim + pad;
  for (int d = 0; d < NDIM; ++d) {
    const bool real = d >= pad;
    g.sizes[d] = Divider<index_t>(static_cast<index_t>(real ? s.sizes[d - pad] : 1));
    g.in_strides[d] = static_cast<index_t>(real ? s.in_strides[d - pad] : 0);
  }
  return g;
}

// Calls f(std::integral_constant<int, NDIM>{}) for the kernel of an iteration of `ndim`
// dimensions: exactly 3 or 4 (a channel slice or an expanded gradient; every other column of
// NCHW), else the smallest of 3 or kMaxStridedDims that holds them.
template <typename F>
void dispatch_dims(int ndim, const F& f) {
  if (ndim <= 3) return f(std::integral_constant<int, 3>{});
  if (ndim == 4) return f(std::integral_constant<int, 4>{});
  f(std::integral_constant<int, kMaxStridedDims>{});
}

// out = op(in) with per-channel parameters from `src`; `out` is empty_like(in), in has
// elements.
template <typename scalar_t, typename acc_t, bool kShift, typename Src, typename Launcher>
void launch_affine(Launcher& L, const at::Tensor& in, const at::Tensor& out, const Src& src, int64_t C) {
  using Op = AffineOp<scalar_t, acc_t, kShift>;
  const Op op{data_of<scalar_t>(in), mutable_data_of<scalar_t>(out)};
  if (is_dense_like(in, out)) {
    return launch_dense<scalar_t>(L, op, src, in.numel(), C, plane_size(in), {op.in, op.out});
  }
  StridedShape shape;
  if (!strided_shape(in, out, shape)) {
    // Only for > 8 non-mergeable dims: copy to a dense layout first (two launches).
    return launch_affine<scalar_t, acc_t, kShift>(L, in.contiguous(), out, src, C);
  }
  dispatch_index(use_32bit_index(L, in), [&](auto index_tag) {
    dispatch_dims(shape.ndim, [&](auto dims_tag) {
      using index_t = decltype(index_tag);
      constexpr int NDIM = decltype(dims_tag)::value;
      using K = StridedKernel<NDIM, Op::kUnroll, index_t, Op, Src>;
      const int64_t numel = in.numel();
      const int64_t blocks = std::min(ceil_div(numel, kThreads * Op::kUnroll), L.template max_blocks<K>());
      L.launch({grid_dim(blocks, kMaxGridX), 1}, {kThreads, 1},
               K{op, src, strided_geometry<NDIM, index_t>(shape), static_cast<index_t>(numel)});
    });
  });
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

// The loops of one (data, compute) dtype pair. Their member functions are defined below the
// class, so that a build may instantiate each pair in a translation unit of its own (the
// kernels of one pair take a quarter of the CUDA build; frozen_bn_cuda.cu).
template <typename scalar_t, typename acc_t, typename Launcher>
struct TypedLoops {
  Launcher& L;

  at::Tensor forward(const Forward& f);
  void backward(const Backward& b);
  at::Tensor act_forward(const Forward& f);
  void act_backward(const Backward& b);

 private:
  // A forward's first launch: returns the scale (the forward's second output) and, when the
  // input has elements, the table of the element kernel's parameters.
  at::Tensor params(const Forward& f, at::Tensor& table);
  static TableSource<acc_t> table_source(const at::Tensor& table) {
    return {static_cast<const ParamsEntry<acc_t>*>(table.const_data_ptr())};
  }
};

template <typename scalar_t, typename acc_t, typename Launcher>
at::Tensor TypedLoops<scalar_t, acc_t, Launcher>::params(const Forward& f, at::Tensor& table) {
  const int64_t C = f.input.size(1);
  at::Tensor scale = at::empty({C}, f.input.options().dtype(f.acc));
  ParamsEntry<acc_t>* entries = nullptr;
  if (f.input.numel() > 0) {
    table = at::empty({C, 4}, f.input.options().dtype(f.acc));
    entries = static_cast<ParamsEntry<acc_t>*>(table.mutable_data_ptr());
  }
  launch_params<acc_t>(L, stats_source<acc_t>(f.stats, f.eps), mutable_data_of<acc_t>(scale), entries, C);
  return scale;
}

template <typename scalar_t, typename acc_t, typename Launcher>
at::Tensor TypedLoops<scalar_t, acc_t, Launcher>::forward(const Forward& f) {
  at::Tensor table;
  at::Tensor scale = params(f, table);
  if (f.input.numel() > 0) {
    launch_affine<scalar_t, acc_t, true>(L, f.input, f.out, table_source(table), f.input.size(1));
  }
  return scale;
}

template <typename scalar_t, typename acc_t, typename Launcher>
void TypedLoops<scalar_t, acc_t, Launcher>::backward(const Backward& b) {
  if (b.grad.numel() == 0) return;
  const ScaleSource<acc_t> src{data_of<acc_t>(b.scale)};
  launch_affine<scalar_t, acc_t, false>(L, b.grad, b.grad_input, src, b.grad.size(1));
}

template <typename scalar_t, typename acc_t, typename Launcher>
at::Tensor TypedLoops<scalar_t, acc_t, Launcher>::act_forward(const Forward& f) {
  const at::Tensor& x = f.input;
  at::Tensor table;
  at::Tensor scale = params(f, table);
  if (x.numel() == 0) return scale;
  const scalar_t* in = data_of<scalar_t>(x);
  const scalar_t* r = f.residual.defined() ? data_of<scalar_t>(f.residual) : nullptr;
  scalar_t* o = mutable_data_of<scalar_t>(f.out);
  scalar_t* e = f.preact.defined() ? mutable_data_of<scalar_t>(f.preact) : nullptr;
  dispatch_act(f.act, /*identity_ok=*/true, [&](auto act_tag) {
    using Op = ActForwardOp<scalar_t, acc_t, decltype(act_tag)::value>;
    launch_dense<scalar_t>(L, Op{in, r, o, e}, table_source(table), x.numel(), x.size(1), plane_size(x),
                           {in, r, o, e});
  });
  return scale;
}

template <typename scalar_t, typename acc_t, typename Launcher>
void TypedLoops<scalar_t, acc_t, Launcher>::act_backward(const Backward& b) {
  const at::Tensor& g = b.grad;
  if (g.numel() == 0) return;
  const ScaleSource<acc_t> src{data_of<acc_t>(b.scale)};
  const scalar_t* gp = data_of<scalar_t>(g);
  const scalar_t* sp = data_of<scalar_t>(b.saved);
  scalar_t* gi = mutable_data_of<scalar_t>(b.grad_input);
  scalar_t* gr = b.grad_residual.defined() ? mutable_data_of<scalar_t>(b.grad_residual) : nullptr;
  dispatch_act(b.act, /*identity_ok=*/false, [&](auto act_tag) {
    constexpr Activation kAct = decltype(act_tag)::value;
    if constexpr (kAct != Activation::kIdentity) {  // (frozen_bn_backward's; never here)
      using Op = ActBackwardOp<scalar_t, acc_t, kAct>;
      launch_dense<scalar_t>(L, Op{gp, sp, gi, gr}, src, g.numel(), g.size(1), plane_size(g),
                             {gp, sp, gi, gr});
    }
  });
}

// The CUDA loops behind op_fronts.h's fronts: kernel launches through L (real ones, or the
// tests' emulation of the grid), dispatched to the loops of the dtype pair.
template <typename Launcher>
struct Loops {
  Launcher& L;

  template <typename F>
  void typed(at::ScalarType data, at::ScalarType acc, const F& f) {
    dispatch_types(data, acc, [&](auto data_tag, auto acc_tag) {
      f(TypedLoops<decltype(data_tag), decltype(acc_tag), Launcher>{L});
    });
  }

  at::Tensor forward(const Forward& f) {
    at::Tensor scale;
    typed(f.input.scalar_type(), f.acc, [&](auto loops) { scale = loops.forward(f); });
    return scale;
  }
  void backward(const Backward& b) {
    typed(b.grad.scalar_type(), b.acc, [&](auto loops) { loops.backward(b); });
  }
  at::Tensor act_forward(const Forward& f) {
    at::Tensor scale;
    typed(f.input.scalar_type(), f.acc, [&](auto loops) { scale = loops.act_forward(f); });
    return scale;
  }
  void act_backward(const Backward& b) {
    typed(b.grad.scalar_type(), b.acc, [&](auto loops) { loops.act_backward(b); });
  }
};

}  // namespace frozennorm::cuda
