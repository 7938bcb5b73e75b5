// The CUDA kernels of float32 data with float64 statistics, computed in float64: one translation unit per
// dtype pair, so that the build compiles them in parallel (frozen_bn_cuda.cu declares them).
#include "cuda_launcher.cuh"

template struct frozennorm::cuda::TypedLoops<float, double, frozennorm::cuda::CudaLauncher>;
