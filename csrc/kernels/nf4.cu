// nf4.cu: the CUDA kernels of nf4.h.
//   dequantize   bandwidth-bound: one thread per 32 values (a 16-byte load of packed codes, one block scale, 16-byte
//                stores); a scalar kernel for unaligned or oddly strided outputs.
//   quantize     one warp per quantization block (max-reduce with shuffles, then codes); bitsandbytes' CUDA rule.
//   blockwise8   the nested absmax quantizer: one warp per block of 256 values, bitsandbytes' binary search.
//   matmul       small M (<= 16): each warp owns a few output rows n, streams their 4-bit codes once (16-byte
//                loads, 32 values per lane), multiplies with x rows read through L1, reduces across the warp and
//                adds the LoRA term and bias in the epilogue. The 16-bit weight is never written.
// Built with --use_fast_math (as bitsandbytes is): the quantizers' `1.0f / absmax` is the same approximate
// reciprocal bitsandbytes computes; products and sums that must match exactly use __fmul_rn / __fadd_rn.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nf4.h"

namespace fusedrl {
namespace {

// The NF4 table travels as a kernel argument (no per-device constant memory to initialise).
struct CodeTable {
  float v[16];
};

CodeTable code_table() {
  CodeTable t;
  for (int i = 0; i < 16; ++i) t.v[i] = kNf4Code[i];
  return t;
}

template <typename T> struct Conv;
template <> struct Conv<float> {
  __device__ static float load(float x) { return x; }
  __device__ static float store(float x) { return x; }
};
template <> struct Conv<__half> {
  __device__ static float load(__half x) { return __half2float(x); }
  __device__ static __half store(float x) { return __float2half_rn(x); }
};
template <> struct Conv<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ void load_code_table(const CodeTable& table, float* lut) {
  if (threadIdx.x < 16) lut[threadIdx.x] = table.v[threadIdx.x];  // __grid_constant__: read in place
  __syncthreads();
}

// 32 values from 16 packed bytes (high nibble first), each the product code * scale rounded once.
__device__ __forceinline__ void decode32(const uint4& q, float scale, const float* lut, float* v) {
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint32_t byte = (words[w] >> (8 * b)) & 0xffu;
      v[8 * w + 2 * b] = __fmul_rn(lut[byte >> 4], scale);
      v[8 * w + 2 * b + 1] = __fmul_rn(lut[byte & 15u], scale);
    }
  }
}

// Stores 32 floats as T at dst (16-byte aligned).
template <typename T>
__device__ __forceinline__ void store32(T* dst, const float* v) {
  constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < 32 / kPerVec; ++i) {
    union {
      uint4 u;
      T t[kPerVec];
    } pack;
#pragma unroll
    for (int j = 0; j < kPerVec; ++j) pack.t[j] = Conv<T>::store(v[i * kPerVec + j]);
    reinterpret_cast<uint4*>(dst)[i] = pack.u;
  }
}

// ---- dequantize -------------------------------------------------------------------------------------------------

// Requires: packed and out 16-byte aligned, and either ld == cols or cols % 32 == 0 with ld * sizeof(T) % 16 == 0.
template <typename T>
__global__ void __launch_bounds__(256) nf4_dequantize_vec_kernel(Nf4DequantParams p, int64_t chunks, const __grid_constant__ CodeTable table) {
  __shared__ float lut[16];
  load_code_table(table, lut);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= chunks) return;
  const int64_t e = t * 32;
  const uint4 q = __ldg(reinterpret_cast<const uint4*>(p.w.packed) + t);
  const float scale = nf4_block_scale(p.w, e / p.w.blocksize);
  float v[32];
  decode32(q, scale, lut, v);
  const int64_t row = p.ld == p.w.cols ? 0 : e / p.w.cols;
  const int64_t offset = p.ld == p.w.cols ? e : row * p.ld + (e - row * p.w.cols);
  store32(static_cast<T*>(p.out) + offset, v);
}

// One thread per value, any layout; also finishes the tail (< 32 values) of the vector kernel from `first`.
template <typename T>
__global__ void nf4_dequantize_scalar_kernel(Nf4DequantParams p, int64_t first, int64_t n, const __grid_constant__ CodeTable table) {
  __shared__ float lut[16];
  load_code_table(table, lut);
  const int64_t i = first + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint8_t byte = p.w.packed[i >> 1];
  const int code = (i & 1) ? byte & 15 : byte >> 4;
  const float v = __fmul_rn(lut[code], nf4_block_scale(p.w, i / p.w.blocksize));
  const int64_t row = i / p.w.cols;
  static_cast<T*>(p.out)[row * p.ld + (i - row * p.w.cols)] = Conv<T>::store(v);
}

