// Conv<T>: loads a storage type into the float (or double) the kernels compute in, and stores back with
// round-to-nearest-even. One definition for every CUDA kernel file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fusedrl {

template <typename T> struct Conv;
template <> struct Conv<float> {
  __device__ static float load(float x) { return x; }
  __device__ static float store(float x) { return x; }
};
template <> struct Conv<double> {
  __device__ static double load(double x) { return x; }
  __device__ static double store(double x) { return x; }
};
template <> struct Conv<__half> {
  __device__ static float load(__half x) { return __half2float(x); }
  __device__ static __half store(float x) { return __float2half_rn(x); }
};
template <> struct Conv<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

}  // namespace fusedrl
