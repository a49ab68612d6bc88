// CUDA kernels of rotary_cache_write and decode_attention (see decode_attention.h).
//
// decode_attention, split kernel: a block of 128 threads serves one (split, kv head, row) and all `group` query
// heads of that kv head. It walks its share of the key range in tiles of 32 keys: the tile's keys and values are
// staged in shared memory as float (keys with a padded row, so the 32 lanes of a warp reading 32 different keys hit
// 32 banks); warp w computes the scores of query heads w, w + 4, ... against key `lane`, updates those heads' running
// max and sum (online softmax) and leaves the tile's probabilities in shared memory; then thread (d, head slice)
// accumulates probabilities x values for its output column of every head it owns. Two tiles are in flight (the
// loads of tile i + 2 issue when tile i is staged). With one split the block writes
// the normalised output; otherwise it writes (unnormalised output, max, sum) and the combine kernel merges splits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "decode_attention.h"
#include "dtype_conv.cuh"

namespace fusedrl {
namespace {

template <typename T> __device__ float round_to(float x) { return Conv<T>::load(Conv<T>::store(x)); }

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;  // keys per tile = lanes of a warp

// ---- rotary + cache write ---------------------------------------------------------------------------------------
// Block (b, head) with head in [0, H) a query head, in [H, H + Hkv) a kv head; thread i owns elements i and i + D/2.
template <typename T>
__global__ void rotary_cache_write_kernel(RotaryCacheWriteParams p) {
  const int64_t b = blockIdx.x, head = blockIdx.y, half = p.head_dim / 2, i = threadIdx.x;
  const bool active = i < half;  // the block is rounded up to whole warps
  const bool is_q = head < p.heads;
  const int64_t kvh = head - p.heads;
  const int64_t slot = *p.slot;
  const T* x = static_cast<const T*>(is_q ? p.q : p.k) + (is_q ? b * p.q_row + head * p.head_dim
                                                               : b * p.kv_row + kvh * p.head_dim);
  const T* norm = static_cast<const T*>(is_q ? p.q_norm : p.k_norm);
  float x1 = active ? Conv<T>::load(x[i]) : 0.f, x2 = active ? Conv<T>::load(x[i + half]) : 0.f;
  if (norm != nullptr) {  // block-uniform
    __shared__ float partial[32];
    float sum_sq = x1 * x1 + x2 * x2;
    for (int offset = 16; offset > 0; offset /= 2) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
    if ((i & 31) == 0) partial[i / 32] = sum_sq;
    __syncthreads();
    sum_sq = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) sum_sq += partial[w];
    const float inv = rsqrtf(sum_sq / static_cast<float>(p.head_dim) + static_cast<float>(p.eps));
    if (active) {
      x1 = round_to<T>(__fmul_rn(Conv<T>::load(norm[i]), round_to<T>(__fmul_rn(x1, inv))));
      x2 = round_to<T>(__fmul_rn(Conv<T>::load(norm[i + half]), round_to<T>(__fmul_rn(x2, inv))));
    }
  }
  if (!active) return;
  const T* cos = static_cast<const T*>(p.cos) + b * p.head_dim;
  const T* sin = static_cast<const T*>(p.sin) + b * p.head_dim;
  // rope: out_i = x1 cos_i - x2 sin_i, out_{i+half} = x2 cos_{i+half} + x1 sin_{i+half}, each product rounded.
  const float a1 = round_to<T>(__fmul_rn(x1, Conv<T>::load(cos[i])));
  const float b1 = round_to<T>(__fmul_rn(-x2, Conv<T>::load(sin[i])));
  const float a2 = round_to<T>(__fmul_rn(x2, Conv<T>::load(cos[i + half])));
  const float b2 = round_to<T>(__fmul_rn(x1, Conv<T>::load(sin[i + half])));
  T* out;
  if (is_q) {
    out = static_cast<T*>(p.q_out) + (b * p.heads + head) * p.head_dim;
  } else {
    if (slot < 0 || slot >= p.length) return;  // checked on the host for CPU tensors; never written out of range
    const int64_t at = b * p.cache_row + kvh * p.cache_head + slot * p.cache_pos;
    out = static_cast<T*>(p.cache_k) + at;
    const T* v = static_cast<const T*>(p.v) + b * p.kv_row + kvh * p.head_dim;
    T* v_out = static_cast<T*>(p.cache_v) + at;
    v_out[i] = v[i];
    v_out[i + half] = v[i + half];
  }
  out[i] = Conv<T>::store(__fadd_rn(a1, b1));
  out[i + half] = Conv<T>::store(__fadd_rn(a2, b2));
}

// ---- split-KV attention -----------------------------------------------------------------------------------------
// One tile of keys and values of one (row, kv head) in flight: `fetch` issues every 16-byte global load of the tile
// at once into registers (keys past `end` read as zero), so the next tile's loads overlap this tile's arithmetic;
// `store` converts them to float in shared memory (keys with row stride kKeyStride, values with row stride D).
template <typename T, int D>
struct TileLoader {
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kVecsPerKey = D / kVec;
  static constexpr int kLoads = kTile * kVecsPerKey / kThreads;
  static_assert(kLoads * kThreads == kTile * kVecsPerKey, "a tile must split evenly over the block");
  uint4 k[kLoads], v[kLoads];

