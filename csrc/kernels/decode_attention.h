// decode_attention: one decode step of grouped-query attention over a static KV cache.
//
// Two kernels of the static decode loop (python/fusedrl/rollout/llama_family.py), torch-free:
//
// rotary_cache_write — for every row b, from the projections of the new token q (B, H, D), k and v (B, Hkv, D):
//     q' = rope(norm_q(q)),  k' = rope(norm_k(k)),  cache_k[b, :, slot] = k',  cache_v[b, :, slot] = v
//   with norm_x(x) = w * round(x / sqrt(mean(x^2) + eps)) (Qwen3's per-head RMSNorm; identity when no weight is
//   given) and rope(x)_i = round(round(x_i cos_i) + round(rotate_half(x)_i sin_i)), rotate_half(x) = (-x2, x1):
//   the roundings to the storage type of transformers' modules, so q' and k' are bit-identical to theirs.
//
// decode_attention — for every row b and query head h (kv head h / group):
//     out[b, h] = sum_t softmax_t(scale * q[b, h] . k[b, h / group, t]) v[b, h / group, t],  t in [start[b], slot]
//   `slot` (a device scalar, so a CUDA graph replays the step at any length) is the last filled cache slot, start[b]
//   the row's first (slots before it are left padding). A row with no slot to attend (start[b] > slot) gets zeros.
//   CUDA: split-KV ("flash-decoding"): grid (splits, Hkv, B); each block serves all `group` query heads of one kv
//   head, so every key and value is read once, over its share of [start[b], slot]; a second kernel combines the
//   splits' (max, sum, unnormalised output) per head. float32 accumulation; the CPU reference accumulates in double.
//   16-bit caches with up to 4 query heads per kv head (Llama-3, Qwen3) use the key-group form of the split kernel
//   (keys in registers, no shared-memory staging; decode_attention.cu says why), everything else the tile form.
//
// rms_norm — transformers' LlamaRMSNorm, roundings included: out = round(w * round(x / sqrt(mean(x^2) + eps)))
//   per row of x (M, N), in float32 (double for float64). CUDA: one block per row (M is the decode batch).
#pragma once

#include <cstdint>

#ifdef FUSEDRL_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace fusedrl {

enum class AttnDtype : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Strides are in elements; the head dimension is contiguous everywhere.
struct RotaryCacheWriteParams {
  const void* q = nullptr;  // (B, H, D): row stride q_row, head stride D
  const void* k = nullptr;  // (B, Hkv, D): row stride kv_row, head stride D
  const void* v = nullptr;
  int64_t q_row = 0, kv_row = 0;
  const void* cos = nullptr;  // (B, D), row stride D; same dtype as q
  const void* sin = nullptr;
  const void* q_norm = nullptr;  // (D) or null
  const void* k_norm = nullptr;  // (D) or null
  double eps = 1e-6;
  void* q_out = nullptr;  // (B, H, D) contiguous
  void* cache_k = nullptr;  // (>= B, Hkv, L, D) with the strides below
  void* cache_v = nullptr;
  int64_t cache_row = 0, cache_head = 0, cache_pos = 0;
  const int64_t* slot = nullptr;  // (1) device/host scalar, in [0, L)
  int64_t batch = 0, heads = 0, kv_heads = 0, head_dim = 0, length = 0;
  AttnDtype dtype = AttnDtype::kFloat32;
};

struct DecodeAttentionParams {
  const void* q = nullptr;  // (B, H, D) contiguous
  const void* cache_k = nullptr;  // (>= B, Hkv, L, D)
  const void* cache_v = nullptr;
  int64_t cache_row = 0, cache_head = 0, cache_pos = 0;
  const int32_t* start = nullptr;  // (B) first attended slot of each row
  const int64_t* slot = nullptr;   // (1) last attended slot, in [0, L)
  void* out = nullptr;  // (B, H, D) contiguous
  int64_t batch = 0, heads = 0, kv_heads = 0, head_dim = 0, length = 0;
  double scale = 1.0;
  AttnDtype dtype = AttnDtype::kFloat32;
  // CUDA only: splits of the key range and the float32 workspace they write (see decode_attention_workspace).
  int64_t splits = 1;
  float* workspace = nullptr;
};

struct RmsNormParams {
  const void* x = nullptr;  // (M, N), row stride x_row, contiguous rows
  int64_t x_row = 0;
  const void* weight = nullptr;  // (N)
  void* out = nullptr;  // (M, N) contiguous
  int64_t rows = 0, cols = 0;
  double eps = 1e-6;
  AttnDtype dtype = AttnDtype::kFloat32;
};

// CPU references, on the calling thread.
void rotary_cache_write_cpu(const RotaryCacheWriteParams& p);
void decode_attention_cpu(const DecodeAttentionParams& p);
void rms_norm_cpu(const RmsNormParams& p, int64_t row_begin, int64_t row_end);

// float32 elements of decode_attention's CUDA workspace: per (row, head, split) the output (D), max and sum.
inline int64_t decode_attention_workspace(int64_t batch, int64_t heads, int64_t head_dim, int64_t splits) {
  return batch * heads * splits * (head_dim + 2);
}

#ifdef FUSEDRL_WITH_CUDA
// head_dim 64 or 128, group (heads / kv_heads) at most 16 (checked by the callers; see *_cuda_supported).
bool decode_attention_cuda_supported(int64_t head_dim, int64_t group);
cudaError_t rotary_cache_write_cuda(const RotaryCacheWriteParams& p, cudaStream_t stream);
cudaError_t decode_attention_cuda(const DecodeAttentionParams& p, cudaStream_t stream);
cudaError_t rms_norm_cuda(const RmsNormParams& p, cudaStream_t stream);
#endif

}  // namespace fusedrl
