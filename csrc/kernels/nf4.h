// nf4: bitsandbytes-compatible 4-bit NormalFloat weights: dequantize, quantize, and a fused small-M matmul.
//
// Storage (exactly bitsandbytes' `quantize_4bit(..., quant_type="nf4")`): a weight W (rows N, cols K) is read as
// one flat row-major sequence of N*K values cut into blocks of `blocksize` (64, 128 or 256; the last block may be
// partial). Each value is stored as a 4-bit index into kNf4Code, two per byte, the first element of a pair in the
// HIGH nibble: packed[i/2] >> 4 for even i, packed[i/2] & 15 for odd i; ceil(N*K/2) bytes.
// Per block one scale `absmax[b]` (float32), either plain or double-quantized ("nested",
// compress_statistics=True): absmax_q[b] (uint8) indexes the 256-entry signed dynamic map `nested_code`, scaled by
// one float32 `nested_absmax` per 256 blocks, plus the float32 `offset` (the mean of the original absmax):
//     absmax[b] = fl(fl(nested_code[absmax_q[b]] * nested_absmax[b / 256]) + offset)       (multiply, then add)
//     W[i]      = to_dtype(fl(kNf4Code[q[i]] * absmax[i / blocksize]))                       (rounded once)
// That is bitsandbytes' arithmetic step by step, so the output is bit-identical to its dequantize_4bit for
// float32, float16 and bfloat16 (no fused multiply-add anywhere: the CPU file is compiled with
// -ffp-contract=off, the CUDA kernels use __fmul_rn / __fadd_rn).
//
// Quantization, per block: absmax = max |x|; q = number of thresholds t with x * scale > t (the midpoints of
// neighbouring table entries; a value equal to a midpoint takes the lower code). bitsandbytes rounds slightly
// differently per device and we follow each device, so the bytes equal bitsandbytes' on the same device:
//   CPU (its PyTorch reference op):  scale = 1 / max(absmax, 1e-38) correctly rounded, x * scale clamped to
//        [-1, 1]; the partial last block divides (x / absmax) instead; thresholds = float32 midpoints. An
//        all-zero block stores code 7 (0.0).
//   CUDA (its kernel, built with --use_fast_math): scale = the approximate reciprocal 1 / absmax; thresholds =
//        Nf4CudaThresholds (four differ from the midpoints by one ulp); an all-zero block gives NaN and so code 0
//        (-1.0 * 0 = -0.0 after dequantization).
// Nested absmax (blockwise 8-bit quantization of absmax - offset, blocks of 256, the signed dynamic map):
//   CUDA: the nearest map entry by bitsandbytes' binary search (blockwise8_index below, ties as it breaks them);
//   CPU: bitsandbytes' CPU lookup table (65536 bins over [-1, 1], each holding the entry nearest its left edge),
//        indexed by (int)fma((v + 1) * 0.5, 65535, 0.5); it can differ from the nearest entry near midpoints.
// The offset (the float32 mean of the absmax) is computed by the caller with the framework's mean, as
// bitsandbytes does, so it too is the same number.
//
// Small-M matmul (M <= 16, decode and small batches): y (M, N) = x (M, K) @ W^T (+ lora (M, r) @ B (N, r)^T
// + bias), float accumulation, reading each 4-bit weight once and never writing the 16-bit W. With K % 128 == 0 it
// runs on tensor cores and multiplies W rounded to x's dtype (the values nf4_dequantize writes); otherwise on CUDA
// cores with W in float32.
// Torch-free: raw pointers, sizes and (for CUDA) a stream.
#pragma once

#include <cstdint>

#ifdef FUSEDRL_WITH_CUDA
#include <cuda_runtime.h>
#endif

#ifdef __CUDACC__
#define FUSEDRL_NF4_HD __host__ __device__ __forceinline__
#else
#define FUSEDRL_NF4_HD inline
#endif

