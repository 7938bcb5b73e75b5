// Test-only: the CUDA ops' host logic (csrc/cuda/frozen_bn_cuda_impl.h) and kernel bodies
// (csrc/cuda/*_kernels.cuh) compiled as plain C++ and run on the CPU, registered as
// frozennorm_emu::* for CPU tensors. The emulation is built to fail where a GPU would:
//  * every (block, thread) of a launch runs, the blocks in a random order and the threads of
//    a block in a random order (seeded; the kernels promise no order);
//  * every global load and store is checked: aligned to its size (a GPU faults on a
//    misaligned vector access, x86 does not), inside a tensor of the op (an input's storage
//    or memory allocated during the op), stores only into memory allocated during the op;
//  * everything allocated during the op starts as 0xFF bytes, a NaN in every floating dtype,
//    and every byte's stores are counted: none may be stored twice, and every byte of the
//    outputs the kernels write must be stored exactly once;
//  * the grid respects the hardware limits, and the "device" has as many resident blocks as
//    the tests say (one, so that every grid-stride loop wraps, or many).
// For meta tensors the same ops plan their launches without running them (launch_log()
// shows what would run), so the choices for tensors of any size can be checked.
#define FROZENNORM_CUDA_EMULATION
#include "cuda/frozen_bn_cuda_impl.h"

#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace frozennorm::cuda {
namespace {

struct EmulationSettings {
  int64_t max_blocks = 2;    // resident blocks of the emulated device, for every kernel
  int64_t seed = 0;          // of the block and thread order
  bool index64_only = false;
  int64_t launches = 0;      // since the last configure()
  std::vector<std::string> log;  // the launches since the last configure()
};

EmulationSettings& settings() {
  static EmulationSettings s;
  return s;
}

// ---- memory: the tensors an op may touch, and every byte's stores -----------------------

struct Region {
  uintptr_t end;
  bool fresh;                   // allocated during the op (may be stored to)
  std::vector<uint8_t> stores;  // per byte, for fresh regions
};

struct Memory {
  bool active = false;
  std::map<uintptr_t, Region> regions;  // by first byte

  Region* find(uintptr_t a, size_t bytes, uintptr_t* begin) {
    auto it = regions.upper_bound(a);
    if (it == regions.begin()) return nullptr;
    --it;
    if (a + bytes > it->second.end) return nullptr;
    *begin = it->first;
    return &it->second;
  }

  void add(const void* p, size_t bytes, bool fresh) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    // memory freed and allocated again during the op: the new allocation replaces the old
    for (auto it = regions.begin(); it != regions.end();) {
      const bool overlaps = it->first < a + bytes && a < it->second.end;
      it = overlaps && it->second.fresh ? regions.erase(it) : std::next(it);
    }
    Region r{a + bytes, fresh, {}};
    if (fresh) r.stores.assign(bytes, 0);
    regions.emplace(a, std::move(r));
  }
};

Memory& memory() {
  static Memory m;
  return m;
}

// The CPU allocator while an emulated op runs: fills every allocation with 0xFF (NaN in
// float16, bfloat16, float32 and float64) and registers it.
class SentinelAllocator final : public c10::Allocator {
 public:
  explicit SentinelAllocator(c10::Allocator* base) : base_(base) {}
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = base_->allocate(n);
    if (n > 0) {
      std::memset(p.get(), 0xFF, n);
      memory().add(p.get(), n, true);
    }
    return p;
  }
  c10::DeleterFnPtr raw_deleter() const override {
    return base_->raw_deleter();
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    base_->copy_data(dest, src, count);
  }

 private:
  c10::Allocator* base_;
};

constexpr uint8_t kAllocatorPriority = 255;

// One emulated op: its inputs registered, the sentinel allocator installed; then the check
// that the kernels stored each byte of its outputs exactly once.
class EmulatedOp {
 public:
  explicit EmulatedOp(std::initializer_list<const at::Tensor*> inputs)
      : previous_(c10::GetCPUAllocator()), sentinel_(previous_) {
    Memory& m = memory();
    m.regions.clear();
    for (const at::Tensor* t : inputs) {
      if (t->defined() && t->storage().nbytes() > 0) {
        m.add(t->storage().data(), t->storage().nbytes(), false);
      }
    }
    m.active = true;
    c10::SetCPUAllocator(&sentinel_, kAllocatorPriority);
  }
  ~EmulatedOp() {
    c10::SetCPUAllocator(previous_, kAllocatorPriority);
    memory().active = false;
    memory().regions.clear();
  }