  __device__ void fetch(const T* keys, const T* values, int64_t pos_stride, int64_t t0, int64_t end) {
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int index = threadIdx.x + j * kThreads;
      const int t = index / kVecsPerKey, i = (index % kVecsPerKey) * kVec;
      if (t0 + t < end) {
        k[j] = __ldg(reinterpret_cast<const uint4*>(keys + (t0 + t) * pos_stride + i));
        v[j] = __ldg(reinterpret_cast<const uint4*>(values + (t0 + t) * pos_stride + i));
      } else {
        k[j] = make_uint4(0u, 0u, 0u, 0u);
        v[j] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  }

  template <int kKeyStride>
  __device__ void store(float* k_s, float* v_s) const {
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int index = threadIdx.x + j * kThreads;
      const int t = index / kVecsPerKey, i = (index % kVecsPerKey) * kVec;
      const T* kv = reinterpret_cast<const T*>(&k[j]);
      const T* vv = reinterpret_cast<const T*>(&v[j]);
#pragma unroll
      for (int e = 0; e < kVec; e += 4) {
        *reinterpret_cast<float4*>(k_s + t * kKeyStride + i + e) =
            make_float4(Conv<T>::load(kv[e]), Conv<T>::load(kv[e + 1]), Conv<T>::load(kv[e + 2]),
                        Conv<T>::load(kv[e + 3]));
        *reinterpret_cast<float4*>(v_s + t * D + i + e) =
            make_float4(Conv<T>::load(vv[e]), Conv<T>::load(vv[e + 1]), Conv<T>::load(vv[e + 2]),
                        Conv<T>::load(vv[e + 3]));
      }
    }
  }
};

// The keys [lo, hi) that split `split` of row b attends: [start[b], slot] in `splits` shares of whole tiles.
struct KeyRange {
  int64_t lo, hi;
};

__device__ __forceinline__ KeyRange split_key_range(const DecodeAttentionParams& p, int b, int split) {
  const int64_t end = min(*p.slot + 1, p.length);  // clamped: the host cannot check a device value
  const int64_t first = max(static_cast<int64_t>(p.start[b]), static_cast<int64_t>(0));
  const int64_t count = end > first ? end - first : 0;
  int64_t chunk = (count + p.splits - 1) / p.splits;
  chunk = (chunk + kTile - 1) / kTile * kTile;
  const int64_t lo = first + split * chunk;
  return {lo, min(end, lo + chunk)};
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads) decode_attention_split_kernel(DecodeAttentionParams p) {
  constexpr int kHeadsPerWarp = (G + kWarps - 1) / kWarps;  // score phase: warp w owns heads w + kWarps * j
  constexpr int kSlices = kThreads / D;                      // value phase: thread owns column d of heads s + kSlices*j
  constexpr int kHeadsPerThread = (G + kSlices - 1) / kSlices;
  constexpr int kKeyStride = D + 4;  // float4 reads of 8 lanes' keys hit 32 distinct banks
  __shared__ __align__(16) float q_s[G][D];
  __shared__ __align__(16) float k_s[kTile * kKeyStride];
  __shared__ __align__(16) float v_s[kTile * D];
  __shared__ __align__(16) float p_s[G][kTile];
  __shared__ float corr_s[G], max_s[G], sum_s[G];

  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int group = static_cast<int>(p.heads / p.kv_heads);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const KeyRange keys_of_split = split_key_range(p, b, split);
  const int64_t lo = keys_of_split.lo, hi = keys_of_split.hi;

  const T* q = static_cast<const T*>(p.q) + (static_cast<int64_t>(b) * p.heads + kvh * group) * D;
  for (int e = threadIdx.x; e < G * D; e += kThreads) {
    const int h = e / D;
    q_s[h][e % D] = h < group ? Conv<T>::load(q[e]) * static_cast<float>(p.scale) : 0.f;
  }
  float running_max[kHeadsPerWarp], running_sum[kHeadsPerWarp];
#pragma unroll
  for (int j = 0; j < kHeadsPerWarp; ++j) {
    running_max[j] = -INFINITY;
    running_sum[j] = 0.f;
  }
  float acc[kHeadsPerThread];
#pragma unroll
  for (int j = 0; j < kHeadsPerThread; ++j) acc[j] = 0.f;
  const int column = threadIdx.x % D, slice = threadIdx.x / D;

  const int64_t base = static_cast<int64_t>(b) * p.cache_row + kvh * p.cache_head;
  const T* keys = static_cast<const T*>(p.cache_k) + base;
  const T* values = static_cast<const T*>(p.cache_v) + base;
  // Two tiles in flight: tile i + 2's loads are issued when tile i reaches shared memory, so each block keeps two
  // tiles' reads outstanding while it computes (with one, a block waited on most tiles: 44% of copy bandwidth at
  // batch 64, H200).
  TileLoader<T, D> even, odd;
  if (lo < hi) even.fetch(keys, values, p.cache_pos, lo, hi);
  if (lo + kTile < hi) odd.fetch(keys, values, p.cache_pos, lo + kTile, hi);
  auto consume = [&](TileLoader<T, D>& loader, int64_t t0) {
    __syncthreads();  // the previous tile's shared memory is consumed (and q_s is written, first time)
    loader.template store<kKeyStride>(k_s, v_s);
    __syncthreads();
    if (t0 + 2 * kTile < hi) loader.fetch(keys, values, p.cache_pos, t0 + 2 * kTile, hi);
    // Scores: four partial sums per head break the dependency chain of the dot product.
    float score[kHeadsPerWarp][4];
#pragma unroll
    for (int j = 0; j < kHeadsPerWarp; ++j) score[j][0] = score[j][1] = score[j][2] = score[j][3] = 0.f;
    const float* key = k_s + lane * kKeyStride;
#pragma unroll 4
    for (int i = 0; i < D; i += 4) {
      const float4 k = *reinterpret_cast<const float4*>(key + i);
#pragma unroll
      for (int j = 0; j < kHeadsPerWarp; ++j) {
        const int h = warp + kWarps * j;
        if (h < G) {
          const float4 qv = *reinterpret_cast<const float4*>(&q_s[h][i]);
          score[j][0] = fmaf(qv.x, k.x, score[j][0]);
          score[j][1] = fmaf(qv.y, k.y, score[j][1]);
          score[j][2] = fmaf(qv.z, k.z, score[j][2]);
          score[j][3] = fmaf(qv.w, k.w, score[j][3]);
        }
      }
    }
    const bool live = t0 + lane < hi;
#pragma unroll
    for (int j = 0; j < kHeadsPerWarp; ++j) {
      const int h = warp + kWarps * j;
      if (h >= G) continue;  // warp-uniform
      const float s = live ? (score[j][0] + score[j][1]) + (score[j][2] + score[j][3]) : -INFINITY;
      float tile_max = s;
      for (int offset = 16; offset > 0; offset /= 2) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
      const float new_max = fmaxf(running_max[j], tile_max);  // finite: the tile has at least one live key
      const float prob = live ? __expf(s - new_max) : 0.f;
      float tile_sum = prob;
      for (int offset = 16; offset > 0; offset /= 2) tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, offset);
      const float corr = __expf(running_max[j] - new_max);  // 0 on the first tile (max -inf)
      running_sum[j] = running_sum[j] * corr + tile_sum;
      running_max[j] = new_max;
      p_s[h][lane] = prob;
      if (lane == 0) corr_s[h] = corr;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kHeadsPerThread; ++j) {
      const int h = slice + kSlices * j;
      if (h < G) acc[j] *= corr_s[h];
    }
#pragma unroll 4
    for (int t = 0; t < kTile; t += 4) {
      const float v0 = v_s[t * D + column], v1 = v_s[(t + 1) * D + column];
      const float v2 = v_s[(t + 2) * D + column], v3 = v_s[(t + 3) * D + column];
#pragma unroll
      for (int j = 0; j < kHeadsPerThread; ++j) {
        const int h = slice + kSlices * j;
        if (h < G) {
          const float4 w = *reinterpret_cast<const float4*>(&p_s[h][t]);
          acc[j] = fmaf(w.x, v0, fmaf(w.y, v1, fmaf(w.z, v2, fmaf(w.w, v3, acc[j]))));
        }
      }
    }
  };
  for (int64_t t0 = lo; t0 < hi; t0 += 2 * kTile) {
    consume(even, t0);
    if (t0 + kTile < hi) consume(odd, t0 + kTile);
  }
  // Publish each head's running max and sum (warp w, lane 0) for the output phase.
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < kHeadsPerWarp; ++j) {
      const int h = warp + kWarps * j;
      if (h < G) {
        max_s[h] = running_max[j];
        sum_s[h] = running_sum[j];
      }
    }
  }
  __syncthreads();
  const int64_t head0 = static_cast<int64_t>(b) * p.heads + kvh * group;
  if (p.splits == 1) {
    T* out = static_cast<T*>(p.out) + head0 * D;
#pragma unroll
    for (int j = 0; j < kHeadsPerThread; ++j) {
      const int h = slice + kSlices * j;
      if (h < group) out[h * D + column] = Conv<T>::store(sum_s[h] > 0.f ? acc[j] / sum_s[h] : 0.f);
    }
    return;
  }
  // Workspace: out (B*H*splits, D), then max (B*H*splits), then sum (B*H*splits).
  const int64_t entries = p.batch * p.heads * p.splits;
  float* ws_out = p.workspace;
  float* ws_max = ws_out + entries * D;
  float* ws_sum = ws_max + entries;
#pragma unroll
  for (int j = 0; j < kHeadsPerThread; ++j) {
    const int h = slice + kSlices * j;
    if (h < group) {
      const int64_t entry = (head0 + h) * p.splits + split;
      ws_out[entry * D + column] = acc[j];
      if (column == 0) {
        ws_max[entry] = max_s[h];
        ws_sum[entry] = sum_s[h];
      }
    }
  }
}

// ---- split-KV attention, key-group form (16-bit caches, up to 4 query heads per kv head: Llama-3, Qwen3) ---------
// The tile kernel above stages keys in shared memory as float and has every warp read every key (one warp per query
// head): four times the tile's bytes through shared memory per tile, which bounded it at ~45% of copy bandwidth at
// batch 64 (H200). Here nothing is staged: the D / 8 lanes of a "key group" hold one key's (and value's) 16-byte
// pieces in registers straight from global memory, compute the G dot products with shuffles inside the group, and
// keep their own online softmax (max, sum, output slice) over the keys t = lo + group + kGroups * i; the block's
// kGroups partial results are merged once at the end through shared memory, then written like the tile kernel's
// (normalised output with one split, else the workspace the combine kernel reads). Two batches of kUnroll keys per
// thread are in flight.
template <typename T, int D, int kUnroll>
struct KeyGroupLoads {
  uint4 k[kUnroll], v[kUnroll];

