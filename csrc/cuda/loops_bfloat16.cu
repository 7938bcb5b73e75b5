// The CUDA kernels of bfloat16 data, computed in float32: one translation unit per
// dtype pair, so that the build compiles them in parallel (frozen_bn_cuda.cu declares them).
#include "cuda_launcher.cuh"

template struct frozennorm::cuda::TypedLoops<c10::BFloat16, float, frozennorm::cuda::CudaLauncher>;
