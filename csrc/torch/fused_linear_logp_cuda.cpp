// fused_linear_logp_cuda.cpp: CUDA registration of the fused lm-head + log-softmax op. The chunk loop is the
// one in fused_linear_logp.cpp; only the row pass differs (csrc/kernels/logp_rows.cu on the current stream).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fused_linear_logp.h"

namespace fusedrl {
namespace {

void run_rows_cuda(const LogpRowsParams& p) {
  const cudaError_t err = logp_rows_cuda(p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fused_linear_logp: row kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_logp_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, std::optional<double> logit_softcap, bool return_entropy,
    bool compute_grad_direction, std::optional<int64_t> chunk_size) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return fused_linear_logp(hidden, weight, bias, targets, temperature, logit_softcap, return_entropy,
                           compute_grad_direction, chunk_size, run_rows_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_logp_backward_cuda(
    const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse, double temperature,
    std::optional<double> logit_softcap, std::array<bool, 3> output_mask, std::optional<int64_t> chunk_size) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return fused_linear_logp_backward(grad_logp, hidden, weight, bias, targets, lse, temperature, logit_softcap,
                                    output_mask, chunk_size, run_rows_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrl, CUDA, m) {
  m.impl("fused_linear_logp", &fused_linear_logp_cuda);
  m.impl("fused_linear_logp_backward", &fused_linear_logp_backward_cuda);
}

}  // namespace fusedrl