  __device__ void fetch(const T* keys, const T* values, int64_t pos_stride, int64_t t0, int64_t hi, int stride) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = t0 + static_cast<int64_t>(u) * stride;
      if (t < hi) {
        k[u] = __ldg(reinterpret_cast<const uint4*>(keys + t * pos_stride));
        v[u] = __ldg(reinterpret_cast<const uint4*>(values + t * pos_stride));
      } else {
        k[u] = make_uint4(0u, 0u, 0u, 0u);
        v[u] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  }
};

template <typename T>
__device__ void unpack8(const uint4& packed, float (&out)[8]) {
  const T* e = reinterpret_cast<const T*>(&packed);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = Conv<T>::load(e[i]);
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads) decode_attention_keygroup_kernel(DecodeAttentionParams p) {
  static_assert(sizeof(T) == 2, "16-bit caches: one 16-byte load holds 8 elements");
  constexpr int kLanes = D / 8;                  // lanes per key group
  constexpr int kGroups = kThreads / kLanes;     // key groups per block
  constexpr int kUnroll = 4;                     // keys per group per batch
  constexpr int kStep = kGroups * kUnroll;       // keys per block per batch
  __shared__ float max_s[kGroups][G], sum_s[kGroups][G];
  __shared__ __align__(16) float out_s[kGroups][G][D];

  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int group = static_cast<int>(p.heads / p.kv_heads);
  const int key_group = threadIdx.x / kLanes, piece = threadIdx.x % kLanes;
  const KeyRange keys_of_split = split_key_range(p, b, split);
  const int64_t lo = keys_of_split.lo, hi = keys_of_split.hi;

  // This lane's 8 columns of every query head of the kv head, scaled.
  float q[G][8];
  const T* q_row = static_cast<const T*>(p.q) + (static_cast<int64_t>(b) * p.heads + kvh * group) * D + piece * 8;
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (h < group) {
      unpack8<T>(__ldg(reinterpret_cast<const uint4*>(q_row + h * D)), q[h]);
#pragma unroll
      for (int i = 0; i < 8; ++i) q[h][i] *= static_cast<float>(p.scale);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) q[h][i] = 0.f;
    }
  }
  float running_max[G], running_sum[G], acc[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    running_max[h] = -INFINITY;
    running_sum[h] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = 0.f;
  }

  const int64_t base = static_cast<int64_t>(b) * p.cache_row + kvh * p.cache_head + piece * 8;
  const T* keys = static_cast<const T*>(p.cache_k) + base;
  const T* values = static_cast<const T*>(p.cache_v) + base;
  auto consume = [&](KeyGroupLoads<T, D, kUnroll>& loads, int64_t t0) {
    float score[kUnroll][G];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float k[8];
      unpack8<T>(loads.k[u], k);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot = fmaf(q[h][i], k[i], dot);
#pragma unroll
        for (int offset = kLanes / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        score[u][h] = t0 + u * kGroups < hi ? dot : -INFINITY;
      }
    }
    float v[kUnroll][8];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) unpack8<T>(loads.v[u], v[u]);
