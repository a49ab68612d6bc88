// decode_attention (torch side): argument checks and kernel parameters of the decode-step ops
// (csrc/kernels/decode_attention.h), shared by the CPU and CUDA registrations. A device supplies an
// AttentionBackend (the torch-free kernels on its stream); checks, outputs and the workspace are written once here.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "../kernels/decode_attention.h"

namespace fusedrl {

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  virtual void rotary_cache_write(const RotaryCacheWriteParams& p) = 0;
  // Splits of the key range for `p` (fixed by the shapes only, so a captured graph stays valid); 1 on the CPU.
  virtual int64_t splits(const DecodeAttentionParams& p) = 0;
  virtual void decode_attention(const DecodeAttentionParams& p) = 0;
  virtual void rms_norm(const RmsNormParams& p) = 0;
};

at::Tensor rotary_cache_write_with(AttentionBackend& backend, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                                   const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                                   double eps, const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& slot);

at::Tensor decode_attention_with(AttentionBackend& backend, const at::Tensor& q, const at::Tensor& cache_k,
                                 const at::Tensor& cache_v, const at::Tensor& start, const at::Tensor& slot,
                                 double scale, int64_t splits);

at::Tensor rms_norm_with(AttentionBackend& backend, const at::Tensor& x, const at::Tensor& weight, double eps);

// Registers the decode-step ops for dispatch key of `m` with backend type B (constructed from the op's device).
template <typename B>
void register_decode_attention_ops(torch::Library& m) {
  m.impl("rotary_cache_write",
         [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
            const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm, double eps,
            const at::Tensor& cache_k, const at::Tensor& cache_v, const at::Tensor& slot) {
           B backend(q.device());
           return rotary_cache_write_with(backend, q, k, v, cos, sin, q_norm, k_norm, eps, cache_k, cache_v, slot);
         });
  m.impl("decode_attention", [](const at::Tensor& q, const at::Tensor& cache_k, const at::Tensor& cache_v,
                                const at::Tensor& start, const at::Tensor& slot, double scale, int64_t splits) {
    B backend(q.device());
    return decode_attention_with(backend, q, cache_k, cache_v, start, slot, scale, splits);
  });
  m.impl("rms_norm", [](const at::Tensor& x, const at::Tensor& weight, double eps) {
    B backend(x.device());
    return rms_norm_with(backend, x, weight, eps);
  });
}

}  // namespace fusedrl
