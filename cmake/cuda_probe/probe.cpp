// The torch CUDA headers csrc/torch/*_cuda.cpp include: compiling this proves the toolkit has what they need.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

int fusedrl_cuda_probe() { return at::cuda::getCurrentCUDAStream().id() != 0; }