#pragma unroll
    for (int h = 0; h < G; ++h) {
      float new_max = running_max[h];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) new_max = fmaxf(new_max, score[u][h]);
      if (new_max == -INFINITY) continue;  // no live key yet in this key group
      const float corr = __expf(running_max[h] - new_max);  // 0 when the max was -inf
      running_sum[h] *= corr;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[h][i] *= corr;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float prob = __expf(score[u][h] - new_max);  // 0 for a dead key (-inf)
        running_sum[h] += prob;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[h][i] = fmaf(prob, v[u][i], acc[h][i]);
      }
      running_max[h] = new_max;
    }
  };
  KeyGroupLoads<T, D, kUnroll> even, odd;
  if (lo < hi) even.fetch(keys, values, p.cache_pos, lo + key_group, hi, kGroups);
  if (lo + kStep < hi) odd.fetch(keys, values, p.cache_pos, lo + kStep + key_group, hi, kGroups);
  for (int64_t t0 = lo; t0 < hi; t0 += 2 * kStep) {
    consume(even, t0 + key_group);
    if (t0 + 2 * kStep < hi) even.fetch(keys, values, p.cache_pos, t0 + 2 * kStep + key_group, hi, kGroups);
    if (t0 + kStep < hi) {
      consume(odd, t0 + kStep + key_group);
      if (t0 + 3 * kStep < hi) odd.fetch(keys, values, p.cache_pos, t0 + 3 * kStep + key_group, hi, kGroups);
    }
  }

  // Merge the key groups: group g's (max, sum, output slice) rescaled to the block's max.
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (piece == 0) {
      max_s[key_group][h] = running_max[h];
      sum_s[key_group][h] = running_sum[h];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) out_s[key_group][h][piece * 8 + i] = acc[h][i];
  }
  __syncthreads();
  const int64_t head0 = static_cast<int64_t>(b) * p.heads + kvh * group;
  const int64_t entries = p.batch * p.heads * p.splits;
  for (int e = threadIdx.x; e < G * D; e += kThreads) {
    const int h = e / D, column = e % D;
    if (h >= group) break;  // e grows with h
    float top = -INFINITY;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) top = fmaxf(top, max_s[g][h]);
    float total = 0.f, value = 0.f;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      const float w = sum_s[g][h] > 0.f ? __expf(max_s[g][h] - top) : 0.f;
      total = fmaf(w, sum_s[g][h], total);
      value = fmaf(w, out_s[g][h][column], value);
    }
    if (p.splits == 1) {
      static_cast<T*>(p.out)[(head0 + h) * D + column] = Conv<T>::store(total > 0.f ? value / total : 0.f);
    } else {  // workspace: out (B*H*splits, D), then max (B*H*splits), then sum (B*H*splits)
      const int64_t entry = (head0 + h) * p.splits + split;
      p.workspace[entry * D + column] = value;
      if (column == 0) {
        p.workspace[entries * D + entry] = top;
        p.workspace[entries * D + entries + entry] = total;
      }
    }
  }
}

