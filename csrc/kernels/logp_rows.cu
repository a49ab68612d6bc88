// logp_rows.cu: CUDA implementation of the row pass described in logp_rows.h.
//
// One thread block per row. Pass 1 streams the row once with an online (max, sum exp, sum exp * shifted z)
// per thread, 16-byte vector loads where the row is aligned, then a warp-shuffle + shared-memory block
// reduction. Pass 2 (kDirection / kScaledGrad) streams the row again and rewrites it in place with
// d logp / d raw. Accumulation is float (double for double logits). The CPU reference is logp_rows_cpu.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "logp_rows.h"
#include "dtype_conv.cuh"

namespace fusedrl {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------------------------------------------------------
// scalar conversions

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float tanh_acc(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// ---------------------------------------------------------------------------------------------------------------
// online softmax statistics: max m, s = sum exp(z - m), t = sum exp(z - m) * (z - m)

template <typename Acc> struct Stats {
  Acc m, s, t;
};

template <typename Acc>
__device__ __forceinline__ Stats<Acc> combine(Stats<Acc> a, Stats<Acc> b) {
  if (a.s == Acc(0)) return b;
  if (b.s == Acc(0)) return a;
  const Acc m = a.m > b.m ? a.m : b.m;
  const Acc da = a.m - m, db = b.m - m;  // both <= 0
  const Acc ra = exp_acc(da), rb = exp_acc(db);
  return {m, a.s * ra + b.s * rb, ra * (a.t + da * a.s) + rb * (b.t + db * b.s)};
}

template <typename Acc>
__device__ Stats<Acc> block_reduce(Stats<Acc> v) {
  __shared__ Acc sm[kWarps], ss[kWarps], st[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) {
    Stats<Acc> o{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset),
                 __shfl_xor_sync(0xffffffffu, v.t, offset)};
    v = combine(v, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { sm[warp] = v.m; ss[warp] = v.s; st[warp] = v.t; }
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? Stats<Acc>{sm[lane], ss[lane], st[lane]} : Stats<Acc>{Acc(0), Acc(0), Acc(0)};
    for (int offset = 16; offset > 0; offset >>= 1) {
      Stats<Acc> o{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset),
                   __shfl_xor_sync(0xffffffffu, v.t, offset)};
      v = combine(v, o);
    }
    if (lane == 0) { sm[0] = v.m; ss[0] = v.s; st[0] = v.t; }
  }
  __syncthreads();
  return {sm[0], ss[0], st[0]};
}

// ---------------------------------------------------------------------------------------------------------------
// the kernel

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, typename Acc>
struct RowMath {
  Acc inv_t, cap;
  bool capped;
  __device__ Acc z(Acc x) const { return (capped ? cap * tanh_acc(x / cap) : x) * inv_t; }
  __device__ Acc dz(Acc x) const {
    if (!capped) return inv_t;
    const Acc th = tanh_acc(x / cap);
    return (Acc(1) - th * th) * inv_t;
  }
};

template <typename T, typename Acc, int VEC>
__global__ void __launch_bounds__(kThreads) logp_rows_kernel(LogpRowsParams p) {
  const int64_t row = blockIdx.x;
  T* raw = static_cast<T*>(p.logits) + row * p.ld;
  const int64_t target = p.targets[row];
  const RowMath<T, Acc> math{Acc(p.inv_temperature), Acc(p.softcap), p.softcap > 0.0};
  const int64_t n_vec = p.vocab / VEC;
  const int64_t tail_begin = n_vec * VEC;
  auto* raw_vec = reinterpret_cast<Vec<T, VEC>*>(raw);

  Acc lse;
  Acc scale_shared = Acc(1);
  if (p.mode == RowMode::kScaledGrad) {
    lse = static_cast<const Acc*>(p.lse_in)[row];
  } else {
    Stats<Acc> st{Acc(0), Acc(0), Acc(0)};
    auto absorb = [&](const Acc* z, int n) {
      Acc m_new = st.s == Acc(0) ? z[0] : st.m;
      for (int i = 0; i < n; ++i) m_new = z[i] > m_new ? z[i] : m_new;
      if (st.s != Acc(0) && m_new > st.m) {
        const Acc d = st.m - m_new, r = exp_acc(d);
        st.t = r * (st.t + d * st.s);
        st.s *= r;
      }
      st.m = m_new;
      for (int i = 0; i < n; ++i) {
        const Acc d = z[i] - st.m, e = exp_acc(d);
        st.s += e;
        st.t += e * d;
      }
    };
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
      const Vec<T, VEC> chunk = raw_vec[i];
      Acc z[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[k] = math.z(Conv<T>::load(chunk.v[k]));
      absorb(z, VEC);
    }
    for (int64_t i = tail_begin + threadIdx.x; i < p.vocab; i += kThreads) {
      const Acc z = math.z(Conv<T>::load(raw[i]));
      absorb(&z, 1);
    }
    st = block_reduce(st);
    const Acc log_s = log_acc(st.s);
    lse = st.m + log_s;
    __shared__ Acc loss_grad;
    if (threadIdx.x == 0) {
      const Acc logp = math.z(Conv<T>::load(raw[target])) - lse;
      static_cast<Acc*>(p.logp)[row] = logp;
      if (p.lse) static_cast<Acc*>(p.lse)[row] = lse;
      if (p.entropy) static_cast<Acc*>(p.entropy)[row] = log_s - st.t / st.s;
      if (p.mode == RowMode::kLossGrad) loss_grad = token_loss_grad<Acc>(p.loss, row, logp);
    }
    if (p.mode == RowMode::kStats) return;
    __syncthreads();  // the target logit is read above before any thread overwrites it; loss_grad is set
    scale_shared = p.mode == RowMode::kLossGrad ? loss_grad : Acc(1);
  }

  const Acc scale = p.mode == RowMode::kScaledGrad ? static_cast<const Acc*>(p.row_scale)[row] : scale_shared;
  auto grad = [&](Acc x, int64_t v) {
    const Acc prob = exp_acc(math.z(x) - lse);
    return Conv<T>::store(scale * ((v == target ? Acc(1) : Acc(0)) - prob) * math.dz(x));
  };
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    Vec<T, VEC> chunk = raw_vec[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) chunk.v[k] = grad(Conv<T>::load(chunk.v[k]), i * VEC + k);
    raw_vec[i] = chunk;
  }
  for (int64_t i = tail_begin + threadIdx.x; i < p.vocab; i += kThreads) raw[i] = grad(Conv<T>::load(raw[i]), i);
}

template <typename T, typename Acc>
cudaError_t launch(const LogpRowsParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(p.logits) % 16 == 0 && (p.ld * sizeof(T)) % 16 == 0;
  if (aligned) {
    logp_rows_kernel<T, Acc, kVec><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  } else {
    logp_rows_kernel<T, Acc, 1><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t logp_rows_cuda(const LogpRowsParams& p, cudaStream_t stream) {
  switch (p.kind) {
    case ScalarKind::kFloat32: return launch<float, float>(p, stream);
    case ScalarKind::kFloat64: return launch<double, double>(p, stream);
    case ScalarKind::kFloat16: return launch<__half, float>(p, stream);
    case ScalarKind::kBFloat16: return launch<__nv_bfloat16, float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedrl
