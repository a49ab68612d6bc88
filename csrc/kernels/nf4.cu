// nf4.cu: the CUDA kernels of nf4.h.
//   dequantize   bandwidth-bound: each lane turns V / 2 packed bytes into one 16-byte store (a warp writes 512
//                contiguous bytes per instruction), several chunks in flight per thread, block scales decoded once
//                per warp; a scalar kernel for unaligned or oddly strided outputs and the last < V values.
//   quantize     one warp per quantization block (max-reduce with shuffles, then codes); bitsandbytes' CUDA rule.
//   blockwise8   the nested absmax quantizer: one warp per block of 256 values, bitsandbytes' binary search.
//   matmul       small M (<= 16), the 16-bit weight never written. K % 128 == 0: tensor cores (mma.m16n8k16, x as
//                the M side padded to 16), 8 output rows per block of 4 split-K warps, the 4-bit codes streamed once
//                with the next chunk's load in flight. Otherwise a CUDA-core kernel: each warp owns 2 output rows,
//                streams their codes (16-byte loads, 32 values per lane), multiplies with x rows read through L1 and
//                reduces across the warp. Both add the LoRA term and bias in the epilogue.
// Built with --use_fast_math (as bitsandbytes is): the quantizers' `1.0f / absmax` is the same approximate
// reciprocal bitsandbytes computes; products and sums that must match exactly use __fmul_rn / __fadd_rn.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nf4.h"
#include "dtype_conv.cuh"

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
//
// Vector kernel: the output is cut into chunks of V = 16 / sizeof(T) consecutive values (8 for 16-bit outputs, 4 for
// float32): lane l of a warp owns one chunk per iteration, reads its V / 2 packed bytes in one load (4 or 2 bytes)
// and writes its V values in one 16-byte store, so a warp's load covers 32 * V / 2 contiguous bytes and its store
// 512 contiguous bytes. Each warp walks U consecutive 32-chunk groups (all U loads issued before the first store),
// and the block scales of its whole span (at most 32 blocks: U * V <= 32 and blocks hold >= 32 values) are decoded
// once, one per lane, and handed out with a shuffle. Block index = value index >> log2(blocksize); a strided output
// (ld > cols, cols % V == 0) maps chunk -> (row, column) with a multiply-high division by cols / V.

// Exact n / d for n < 2^31 and 1 <= d < 2^31: m = ceil(2^(31 + s) / d) with 2^s >= d, then q = (n * m) >> (31 + s).
// (m * d - 2^(31+s) < d <= 2^s, so the rounding error n * (m d - 2^(31+s)) / d stays below 2^(31+s) / d: exact.)
struct FastDiv31 {
  uint32_t mul = 1u << 31;
  uint32_t shift = 31;
};

FastDiv31 make_fastdiv31(uint32_t d) {
  uint32_t s = 0;
  while ((uint64_t{1} << s) < d) ++s;
  const uint64_t big = uint64_t{1} << (31 + s);
  FastDiv31 f;
  f.mul = static_cast<uint32_t>((big + d - 1) / d);
  f.shift = 31 + s;
  return f;
}

__device__ __forceinline__ uint32_t fastdiv31(uint32_t n, FastDiv31 f) {
  return static_cast<uint32_t>((static_cast<uint64_t>(n) * f.mul) >> f.shift);
}

template <int V> struct PackedWord;
template <> struct PackedWord<8> { using type = uint32_t; };
template <> struct PackedWord<4> { using type = uint16_t; };