template <typename T>
cudaError_t dequantize_typed(const Nf4DequantParams& p, cudaStream_t stream) {
  const int64_t n = p.w.rows * p.w.cols;
  if (n == 0) return cudaSuccess;
  const bool aligned = reinterpret_cast<uintptr_t>(p.w.packed) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(p.out) % 16 == 0 && p.w.blocksize % 32 == 0;
  const bool layout = p.ld == p.w.cols || (p.w.cols % 32 == 0 && (p.ld * sizeof(T)) % 16 == 0);
  int64_t first_scalar = 0;
  if (aligned && layout) {
    const int64_t chunks = n / 32;
    if (chunks > 0) {
      const int threads = 256;
      nf4_dequantize_vec_kernel<T><<<static_cast<unsigned>((chunks + threads - 1) / threads), threads, 0, stream>>>(
          p, chunks, code_table());
    }
    first_scalar = chunks * 32;
  }
  if (first_scalar < n) {
    const int threads = 256;
    const int64_t count = n - first_scalar;
    nf4_dequantize_scalar_kernel<T><<<static_cast<unsigned>((count + threads - 1) / threads), threads, 0, stream>>>(
        p, first_scalar, n, code_table());
  }
  return cudaGetLastError();
}

// ---- quantize -----------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One warp per block of `blocksize` values; each lane produces whole bytes (pairs of values).
template <typename T>
__global__ void nf4_quantize_kernel(const T* x, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                                    int64_t nblocks) {
  const Nf4CudaThresholds thresholds;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= nblocks) return;
  const int64_t start = b * blocksize, stop = min(n, start + blocksize);
  float amax = -3.402823466e38f;
  for (int64_t i = start + lane; i < stop; i += 32) amax = fmaxf(amax, fabsf(Conv<T>::load(x[i])));
  amax = warp_max(amax);
  if (lane == 0) absmax[b] = amax;
  const float scale = 1.0f / amax;  // approximate under --use_fast_math, as in bitsandbytes
  for (int64_t i = start + 2 * lane; i < stop; i += 64) {
    const float hi = Conv<T>::load(x[i]) * scale;
    const float lo = (i + 1 < stop ? Conv<T>::load(x[i + 1]) : 0.0f) * scale;  // the pad value 0 is scaled too
    packed[i >> 1] = static_cast<uint8_t>(nf4_index(hi, thresholds.v) << 4 | nf4_index(lo, thresholds.v));
  }
}

__global__ void blockwise8_quantize_kernel(const float* x, int64_t n, int64_t blocksize, const float* code,
                                           uint8_t* out, float* absmax, int64_t nblocks) {
  __shared__ float smem_code[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) smem_code[i] = code[i];
  __syncthreads();
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= nblocks) return;
  const int64_t start = b * blocksize, stop = min(n, start + blocksize);
  float amax = -3.402823466e38f;
  for (int64_t i = start + lane; i < stop; i += 32) amax = fmaxf(amax, fabsf(x[i]));
  amax = warp_max(amax);
  if (lane == 0) absmax[b] = amax;
  const float scale = 1.0f / amax;
  for (int64_t i = start + lane; i < stop; i += 32) out[i] = static_cast<uint8_t>(blockwise8_index(smem_code, x[i] * scale));
}

// ---- small-M matmul -----------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void load8(const T* src, float* v) {
  union {
    uint4 u;
    T t[8];
  } pack;
  pack.u = __ldg(reinterpret_cast<const uint4*>(src));
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = Conv<T>::load(pack.t[j]);
}

