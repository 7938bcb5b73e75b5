// The CUDA kernels of float32 data with float32 (or 16-bit) statistics, computed in float32: one translation unit per
// dtype pair, so that the build compiles them in parallel (frozen_bn_cuda.cu declares them).
#include "cuda_launcher.cuh"

template struct frozennorm::cuda::TypedLoops<float, float, frozennorm::cuda::CudaLauncher>;