  void expect_stored_once(const at::Tensor& out, const char* name) {
    if (!out.defined() || out.numel() == 0) return;
    TORCH_CHECK(out.is_non_overlapping_and_dense(), "emulated CUDA: ", name, " is not dense");
    const auto a = reinterpret_cast<uintptr_t>(out.const_data_ptr());
    const size_t bytes = out.numel() * out.element_size();
    uintptr_t begin = 0;
    Region* r = memory().find(a, bytes, &begin);
    TORCH_CHECK(r != nullptr && r->fresh, "emulated CUDA: ", name, " was not allocated during the op");
    for (size_t b = 0; b < bytes; ++b) {
      const int n = r->stores[a - begin + b];
      TORCH_CHECK(n == 1, "emulated CUDA: element ", b / out.element_size(), " of ", name,
                  " (", out.sizes(), ") stored ", n, " times, expected once");
    }
  }

 private:
  c10::Allocator* previous_;
  SentinelAllocator sentinel_;
};

}  // namespace

namespace emulation {
void on_access(const void* p, size_t bytes, bool store) {
  Memory& m = memory();
  if (!m.active) return;
  const char* what = store ? "store" : "load";
  const auto a = reinterpret_cast<uintptr_t>(p);
  TORCH_CHECK(a % bytes == 0, "emulated CUDA: misaligned ", bytes, "-byte ", what, " at ", p,
              " (a GPU faults: misaligned address)");
  uintptr_t begin = 0;
  Region* r = m.find(a, bytes, &begin);
  TORCH_CHECK(r != nullptr, "emulated CUDA: ", bytes, "-byte ", what, " at ", p,
              " outside every tensor of the op (out of bounds)");
  if (!store) return;
  TORCH_CHECK(r->fresh, "emulated CUDA: store at ", p, " into an input of the op");
  for (size_t b = 0; b < bytes; ++b) {
    uint8_t& n = r->stores[a - begin + b];
    TORCH_CHECK(n == 0, "emulated CUDA: byte at ", p, " + ", b, " stored twice");
    n = 1;
  }
}
}  // namespace emulation

namespace {

// The dimensions a strided kernel unrolls (0: not a strided kernel).
template <typename K, typename = void>
struct DimsOf : std::integral_constant<int, 0> {};
template <typename K>
struct DimsOf<K, std::void_t<decltype(K::kDims)>> : std::integral_constant<int, K::kDims> {};

template <typename K>
std::string describe(Dim2 grid, Dim2 block) {
  std::ostringstream s;
  s << K::kName << " vec=" << K::kVec << " unroll=" << K::kUnroll << " index=" << K::kIndexBits;
  if (DimsOf<K>::value) s << " dims=" << DimsOf<K>::value;
  s << " grid=" << grid.x << "x" << grid.y << " block=" << block.x << "x" << block.y;
  return s.str();
}

struct EmulatedLauncher {
  bool execute;  // false: meta tensors, the launches are only planned

  template <typename K>
  int64_t max_blocks() const {
    return settings().max_blocks;
  }
  bool index64_only() const {
    return settings().index64_only;
  }