// Block per (row, query head), thread per output column: merges the splits' partial results.
template <typename T, int D>
__global__ void decode_attention_combine_kernel(DecodeAttentionParams p) {
  const int64_t head = blockIdx.x;  // b * H + h
  const int column = threadIdx.x;
  const int64_t entries = p.batch * p.heads * p.splits;
  const float* ws_out = p.workspace;
  const float* ws_max = ws_out + entries * D;
  const float* ws_sum = ws_max + entries;
  float top = -INFINITY;
  for (int64_t s = 0; s < p.splits; ++s) top = fmaxf(top, ws_max[head * p.splits + s]);
  float total = 0.f, acc = 0.f;
  if (top != -INFINITY) {
    for (int64_t s = 0; s < p.splits; ++s) {
      const int64_t entry = head * p.splits + s;
      const float w = ws_sum[entry] > 0.f ? __expf(ws_max[entry] - top) : 0.f;
      total += w * ws_sum[entry];
      acc += w * ws_out[entry * D + column];
    }
  }
  static_cast<T*>(p.out)[head * D + column] = Conv<T>::store(total > 0.f ? acc / total : 0.f);
}

// ---- RMSNorm ------------------------------------------------------------------------------------------------------
// Block per row; the row is read twice (the second time from cache): sum of squares, then the normalised output.
constexpr int kNormThreads = 256;

// Every thread's partial sum of squares -> 1 / sqrt(mean + eps) of the row, for every thread of the block.
__device__ __forceinline__ float block_inverse_rms(float sum_sq, int64_t cols, double eps) {
  __shared__ float partial[kNormThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum_sq;
  __syncthreads();
  sum_sq = 0.f;
#pragma unroll
  for (int w = 0; w < kNormThreads / 32; ++w) sum_sq += partial[w];
  return rsqrtf(sum_sq / static_cast<float>(cols) + static_cast<float>(eps));
}

template <typename T>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(RmsNormParams p) {
  const T* x = static_cast<const T*>(p.x) + blockIdx.x * p.x_row;
  const T* weight = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out) + blockIdx.x * p.cols;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < p.cols; i += kNormThreads) {
    const float v = Conv<T>::load(x[i]);
    sum_sq = fmaf(v, v, sum_sq);
  }
  const float inv = block_inverse_rms(sum_sq, p.cols, p.eps);
  for (int64_t i = threadIdx.x; i < p.cols; i += kNormThreads) {
    out[i] = Conv<T>::store(__fmul_rn(Conv<T>::load(weight[i]), round_to<T>(__fmul_rn(Conv<T>::load(x[i]), inv))));
  }
}

// Vector form for rows of whole 16-byte units (every decode shape): each thread issues all its loads of x and of the
// weight at once (kVecs 16-byte loads each), keeps x in registers and writes 16 bytes at a time. The scalar kernel's
// strided loop issued one 2-byte load per iteration and waited for each: ~8 us for a 4096-wide row at batch 8.
template <typename T, int kVecs>
__global__ void __launch_bounds__(kNormThreads) rms_norm_vec_kernel(RmsNormParams p) {
  constexpr int kPer = 16 / sizeof(T);
  const int64_t vecs = p.cols / kPer;
  const uint4* x = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + blockIdx.x * p.x_row);
  const uint4* weight = reinterpret_cast<const uint4*>(p.weight);
  uint4* out = reinterpret_cast<uint4*>(static_cast<T*>(p.out) + blockIdx.x * p.cols);
  uint4 xv[kVecs], wv[kVecs];
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int64_t v = threadIdx.x + j * kNormThreads;
    xv[j] = v < vecs ? __ldg(x + v) : make_uint4(0u, 0u, 0u, 0u);
    wv[j] = v < vecs ? __ldg(weight + v) : make_uint4(0u, 0u, 0u, 0u);
  }
  float sum_sq = 0.f;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const T* e = reinterpret_cast<const T*>(&xv[j]);
#pragma unroll
    for (int i = 0; i < kPer; ++i) sum_sq = fmaf(Conv<T>::load(e[i]), Conv<T>::load(e[i]), sum_sq);
  }
  const float inv = block_inverse_rms(sum_sq, p.cols, p.eps);
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int64_t v = threadIdx.x + j * kNormThreads;
    if (v >= vecs) break;
    const T* e = reinterpret_cast<const T*>(&xv[j]);
    const T* w = reinterpret_cast<const T*>(&wv[j]);
    uint4 result;
    T* r = reinterpret_cast<T*>(&result);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      r[i] = Conv<T>::store(__fmul_rn(Conv<T>::load(w[i]), round_to<T>(__fmul_rn(Conv<T>::load(e[i]), inv))));
    }
    out[v] = result;
  }
}

inline bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

