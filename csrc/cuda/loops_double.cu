// The CUDA kernels of float64 data, computed in float64: one translation unit per
// dtype pair, so that the build compiles them in parallel (frozen_bn_cuda.cu declares them).
#include "cuda_launcher.cuh"

template struct frozennorm::cuda::TypedLoops<double, double, frozennorm::cuda::CudaLauncher>;