// MT: x rows handled (>= p.m); NR: output rows per warp.
template <typename T, int MT, int NR>
__global__ void __launch_bounds__(128) nf4_matmul_kernel(Nf4MatmulParams p, const __grid_constant__ CodeTable table) {
  __shared__ float lut[16];
  load_code_table(table, lut);
  const int lane = threadIdx.x % 32;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32) * NR;
  if (n0 >= p.w.rows) return;
  const int64_t k = p.w.cols;
  const T* x = static_cast<const T*>(p.x);
  float acc[NR][MT];
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;

  for (int64_t k0 = static_cast<int64_t>(lane) * 32; k0 < k; k0 += 32 * 32) {
    float w[NR][32];
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      const int64_t n = n0 + r;
      if (n < p.w.rows) {
        const int64_t e = n * k + k0;
        const uint4 q = __ldg(reinterpret_cast<const uint4*>(p.w.packed + e / 2));
        decode32(q, nf4_block_scale(p.w, e / p.w.blocksize), lut, w[r]);
      } else {
#pragma unroll
        for (int j = 0; j < 32; ++j) w[r][j] = 0.0f;
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < p.m) {
#pragma unroll
        for (int piece = 0; piece < 4; ++piece) {
          float xv[8];
          load8(x + m * k + k0 + piece * 8, xv);
#pragma unroll
          for (int r = 0; r < NR; ++r)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[r][m] = fmaf(xv[j], w[r][piece * 8 + j], acc[r][m]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);

  // Epilogue: lane (r, m) adds the LoRA term and the bias and writes y[m, n0 + r].
#pragma unroll
  for (int r = 0; r < NR; ++r) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int64_t n = n0 + r;
      if (lane == (r * MT + m) % 32 && m < p.m && n < p.w.rows) {
        float s = acc[r][m];
        if (p.lora != nullptr) {
          const T* bn = static_cast<const T*>(p.lora_B) + n * p.rank;
          for (int64_t j = 0; j < p.rank; ++j) s = fmaf(p.lora[m * p.rank + j], Conv<T>::load(bn[j]), s);
        }
        if (p.bias != nullptr) s += Conv<T>::load(static_cast<const T*>(p.bias)[n]);
        static_cast<T*>(p.y)[m * p.ld_y + n] = Conv<T>::store(s);
      }
    }
  }
}

template <typename T, int MT, int NR>
cudaError_t launch_matmul(const Nf4MatmulParams& p, cudaStream_t stream) {
  constexpr int kWarps = 4;
  const int64_t rows_per_block = kWarps * NR;
  const unsigned blocks = static_cast<unsigned>((p.w.rows + rows_per_block - 1) / rows_per_block);
  nf4_matmul_kernel<T, MT, NR><<<blocks, kWarps * 32, 0, stream>>>(p, code_table());
  return cudaGetLastError();
}

template <typename T>
cudaError_t matmul_typed(const Nf4MatmulParams& p, cudaStream_t stream) {
  if (p.m <= 1) return launch_matmul<T, 1, 2>(p, stream);
  if (p.m <= 2) return launch_matmul<T, 2, 2>(p, stream);
  if (p.m <= 4) return launch_matmul<T, 4, 2>(p, stream);
  if (p.m <= 8) return launch_matmul<T, 8, 2>(p, stream);
  return launch_matmul<T, 16, 2>(p, stream);
}

}  // namespace

cudaError_t nf4_dequantize_cuda(const Nf4DequantParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case Nf4Dtype::kFloat32: return dequantize_typed<float>(p, stream);
    case Nf4Dtype::kFloat16: return dequantize_typed<__half>(p, stream);
    default: return dequantize_typed<__nv_bfloat16>(p, stream);
  }
}

cudaError_t nf4_quantize_cuda(const void* x, Nf4Dtype dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                              float* absmax, cudaStream_t stream) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  if (nblocks == 0) return cudaSuccess;
  const int warps = 8;
  const unsigned grid = static_cast<unsigned>((nblocks + warps - 1) / warps);
  switch (dtype) {
    case Nf4Dtype::kFloat32:
      nf4_quantize_kernel<<<grid, warps * 32, 0, stream>>>(static_cast<const float*>(x), n, blocksize, packed,
                                                           absmax, nblocks);
      break;
    case Nf4Dtype::kFloat16:
      nf4_quantize_kernel<<<grid, warps * 32, 0, stream>>>(static_cast<const __half*>(x), n, blocksize, packed,
                                                           absmax, nblocks);
      break;
    default:
      nf4_quantize_kernel<<<grid, warps * 32, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), n, blocksize,
                                                           packed, absmax, nblocks);
  }
  return cudaGetLastError();
}

cudaError_t blockwise8_quantize_cuda(const float* x, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                                     float* absmax, cudaStream_t stream) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  if (nblocks == 0) return cudaSuccess;
  const int warps = 8;
  blockwise8_quantize_kernel<<<static_cast<unsigned>((nblocks + warps - 1) / warps), warps * 32, 0, stream>>>(
      x, n, blocksize, code, out, absmax, nblocks);
  return cudaGetLastError();
}

cudaError_t nf4_matmul_cuda(const Nf4MatmulParams& p, cudaStream_t stream) {
  if (!nf4_matmul_cuda_supported(p)) return cudaErrorInvalidValue;
  if (p.w.rows == 0) return cudaSuccess;
  return p.dtype == Nf4Dtype::kFloat16 ? matmul_typed<__half>(p, stream) : matmul_typed<__nv_bfloat16>(p, stream);
}

}  // namespace fusedrl