  template <typename K>
  void launch(Dim2 grid, Dim2 block, const K& kernel) {
    TORCH_CHECK(grid.x >= 1 && grid.x <= kMaxGridX && grid.y >= 1 && grid.y <= kMaxGridY,
                "emulated CUDA: grid ", grid.x, "x", grid.y, " outside the hardware limits");
    TORCH_CHECK(block.x >= 1 && block.y >= 1 && block.x * block.y == kThreads,
                "emulated CUDA: block ", block.x, "x", block.y, " is not ", kThreads, " threads");
    EmulationSettings& s = settings();
    ++s.launches;
    s.log.push_back(describe<K>(grid, block));
    if (!execute) return;
    std::mt19937_64 rng(static_cast<uint64_t>(s.seed) * 0x9E3779B97F4A7C15ull + s.launches);
    std::vector<Dim2> blocks;
    for (uint32_t by = 0; by < grid.y; ++by)
      for (uint32_t bx = 0; bx < grid.x; ++bx) blocks.push_back({bx, by});
    std::shuffle(blocks.begin(), blocks.end(), rng);
    std::vector<Dim2> threads;
    for (uint32_t ty = 0; ty < block.y; ++ty)
      for (uint32_t tx = 0; tx < block.x; ++tx) threads.push_back({tx, ty});
    ThreadIdx t;
    t.grid = grid;
    t.block_dim = block;
    for (const Dim2& b : blocks) {
      std::shuffle(threads.begin(), threads.end(), rng);
      t.block = b;
      for (const Dim2& th : threads) {
        t.thread = th;
        kernel(t);
      }
    }
  }
};

bool is_meta(const at::Tensor& t) {
  return t.is_meta();
}

std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double eps) {
  EmulatedLauncher launcher{!is_meta(input)};
  Loops<EmulatedLauncher> loops{launcher};
  if (!launcher.execute) {
    return frozen_bn_front(loops, input, weight, bias, running_mean, running_var, eps);
  }
  const at::Tensor none;
  EmulatedOp op({&input, weight ? &*weight : &none, bias ? &*bias : &none, &running_mean, &running_var});
  auto result = frozen_bn_front(loops, input, weight, bias, running_mean, running_var, eps);
  op.expect_stored_once(std::get<0>(result), "the output");
  op.expect_stored_once(std::get<1>(result), "the scale");
  return result;
}

at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& scale) {
  EmulatedLauncher launcher{!is_meta(grad_output)};
  Loops<EmulatedLauncher> loops{launcher};
  if (!launcher.execute) return frozen_bn_backward_front(loops, grad_output, scale);
  EmulatedOp op({&grad_output, &scale});
  at::Tensor grad_input = frozen_bn_backward_front(loops, grad_output, scale);
  op.expect_stored_once(grad_input, "grad_input");
  return grad_input;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> act_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
    int64_t activation, bool save_preact) {
  EmulatedLauncher launcher{!is_meta(input)};
  Loops<EmulatedLauncher> loops{launcher};
  auto run = [&] {
    return frozen_bn_act_front(loops, input, residual, weight, bias, running_mean, running_var, eps,
                               activation, save_preact);
  };
  if (!launcher.execute) return run();
  const at::Tensor none;
  EmulatedOp op({&input, residual ? &*residual : &none, weight ? &*weight : &none,
                 bias ? &*bias : &none, &running_mean, &running_var});
  auto result = run();
  op.expect_stored_once(std::get<0>(result), "the output");
  op.expect_stored_once(std::get<1>(result), "the scale");
  op.expect_stored_once(std::get<2>(result), "the pre-activation");
  return result;
}

std::tuple<at::Tensor, at::Tensor> act_backward(const at::Tensor& grad_output, const at::Tensor& saved,
                                                const at::Tensor& scale, int64_t activation,
                                                bool residual_grad) {
  EmulatedLauncher launcher{!is_meta(grad_output)};
  Loops<EmulatedLauncher> loops{launcher};
  auto run = [&] {
    return frozen_bn_act_backward_front(loops, grad_output, saved, scale, activation, residual_grad);
  };
  if (!launcher.execute) return run();
  EmulatedOp op({&grad_output, &saved, &scale});
  auto result = run();
  op.expect_stored_once(std::get<0>(result), "grad_input");
  // the identity's residual gradient is a copy of grad_output (ATen's), not a kernel's output
  if (activation != static_cast<int64_t>(Activation::kIdentity)) {
    op.expect_stored_once(std::get<1>(result), "grad_residual");
  }
  return result;
}

// Sets the emulated device (resident blocks for every kernel), the seed of the block and
// thread order and whether 32-bit index math is ruled out; returns (and resets) the number
// of launches since the previous call, and clears the launch log.
int64_t configure(int64_t max_blocks, int64_t seed, bool index64_only) {
  TORCH_CHECK(max_blocks >= 1, "max_blocks must be >= 1");
  EmulationSettings& s = settings();
  const int64_t launches = s.launches;
  s.max_blocks = max_blocks;
  s.seed = seed;
  s.index64_only = index64_only;
  s.launches = 0;
  s.log.clear();
  return launches;
}