namespace fusedrl {

// The NF4 table (quantiles of N(0, 1) normalised to [-1, 1]), the only definition in fusedrl; Python reads it
// through torch.ops.fusedrl.nf4_code().
constexpr float kNf4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f,
    1.0f};
constexpr int kNf4NestedBlocksize = 256;  // blocks of absmax per nested scale, as bitsandbytes always writes

enum class Nf4Dtype : int { kFloat32, kFloat16, kBFloat16 };

// One independently quantized weight (or shard of a fused projection), rows x cols values.
struct Nf4Weight {
  const uint8_t* packed = nullptr;         // ceil(rows * cols / 2) bytes
  const float* absmax = nullptr;           // plain: (nblocks) float32; null when nested
  const uint8_t* absmax_q = nullptr;       // nested: (nblocks) uint8 indices into nested_code
  const float* nested_absmax = nullptr;    // nested: (ceil(nblocks / 256)) float32
  const float* nested_code = nullptr;      // nested: (256) float32, bitsandbytes' signed dynamic map
  float offset = 0.0f;                     // nested: added after the nested scale
  int64_t rows = 0, cols = 0;
  int64_t blocksize = 64;                  // 64, 128 or 256 (any power of two >= 32 works)
};

// Dequantize one weight into out (rows, ld) of `dtype`, first `cols` columns written.
struct Nf4DequantParams {
  Nf4Weight w;
  void* out = nullptr;
  int64_t ld = 0;
  Nf4Dtype dtype = Nf4Dtype::kBFloat16;
};

// y (M, ld_y) [+]= x (M, K) @ W^T for the rows of one weight, in x's dtype (bf16 or fp16), float accumulation;
// then + lora (M, r) float32 @ lora_B (N, r)^T (already scaled by the caller) + bias (N), each when non-null.
struct Nf4MatmulParams {
  Nf4Weight w;                  // rows = N, cols = K
  const void* x = nullptr;      // (M, K) contiguous
  int64_t m = 0;                // 1..16
  void* y = nullptr;            // (M, ld_y), columns [0, N) written
  int64_t ld_y = 0;
  Nf4Dtype dtype = Nf4Dtype::kBFloat16;  // of x, y, lora_B and bias (float16 or bfloat16)
  const float* lora = nullptr;  // (M, r) float32 or null
  const void* lora_B = nullptr; // (N, r)
  int64_t rank = 0;
  const void* bias = nullptr;   // (N) or null
};

// lora (M, r) float32 = scaling * x (M, K) @ A (r, K)^T, float accumulation: the LoRA down-projection of the small-M
// path, written in the float32 layout Nf4MatmulParams::lora expects (one launch instead of a GEMM, a scale and a cast).
struct Nf4LoraDownParams {
  const void* x = nullptr;   // (M, K) contiguous, `dtype`
  const void* a = nullptr;   // (r, K) contiguous, `dtype`
  float* lora = nullptr;     // (M, r)
  int64_t m = 0, rank = 0, k = 0;
  float scaling = 1.0f;
  Nf4Dtype dtype = Nf4Dtype::kBFloat16;  // float16 or bfloat16 on CUDA
};

// Block scale b of a weight: plain, or decoded from the nested statistics (bitsandbytes' order of operations).
FUSEDRL_NF4_HD float nf4_block_scale(const Nf4Weight& w, int64_t b) {
  if (w.absmax_q == nullptr) return w.absmax[b];
#ifdef __CUDA_ARCH__
  return __fadd_rn(__fmul_rn(w.nested_code[w.absmax_q[b]], w.nested_absmax[b / kNf4NestedBlocksize]), w.offset);
#else
  const float scaled = w.nested_code[w.absmax_q[b]] * w.nested_absmax[b / kNf4NestedBlocksize];
  return scaled + w.offset;
#endif
}