// V values of T packed in 16 bytes
template <typename T> struct Store16;
template <> struct Store16<float> {
  __device__ static uint4 pack(const float* v) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  }
};
template <> struct Store16<__nv_bfloat16> {
  __device__ static uint32_t pair(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);  // .x = a (low half): element order in memory
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static uint4 pack(const float* v) {
    return make_uint4(pair(v[0], v[1]), pair(v[2], v[3]), pair(v[4], v[5]), pair(v[6], v[7]));
  }
};
template <> struct Store16<__half> {
  __device__ static uint32_t pair(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static uint4 pack(const float* v) {
    return make_uint4(pair(v[0], v[1]), pair(v[2], v[3]), pair(v[4], v[5]), pair(v[6], v[7]));
  }
};

constexpr int kDequantThreads = 256;

struct DequantGrid {
  uint32_t nchunks = 0;    // chunks of V values written by the vector kernel
  int shift = 6;           // log2(blocksize)
  int64_t nblocks = 0;     // quantization blocks of the weight
  FastDiv31 chunks_per_row;  // cols / V (strided outputs only)
};

template <typename T, int U, bool kStrided>
__global__ void __launch_bounds__(kDequantThreads) nf4_dequantize_vec_kernel(Nf4DequantParams p, DequantGrid g,
                                                                           const __grid_constant__ CodeTable table) {
  constexpr int V = 16 / sizeof(T);
  static_assert(U * V <= 32, "a warp's span must hold at most 32 quantization blocks of >= 32 values");
  using Word = typename PackedWord<V>::type;
  __shared__ float lut[16];
  load_code_table(table, lut);
  const int lane = threadIdx.x & 31;
  const uint32_t warp = blockIdx.x * (kDequantThreads / 32) + threadIdx.x / 32;
  const uint32_t chunk0 = warp * (U * 32);
  if (chunk0 >= g.nchunks) return;

  // Scales of the blocks spanned by this warp: lane j decodes block first_block + j.
  const int64_t first_block = (static_cast<int64_t>(chunk0) * V) >> g.shift;
  const int span_blocks = max(1, (U * 32 * V) >> g.shift);
  float lane_scale = 0.0f;
  if (lane < span_blocks && first_block + lane < g.nblocks) lane_scale = nf4_block_scale(p.w, first_block + lane);

  Word q[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const uint32_t c = chunk0 + u * 32 + lane;
    q[u] = c < g.nchunks ? __ldg(reinterpret_cast<const Word*>(p.w.packed) + c) : Word(0);
  }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const uint32_t c = chunk0 + u * 32 + lane;
    const int src = static_cast<int>(((static_cast<int64_t>(c) * V) >> g.shift) - first_block);
    const float scale = __shfl_sync(0xffffffffu, lane_scale, src & 31);
    if (c < g.nchunks) {
      float v[V];
      const uint32_t word = q[u];
#pragma unroll
      for (int b = 0; b < V / 2; ++b) {  // byte b holds values 2b (high nibble) and 2b + 1 (low nibble)
        v[2 * b] = __fmul_rn(lut[(word >> (8 * b + 4)) & 15u], scale);
        v[2 * b + 1] = __fmul_rn(lut[(word >> (8 * b)) & 15u], scale);
      }
      int64_t offset = static_cast<int64_t>(c) * V;
      if (kStrided) {
        const uint32_t row = fastdiv31(c, g.chunks_per_row);
        const uint32_t col_chunk = c - row * static_cast<uint32_t>(p.w.cols / V);
        offset = static_cast<int64_t>(row) * p.ld + static_cast<int64_t>(col_chunk) * V;
      }
      *reinterpret_cast<uint4*>(out + offset) = Store16<T>::pack(v);
    }
  }
}

// One thread per value, any layout; also finishes the tail (< V values) of the vector kernel from `first`.
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

int multiprocessors() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 132;
  return sms;
}

template <typename T, bool kStrided>
void launch_dequant_vec(const Nf4DequantParams& p, const DequantGrid& g, cudaStream_t stream) {
  // Iterations per warp: as many as keep at least two waves of resident threads (2048 per SM) busy.
  const int64_t threads_wanted = static_cast<int64_t>(multiprocessors()) * 2048 * 2;
  const int64_t per_block = kDequantThreads;
  auto blocks = [&](int u) { return static_cast<unsigned>((g.nchunks + per_block * u - 1) / (per_block * u)); };
  if (g.nchunks >= threads_wanted * 4) {
    nf4_dequantize_vec_kernel<T, 4, kStrided><<<blocks(4), kDequantThreads, 0, stream>>>(p, g, code_table());
  } else if (g.nchunks >= threads_wanted * 2) {
    nf4_dequantize_vec_kernel<T, 2, kStrided><<<blocks(2), kDequantThreads, 0, stream>>>(p, g, code_table());
  } else {
    nf4_dequantize_vec_kernel<T, 1, kStrided><<<blocks(1), kDequantThreads, 0, stream>>>(p, g, code_table());
  }
}