std::vector<std::string> launch_log() {
  return settings().log;
}

// The order in which the emulated device runs the blocks of a (blocks x 1) grid and the
// threads of its first block: the kernels must not depend on it.
struct OrderProbe {
  static constexpr const char* kName = "order-probe";
  static constexpr int kVec = 1, kUnroll = 1, kIndexBits = 32;
  std::vector<int64_t>* blocks;
  std::vector<int64_t>* threads;
  void operator()(const ThreadIdx& t) const {
    if (t.thread.x == 0 && t.thread.y == 0) blocks->push_back(t.block.x);
    if (t.block.x == 0) threads->push_back(t.thread.y * t.block_dim.x + t.thread.x);
  }
};

std::tuple<std::vector<int64_t>, std::vector<int64_t>> execution_order(int64_t blocks, int64_t seed) {
  std::vector<int64_t> b, t;
  configure(settings().max_blocks, seed, settings().index64_only);
  EmulatedLauncher launcher{true};
  launcher.launch({static_cast<uint32_t>(blocks), 1}, {kThreads, 1}, OrderProbe{&b, &t});
  return {b, t};
}

// Number of n in [0, n_max) and [n_high - n_max, n_high] where the divider disagrees with
// `/` (bits: 32 or 64, the index type).
int64_t divider_mismatches(int64_t bits, int64_t divisor, int64_t n_max, int64_t n_high) {
  int64_t bad = 0;
  dispatch_index(bits == 32, [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const Divider<index_t> d(static_cast<index_t>(divisor));
    auto check = [&](int64_t n) {
      bad += static_cast<int64_t>(d.div(static_cast<index_t>(n))) != n / divisor;
    };
    for (int64_t n = 0; n < n_max; ++n) check(n);
    for (int64_t n = n_high - n_max; n <= n_high; ++n) check(n);
  });
  return bad;
}

}  // namespace
}  // namespace frozennorm::cuda

TORCH_LIBRARY(frozennorm_emu, m) {
  m.def(
      "frozen_bn(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
      "Tensor running_var, float eps) -> (Tensor, Tensor)");
  m.def("frozen_bn_backward(Tensor grad_output, Tensor scale) -> Tensor");
  m.def(
      "frozen_bn_act(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor running_mean, Tensor running_var, float eps, int activation, bool save_preact) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "frozen_bn_act_backward(Tensor grad_output, Tensor saved, Tensor scale, int activation, "
      "bool residual_grad) -> (Tensor, Tensor)");
  m.def("configure(int max_blocks, int seed, bool index64_only) -> int");
  m.def("launch_log() -> str[]");
  m.def("divider_mismatches(int bits, int divisor, int n_max, int n_high) -> int");
  m.def("execution_order(int blocks, int seed) -> (int[], int[])");
}

TORCH_LIBRARY_IMPL(frozennorm_emu, CPU, m) {
  m.impl("frozen_bn", &frozennorm::cuda::forward);
  m.impl("frozen_bn_backward", &frozennorm::cuda::backward);
  m.impl("frozen_bn_act", &frozennorm::cuda::act_forward);
  m.impl("frozen_bn_act_backward", &frozennorm::cuda::act_backward);
}

TORCH_LIBRARY_IMPL(frozennorm_emu, Meta, m) {
  m.impl("frozen_bn", &frozennorm::cuda::forward);
  m.impl("frozen_bn_backward", &frozennorm::cuda::backward);
  m.impl("frozen_bn_act", &frozennorm::cuda::act_forward);
  m.impl("frozen_bn_act_backward", &frozennorm::cuda::act_backward);
}

TORCH_LIBRARY_IMPL(frozennorm_emu, CatchAll, m) {
  m.impl("configure", &frozennorm::cuda::configure);
  m.impl("launch_log", &frozennorm::cuda::launch_log);
  m.impl("divider_mismatches", &frozennorm::cuda::divider_mismatches);
  m.impl("execution_order", &frozennorm::cuda::execution_order);
}