template <typename T>
cudaError_t launch_rms_norm(const RmsNormParams& p, cudaStream_t stream) {
  constexpr int kPer = 16 / sizeof(T);
  const bool whole_units = p.cols % kPer == 0 && p.x_row % kPer == 0 && aligned16(p.x) &&
                           aligned16(p.weight) && aligned16(p.out);
  const int64_t per_thread = (p.cols / kPer + kNormThreads - 1) / kNormThreads;
  const unsigned rows = static_cast<unsigned>(p.rows);
  if (whole_units && per_thread <= 1) {
    rms_norm_vec_kernel<T, 1><<<rows, kNormThreads, 0, stream>>>(p);
  } else if (whole_units && per_thread <= 2) {
    rms_norm_vec_kernel<T, 2><<<rows, kNormThreads, 0, stream>>>(p);
  } else if (whole_units && per_thread <= 4) {
    rms_norm_vec_kernel<T, 4><<<rows, kNormThreads, 0, stream>>>(p);
  } else if (whole_units && per_thread <= 8) {
    rms_norm_vec_kernel<T, 8><<<rows, kNormThreads, 0, stream>>>(p);
  } else {
    rms_norm_kernel<T><<<rows, kNormThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T, int D, int G>
cudaError_t launch_attention(const DecodeAttentionParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.splits), static_cast<unsigned>(p.kv_heads), static_cast<unsigned>(p.batch));
  bool launched = false;
  if constexpr (sizeof(T) == 2 && G <= 4) {
    if (aligned16(p.q)) {  // the key-group kernel reads q 16 bytes at a time
      decode_attention_keygroup_kernel<T, D, G><<<grid, kThreads, 0, stream>>>(p);
      launched = true;
    }
  }
  if (!launched) decode_attention_split_kernel<T, D, G><<<grid, kThreads, 0, stream>>>(p);
  if (p.splits > 1) {
    decode_attention_combine_kernel<T, D><<<static_cast<unsigned>(p.batch * p.heads), D, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t dispatch_group(const DecodeAttentionParams& p, cudaStream_t stream) {
  const int64_t group = p.heads / p.kv_heads;
  if (group <= 1) return launch_attention<T, D, 1>(p, stream);
  if (group <= 2) return launch_attention<T, D, 2>(p, stream);
  if (group <= 4) return launch_attention<T, D, 4>(p, stream);
  if (group <= 8) return launch_attention<T, D, 8>(p, stream);
  return launch_attention<T, D, 16>(p, stream);
}

template <typename T>
cudaError_t dispatch_dim(const DecodeAttentionParams& p, cudaStream_t stream) {
  return p.head_dim == 64 ? dispatch_group<T, 64>(p, stream) : dispatch_group<T, 128>(p, stream);
}

template <typename T>
cudaError_t launch_rotary(const RotaryCacheWriteParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.batch), static_cast<unsigned>(p.heads + p.kv_heads));
  const unsigned threads = static_cast<unsigned>((p.head_dim / 2 + 31) / 32 * 32);
  rotary_cache_write_kernel<T><<<grid, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool decode_attention_cuda_supported(int64_t head_dim, int64_t group) {
  return (head_dim == 64 || head_dim == 128) && group >= 1 && group <= 16;
}

cudaError_t rotary_cache_write_cuda(const RotaryCacheWriteParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  switch (p.dtype) {
    case AttnDtype::kFloat32: return launch_rotary<float>(p, stream);
    case AttnDtype::kFloat16: return launch_rotary<__half>(p, stream);
    case AttnDtype::kBFloat16: return launch_rotary<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t rms_norm_cuda(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  switch (p.dtype) {
    case AttnDtype::kFloat32: return launch_rms_norm<float>(p, stream);
    case AttnDtype::kFloat16: return launch_rms_norm<__half>(p, stream);
    case AttnDtype::kBFloat16: return launch_rms_norm<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t decode_attention_cuda(const DecodeAttentionParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  switch (p.dtype) {
    case AttnDtype::kFloat32: return dispatch_dim<float>(p, stream);
    case AttnDtype::kFloat16: return dispatch_dim<__half>(p, stream);
    case AttnDtype::kBFloat16: return dispatch_dim<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fusedrl
