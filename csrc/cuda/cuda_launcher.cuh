// Real kernel launches on the current stream: the Launcher (launch.h) of the CUDA ops, and
// the one __global__ entry every kernel functor runs through. CUDA-only (nvcc).
#pragma once

#include "frozen_bn_cuda_impl.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace frozennorm::cuda {

// minBlocks 1: no register target below what the kernel needs (without it, ptxas gives the
// kernels with a slow-path call, SiLU's division, too few registers, and they spill).
template <typename K>
__global__ void __launch_bounds__(kThreads, 1) kernel_entry(const K kernel) {
  kernel(ThreadIdx::current());
}

// FROZENNORM_CUDA_INDEX64=1 makes every launch use 64-bit index math (read once): the GPU
// checks run the 64-bit kernels on small tensors with it.
inline bool index64_only_from_env() {
  static const bool value = [] {
    const char* v = std::getenv("FROZENNORM_CUDA_INDEX64");
    return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
  }();
  return value;
}

class CudaLauncher {
 public:
  explicit CudaLauncher(const at::Device& device)
      : device_index_(device.index()), stream_(c10::cuda::getCurrentCUDAStream(device.index())) {}

  // Resident blocks of K per SM (its registers decide) times the SMs.
  template <typename K>
  int64_t max_blocks() const {
    static const int per_sm = [] {
      int n = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel_entry<K>, kThreads, 0));
      return std::max(n, 1);
    }();
    return static_cast<int64_t>(sm_count(device_index_)) * per_sm;
  }

  bool index64_only() const {
    return index64_only_from_env();
  }

  template <typename K>
  void launch(Dim2 grid, Dim2 block, const K& kernel) {
    kernel_entry<K><<<dim3(grid.x, grid.y), dim3(block.x, block.y), 0, stream_.stream()>>>(kernel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  static int sm_count(c10::DeviceIndex index) {
    static std::mutex mutex;
    static std::vector<int> counts;
    std::lock_guard<std::mutex> lock(mutex);
    if (static_cast<size_t>(index) >= counts.size()) counts.resize(index + 1, 0);
    if (counts[index] == 0) {
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[index], cudaDevAttrMultiProcessorCount, index));
    }
    return counts[index];
  }

  c10::DeviceIndex device_index_;
  c10::cuda::CUDAStream stream_;
};

}  // namespace frozennorm::cuda