template <typename T>
cudaError_t dequantize_typed(const Nf4DequantParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t n = p.w.rows * p.w.cols;
  if (n == 0) return cudaSuccess;
  const int64_t bs = p.w.blocksize;
  const bool pow2_block = bs >= 32 && (bs & (bs - 1)) == 0;
  const bool aligned = reinterpret_cast<uintptr_t>(p.w.packed) % (V / 2) == 0 &&
                       reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
  const bool contiguous = p.ld == p.w.cols;
  const bool strided = !contiguous && p.w.cols % V == 0 && (p.ld * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  const int64_t nchunks = n / V;
  int64_t first_scalar = 0;
  if (pow2_block && aligned && (contiguous || strided) && nchunks > 0 && nchunks < (int64_t{1} << 31) - 1024) {
    DequantGrid g;
    g.nchunks = static_cast<uint32_t>(nchunks);
    g.shift = 0;
    while ((int64_t{1} << g.shift) < bs) ++g.shift;
    g.nblocks = (n + bs - 1) >> g.shift;
    if (strided) {
      g.chunks_per_row = make_fastdiv31(static_cast<uint32_t>(p.w.cols / V));
      launch_dequant_vec<T, true>(p, g, stream);
    } else {
      launch_dequant_vec<T, false>(p, g, stream);
    }
    first_scalar = nchunks * V;
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

// Tensor-core small-M kernel (K % 128 == 0): a block of 4 warps owns 8 output rows n; warp w takes the 128-value
// chunks w, w + 4, ... of K (split-K, summed through shared memory at the end). Per chunk, lane (g = lane / 4,
// q = lane % 4) loads 16 packed bytes of row n0 + g (values 32q .. 32q + 31 of the chunk, one block scale) and 64
// bytes of x rows g and g + 8, then issues 8 mma.m16n8k16 (x rows as M padded to 16, the 8 rows as N). The k order
// inside an mma is a permutation of the physical order, the same for x and W: step s gives lane q the physical values
// 32q + 4s + {0, 1} as its fragment columns 2q, 2q + 1 and 32q + 4s + {2, 3} as 2q + 8, 2q + 9, so both operands come
// from contiguous registers. The weight is rounded once to T (as nf4_dequantize writes it), products accumulate in
// float on the tensor cores; the epilogue adds the LoRA term and the bias.
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  __device__ static void run(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};
template <> struct Mma<__half> {
  __device__ static void run(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

constexpr int kMmaWarps = 4;
constexpr int kMmaRows = 8;

template <typename T, bool kUpperRows>
__global__ void __launch_bounds__(kMmaWarps * 32) nf4_matmul_mma_kernel(Nf4MatmulParams p, int shift,
                                                                        const __grid_constant__ CodeTable table) {
  __shared__ float lut[16];
  __shared__ float partial[kMmaWarps][16][kMmaRows];
  load_code_table(table, lut);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int64_t k = p.w.cols, n0 = static_cast<int64_t>(blockIdx.x) * kMmaRows, row = n0 + g;
  const bool row_ok = row < p.w.rows;
  const int64_t chunks = k / 128;
  const uint8_t* wrow = p.w.packed + (row_ok ? row : 0) * (k / 2) + q * 16;
  const T* x = static_cast<const T*>(p.x);
  const bool x0_ok = g < p.m, x1_ok = kUpperRows && g + 8 < p.m;
  const T* x0 = x + (x0_ok ? g : 0) * k + q * 32;
  const T* x1 = x + (x1_ok ? g + 8 : 0) * k + q * 32;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  auto load_w = [&](int64_t ch, uint4& wq, float& scale) {
    if (row_ok && ch < chunks) {
      wq = __ldg(reinterpret_cast<const uint4*>(wrow + ch * 64));
      scale = nf4_block_scale(p.w, (row * k + ch * 128 + q * 32) >> shift);
    } else {
      wq = zero;
      scale = 0.0f;
    }
  };
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  uint4 wq_next;
  float scale_next;
  load_w(warp, wq_next, scale_next);
  for (int64_t ch = warp; ch < chunks; ch += kMmaWarps) {
    const uint4 wq = wq_next;
    const float scale = scale_next;
    load_w(ch + kMmaWarps, wq_next, scale_next);  // in flight while this chunk computes
    uint4 xa[4], xb[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      xa[i] = x0_ok ? __ldg(reinterpret_cast<const uint4*>(x0 + ch * 128) + i) : zero;
      xb[i] = x1_ok ? __ldg(reinterpret_cast<const uint4*>(x1 + ch * 128) + i) : zero;
    }
    const uint32_t words[4] = {wq.x, wq.y, wq.z, wq.w};
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const uint32_t word = words[s / 2] >> (16 * (s % 2));
      const uint32_t byte0 = word & 0xffu, byte1 = (word >> 8) & 0xffu;
      const uint32_t b0 = Store16<T>::pair(__fmul_rn(lut[byte0 >> 4], scale), __fmul_rn(lut[byte0 & 15u], scale));
      const uint32_t b1 = Store16<T>::pair(__fmul_rn(lut[byte1 >> 4], scale), __fmul_rn(lut[byte1 & 15u], scale));
      const uint4& va = xa[s / 2];
      const uint4& vb = xb[s / 2];
      const uint32_t a0 = s % 2 ? va.z : va.x, a2 = s % 2 ? va.w : va.y;
      const uint32_t a1 = s % 2 ? vb.z : vb.x, a3 = s % 2 ? vb.w : vb.y;
      Mma<T>::run(c, a0, a1, a2, a3, b0, b1);
    }
  }
  // c0, c1: (m = g, n = 2q, 2q + 1); c2, c3: (m = g + 8, same n)
  partial[warp][g][2 * q] = c[0];
  partial[warp][g][2 * q + 1] = c[1];
  partial[warp][g + 8][2 * q] = c[2];
  partial[warp][g + 8][2 * q + 1] = c[3];
  __syncthreads();
  const int m = threadIdx.x / kMmaRows, nn = threadIdx.x % kMmaRows;  // 128 threads = 16 x 8 outputs
  const int64_t n = n0 + nn;
  if (m >= p.m || n >= p.w.rows) return;
  float sum = 0.0f;
#pragma unroll
  for (int w = 0; w < kMmaWarps; ++w) sum += partial[w][m][nn];
  if (p.lora != nullptr) {
    const T* bn = static_cast<const T*>(p.lora_B) + n * p.rank;
    for (int64_t j = 0; j < p.rank; ++j) sum = fmaf(p.lora[m * p.rank + j], Conv<T>::load(bn[j]), sum);
  }
  if (p.bias != nullptr) sum += Conv<T>::load(static_cast<const T*>(p.bias)[n]);
  static_cast<T*>(p.y)[m * p.ld_y + n] = Conv<T>::store(sum);
}

template <typename T>
cudaError_t launch_matmul_mma(const Nf4MatmulParams& p, cudaStream_t stream) {
  int shift = 0;
  while ((int64_t{1} << shift) < p.w.blocksize) ++shift;
  const unsigned blocks = static_cast<unsigned>((p.w.rows + kMmaRows - 1) / kMmaRows);
  if (p.m > 8)
    nf4_matmul_mma_kernel<T, true><<<blocks, kMmaWarps * 32, 0, stream>>>(p, shift, code_table());
  else
    nf4_matmul_mma_kernel<T, false><<<blocks, kMmaWarps * 32, 0, stream>>>(p, shift, code_table());
  return cudaGetLastError();
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
  if (p.w.cols % 128 == 0) return launch_matmul_mma<T>(p, stream);
  if (p.m <= 1) return launch_matmul<T, 1, 2>(p, stream);
  if (p.m <= 2) return launch_matmul<T, 2, 2>(p, stream);
  if (p.m <= 4) return launch_matmul<T, 4, 2>(p, stream);
  if (p.m <= 8) return launch_matmul<T, 8, 2>(p, stream);
  return launch_matmul<T, 16, 2>(p, stream);
}

// ---- LoRA down-projection (small M) ------------------------------------------------------------------------------

// One warp per output (i, j): the dot product of x row i and A row j, 8 values per lane per step.
template <typename T>
__global__ void __launch_bounds__(128) nf4_lora_down_kernel(Nf4LoraDownParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t out = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (out >= p.m * p.rank) return;
  const int64_t i = out / p.rank, j = out - i * p.rank;
  const T* x = static_cast<const T*>(p.x) + i * p.k;
  const T* a = static_cast<const T*>(p.a) + j * p.k;
  float acc = 0.0f;
  for (int64_t k0 = static_cast<int64_t>(lane) * 8; k0 < p.k; k0 += 256) {
    float xv[8], av[8];
    load8(x + k0, xv);
    load8(a + k0, av);
#pragma unroll
    for (int t = 0; t < 8; ++t) acc = fmaf(xv[t], av[t], acc);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) p.lora[out] = acc * p.scaling;
}

}  // namespace

cudaError_t nf4_lora_down_cuda(const Nf4LoraDownParams& p, cudaStream_t stream) {
  if (!nf4_lora_down_cuda_supported(p)) return cudaErrorInvalidValue;
  const int64_t outputs = p.m * p.rank;
  if (outputs == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((outputs + 3) / 4);
  if (p.dtype == Nf4Dtype::kFloat16)
    nf4_lora_down_kernel<__half><<<blocks, 128, 0, stream>>>(p);
  else
    nf4_lora_down_kernel<__nv_bfloat16><<<blocks, 128, 0, stream>>>(p);
  return cudaGetLastError();
}

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
