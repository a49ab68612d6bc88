// fused_linear_logp_cuda.cpp: CUDA registration of the fused lm-head + log-softmax op. The chunk loop is the
// one in fused_linear_logp.cpp; CUDA supplies the row pass (csrc/kernels/logp_rows.cu) on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fused_linear_logp.h"

namespace fusedrl {
namespace {

// Chunks one after another on the caller's stream. (Two side streams, so that one chunk's row pass could run
// beside the next chunk's GEMMs, measured no faster on an H200: cuBLAS fills every SM. See bench/RESULTS.md.)
class CudaBackend final : public ChunkBackend {
 public:
  void run_rows(const LogpRowsParams& p) override {
    const cudaError_t err = logp_rows_cuda(p, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "fused_linear_logp: row kernel launch failed: ", cudaGetErrorString(err));
  }
  // 256 MiB of logits at most, whatever N is.
  int64_t chunk_bytes() const override { return 256LL << 20; }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_logp_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, std::optional<double> logit_softcap, bool return_entropy,
    bool compute_grad_direction, std::optional<int64_t> chunk_size) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  CudaBackend backend;
  return fused_linear_logp(hidden, weight, bias, targets, temperature, logit_softcap, return_entropy,
                           compute_grad_direction, chunk_size, backend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_logp_backward_cuda(
    const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse, double temperature,
    std::optional<double> logit_softcap, std::array<bool, 3> output_mask, std::optional<int64_t> chunk_size) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  CudaBackend backend;
  return fused_linear_logp_backward(grad_logp, hidden, weight, bias, targets, lse, temperature, logit_softcap,
                                    output_mask, chunk_size, backend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_token_loss_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, std::optional<double> logit_softcap, bool return_entropy,
    const std::optional<at::Tensor>& old_logp, const at::Tensor& advantages, const std::optional<at::Tensor>& ref_logp,
    const at::Tensor& policy_weight, const at::Tensor& kl_weight, int64_t loss_kind, double epsilon_low,
    double epsilon_high, std::optional<double> delta, double sapo_temperature_pos, double sapo_temperature_neg,
    std::array<bool, 3> output_mask, std::optional<int64_t> chunk_size) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  CudaBackend backend;
  return fused_linear_token_loss(
      hidden, weight, bias, targets, temperature, logit_softcap, return_entropy,
      token_loss_inputs(old_logp, advantages, ref_logp, policy_weight, kl_weight, loss_kind, epsilon_low,
                        epsilon_high, delta, sapo_temperature_pos, sapo_temperature_neg),
      output_mask, chunk_size, backend);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrl, CUDA, m) {
  m.impl("fused_linear_logp", &fused_linear_logp_cuda);
  m.impl("fused_linear_logp_backward", &fused_linear_logp_backward_cuda);
  m.impl("fused_linear_token_loss", &fused_linear_token_loss_cuda);
}

}  // namespace fusedrl