// Index of the NF4 code for a normalised value: the number of thresholds below x (a value equal to a threshold
// takes the lower code; NaN gives 0, as in bitsandbytes' CUDA decision tree).
FUSEDRL_NF4_HD int nf4_index(float x, const float* thresholds) {
  int q = 0;
#pragma unroll
  for (int i = 0; i < 15; ++i) q += x > thresholds[i] ? 1 : 0;
  return q;
}

// bitsandbytes' CUDA thresholds: the decimal literals of its decision tree, which round to the float32 midpoints
// (kNf4Code[i] + kNf4Code[i + 1]) / 2 except for four (i = 0, 8, 12, 14) that lie one ulp away. Its CPU path
// (and nf4_quantize_cpu) uses the float32 midpoints themselves.
struct Nf4CudaThresholds {
  float v[15] = {-0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
                 -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
                 0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
                 0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f};
};

// bitsandbytes' CUDA binary search for the entry of a sorted 256-entry map nearest to x (its rounding at ties).
FUSEDRL_NF4_HD int blockwise8_index(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float midpoint = (upper + val) * 0.5f;
    return x > midpoint ? upper_pivot : pivot;
  }
  const float midpoint = (lower + val) * 0.5f;
  return x < midpoint ? lower_pivot : pivot;
}

// ---- CPU (nf4_cpu.cpp); each function handles the block range [block_begin, block_end) so that callers can
// parallelise over blocks.
void nf4_dequantize_cpu(const Nf4DequantParams& p, int64_t block_begin, int64_t block_end);
// x: n values of `dtype`; packed: ceil(n / 2) bytes; absmax: ceil(n / blocksize) floats. bitsandbytes' CPU rule.
void nf4_quantize_cpu(const void* x, Nf4Dtype dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                      int64_t block_begin, int64_t block_end);
// Blockwise 8-bit quantization of float32 values with a sorted 256-entry map (bitsandbytes' CPU lookup table).
void blockwise8_quantize_cpu(const float* x, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                             float* absmax, int64_t block_begin, int64_t block_end);
// y for rows [row_begin, row_end) of W, float accumulation (the CPU counterpart of nf4_matmul_cuda).
void nf4_matmul_cpu(const Nf4MatmulParams& p, int64_t row_begin, int64_t row_end);
// The reference of nf4_lora_down_cuda (same float math, sequential sums).
void nf4_lora_down_cpu(const Nf4LoraDownParams& p);

#ifdef FUSEDRL_WITH_CUDA
// ---- CUDA (nf4.cu), on `stream`; each returns the launch error, if any.
cudaError_t nf4_dequantize_cuda(const Nf4DequantParams& p, cudaStream_t stream);
cudaError_t nf4_quantize_cuda(const void* x, Nf4Dtype dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                              float* absmax, cudaStream_t stream);
cudaError_t blockwise8_quantize_cuda(const float* x, int64_t n, int64_t blocksize, const float* code, uint8_t* out,
                                     float* absmax, cudaStream_t stream);
// Requires p.m <= 16, cols % 32 == 0, blocksize % 32 == 0 and x 16-byte aligned (nf4_matmul_cuda_supported).
cudaError_t nf4_matmul_cuda(const Nf4MatmulParams& p, cudaStream_t stream);
// Requires nf4_lora_down_cuda_supported(p).
cudaError_t nf4_lora_down_cuda(const Nf4LoraDownParams& p, cudaStream_t stream);
#endif

constexpr int64_t kNf4MatmulMaxM = 16;
inline bool nf4_matmul_cuda_supported(const Nf4MatmulParams& p) {
  return p.m >= 1 && p.m <= kNf4MatmulMaxM && p.w.cols % 32 == 0 && p.w.blocksize % 32 == 0 &&
         reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.w.packed) % 16 == 0 &&
         p.dtype != Nf4Dtype::kFloat32;
}

inline bool nf4_lora_down_cuda_supported(const Nf4LoraDownParams& p) {
  return p.dtype != Nf4Dtype::kFloat32 && p.k % 8 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(p.a) % 16 == 0;
}

}  // namespace fusedrl
