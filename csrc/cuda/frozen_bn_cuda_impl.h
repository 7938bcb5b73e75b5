// Host side of the CUDA ops: argument checks, layout analysis, vector width, index width and
// grid choice, dtype dispatch. Templated on a Launcher so that the same code drives real
// kernel launches (frozen_bn_cuda.cu) and the CPU emulation of the grid used by the tests.
//
// A Launcher provides:
//   int64_t max_blocks(int threads_per_block)   // blocks that fill the device once
//   int64_t max_int32_numel()                   // largest numel indexed with 32 bits
//   template <class K> void launch(Dim2 grid, Dim2 block, const K& kernel)
#pragma once

#include "../frozen_bn.h"
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

// Calls f(std::integral_constant<int, V>{}) for V == vec, V a power of two <= kMax.
template <int kMax, typename F>
void dispatch_vec(int vec, F&& f) {
  if constexpr (kMax > 1) {
    if (vec == kMax) return f(std::integral_constant<int, kMax>{});
    return dispatch_vec<kMax / 2>(vec, std::forward<F>(f));
  } else {
    return f(std::integral_constant<int, 1>{});
  }
}

// Largest numel for which the grid-stride loops cannot overflow 32-bit indices.
constexpr int64_t kMaxInt32Numel = std::numeric_limits<int32_t>::max() / 2;

template <typename F>
void dispatch_index(int64_t numel, int64_t max_int32_numel, F&& f) {
  if (numel <= max_int32_numel) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
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

// out = op(in) with per-channel parameters from `src`; also writes every channel's scale to
// `scale_out` when it is not null. `out` is empty_like(in). Exactly one launch, also for an
// empty tensor when scales must be written.
template <typename scalar_t, typename acc_t, bool kShift, typename Src, typename Launcher>
void launch_affine(Launcher& L, const at::Tensor& in, const at::Tensor& out, const Src& src,
                   acc_t* scale_out, int64_t C) {
  using Op = AffineOp<scalar_t, acc_t, kShift>;
  constexpr int kMaxVec = 16 / sizeof(scalar_t);
  const int64_t numel = in.numel();
  const int64_t max_blocks = L.max_blocks(kThreads);
  if (numel == 0) {
    if (scale_out != nullptr && C > 0) {
      L.launch({1, 1}, {kThreads, 1},
               PlanesKernel<1, int64_t, acc_t, Op, Src>{
                   Op{nullptr, nullptr}, src, scale_out, 0, C, Divider<int64_t>(1), 0});
    }
    return;
  }
  const Op op{in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>()};
  const bool dense = in.is_non_overlapping_and_dense() && in.strides() == out.strides();
  if (!dense) {
    StridedGeometry geo;
    if (!strided_geometry(in, out, geo)) {
      // Only for > 8 non-mergeable dims: copy to a dense layout first (two launches).
      launch_affine<scalar_t, acc_t, kShift>(L, in.contiguous(), out, src, scale_out, C);
      return;
    }
    const uint32_t blocks = static_cast<uint32_t>(std::min<int64_t>(ceil_div(numel, kThreads), max_blocks));
    L.launch({blocks, 1}, {kThreads, 1},
             StridedKernel<scalar_t, acc_t, kShift, Src>{
                 in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), src, scale_out, geo, numel, C});
    return;
  }
  // In a dense tensor the channel of memory offset k is (k / stride(1)) % C.
  const int64_t inner = C == 1 ? numel : in.stride(1);
  dispatch_index(numel, L.max_int32_numel(), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    if (inner == 1) {
      const int vec = pick_vec(kMaxVec, sizeof(scalar_t), C, {op.in, op.out});
      dispatch_vec<kMaxVec>(vec, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        const int64_t groups = C / VEC;
        const int64_t rows = numel / C;
        const uint32_t bx = static_cast<uint32_t>(std::min<int64_t>(pow2_ceil(groups), 32));
        const uint32_t by = kThreads / bx;
        const uint32_t gx = ceil_div(groups, bx);
        const uint32_t gy = static_cast<uint32_t>(std::min<int64_t>(
            {static_cast<int64_t>(ceil_div(rows, by)), std::max<int64_t>(1, max_blocks / gx), 65535}));
        L.launch({gx, gy}, {bx, by},
                 RowsKernel<VEC, index_t, acc_t, Op, Src>{
                     op, src, scale_out, static_cast<index_t>(rows), static_cast<index_t>(C)});
      });
    } else {
      const int vec = pick_vec(kMaxVec, sizeof(scalar_t), 1, {op.in, op.out});
      auto run = [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        const int64_t nvec = numel / VEC;
        const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(nvec, kThreads), max_blocks));
        const int64_t per_block = (nvec + blocks - 1) / blocks;
        L.launch({static_cast<uint32_t>(blocks), 1}, {kThreads, 1},
                 PlanesKernel<VEC, index_t, acc_t, Op, Src>{
                     op, src, scale_out, static_cast<index_t>(numel), static_cast<index_t>(C),
                     Divider<index_t>(static_cast<index_t>(inner)), static_cast<index_t>(per_block)});
      };
      if (vec == kMaxVec) {
        run(std::integral_constant<int, kMaxVec>{});
      } else {
        run(std::integral_constant<int, 1>{});
      }
    }
  });
}

// Calls f(acc_t{}) with the compute type compute_dtype() chose for scalar_t data.
template <typename scalar_t, typename F>
void dispatch_acc(at::ScalarType acc, F&& f) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    f(double{});
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    if (acc == at::kDouble) {
      f(double{});
    } else {
      f(float{});
    }
  } else {
    f(float{});
  }
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> frozen_bn_forward(
    Launcher& L,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean,
    const at::Tensor& running_var,
    double eps) {
  const Stats s = check_forward_args(input, weight, bias, running_mean, running_var);
  const at::ScalarType acc = compute_dtype(input.scalar_type(), s.mean.scalar_type());
  const int64_t C = input.size(1);
  at::Tensor out = at::empty_like(input);
  at::Tensor scale = at::empty({C}, input.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "frozen_bn_cuda", [&] {
    dispatch_acc<scalar_t>(acc, [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      const StatsSource<acc_t> src{
          s.weight.defined() ? s.weight.const_data_ptr() : nullptr,
          s.bias.defined() ? s.bias.const_data_ptr() : nullptr,
          s.mean.const_data_ptr(),
          s.var.const_data_ptr(),
          stat_type(s.mean.scalar_type()),
          static_cast<acc_t>(eps)};
      launch_affine<scalar_t, acc_t, true>(L, input, out, src, scale.mutable_data_ptr<acc_t>(), C);
    });
  });
  return {out, scale};
}

template <typename Launcher>
at::Tensor frozen_bn_backward(Launcher& L, const at::Tensor& grad_output, const at::Tensor& scale) {
  check_backward_args(grad_output, scale);
  const at::ScalarType acc = compute_dtype(grad_output.scalar_type(), scale.scalar_type());
  const at::Tensor scale_acc = scale.to(acc).contiguous();
  at::Tensor grad_input = at::empty_like(grad_output);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "frozen_bn_backward_cuda", [&] {
    dispatch_acc<scalar_t>(acc, [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      const ScaleSource<acc_t> src{scale_acc.const_data_ptr<acc_t>()};
      launch_affine<scalar_t, acc_t, false>(L, grad_output, grad_input, src, static_cast<acc_t*>(nullptr),
                                            grad_output.size(1));
    });
  });
  return grad_input;
}

}  // namespace frozennorm::cuda
