// fused_linear_logp: the chunked lm-head + log-softmax op, shared by the CPU and CUDA registrations.
//
// hidden (N, H) @ weight (V, H)^T (+ bias) is computed a chunk of tokens at a time into one reusable
// (chunk, V) buffer (ATen GEMMs: cuBLAS on CUDA, the CPU BLAS otherwise); the row pass of
// csrc/kernels/logp_rows.h turns each chunk into per-token logp / lse / entropy and, when asked, into
// d logp / d raw, which a second GEMM turns into d logp / d hidden. Extra memory: one chunk of logits plus
// the (N, H) gradient direction; never N x V.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../kernels/logp_rows.h"

namespace fusedrl {

// What the chunk loop needs from a device: the row pass over one chunk and the logits budget of a chunk.
class ChunkBackend {
 public:
  virtual ~ChunkBackend() = default;
  virtual void run_rows(const LogpRowsParams& p) = 0;  // all rows of one chunk, on the current stream
  virtual int64_t chunk_bytes() const = 0;
};

// -> (logp (N) acc, entropy (N) acc or (0), lse (N) acc, grad_direction (N, H) hidden dtype or (0))
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_logp(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, std::optional<double> logit_softcap, bool return_entropy,
    bool compute_grad_direction, std::optional<int64_t> chunk_size, ChunkBackend& backend);

// -> (grad_hidden (N, H) or (0), grad_weight (V, H) or (0), grad_bias (V) or (0)), each only if requested
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_logp_backward(
    const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse, double temperature,
    std::optional<double> logit_softcap, std::array<bool, 3> output_mask, std::optional<int64_t> chunk_size,
    ChunkBackend& backend);

// The token-level GRPO-family loss's gradients in the forward pass, for a trainable lm-head: per chunk, one GEMM
// for the logits, the row pass in kLossGrad mode, two GEMMs for the gradients. Per-token inputs are (N,) in the
// accumulation type; old_logp / ref_logp may be absent. Gradients are those of the loss (not yet scaled by an
// upstream gradient). -> (logp, entropy or (0), grad_hidden or (0), grad_weight or (0), grad_bias or (0))
struct TokenLossInputs {
  std::optional<at::Tensor> old_logp;
  at::Tensor advantages;
  std::optional<at::Tensor> ref_logp;
  at::Tensor policy_weight;
  at::Tensor kl_weight;
  TokenLossParams scalars;  // kind, epsilons, delta, SAPO temperatures; its pointers are filled per chunk
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_token_loss(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, std::optional<double> logit_softcap, bool return_entropy,
    const TokenLossInputs& loss, std::array<bool, 3> output_mask, std::optional<int64_t> chunk_size,
    ChunkBackend& backend);

// The schema's argument list, shared by the CPU and CUDA registrations.
TokenLossInputs token_loss_inputs(const std::optional<at::Tensor>& old_logp, const at::Tensor& advantages,
                                  const std::optional<at::Tensor>& ref_logp, const at::Tensor& policy_weight,
                                  const at::Tensor& kl_weight, int64_t loss_kind, double epsilon_low,
                                  double epsilon_high, std::optional<double> delta, double sapo_temperature_pos,
                                  double sapo_temperature_neg, bool kl_ratio_weighted);

// The schemas' signatures bound to one backend; each device's registration is an instantiation. A backend is
// constructed from `hidden` for the duration of one call (CUDA sets the device there).
template <typename Backend>
struct BackendOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logp(
      const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
      const at::Tensor& targets, double temperature, std::optional<double> logit_softcap, bool return_entropy,
      bool compute_grad_direction, std::optional<int64_t> chunk_size) {
    Backend backend(hidden);
    return fused_linear_logp(hidden, weight, bias, targets, temperature, logit_softcap, return_entropy,
                             compute_grad_direction, chunk_size, backend);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> logp_backward(
      const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse, double temperature,
      std::optional<double> logit_softcap, std::array<bool, 3> output_mask, std::optional<int64_t> chunk_size) {
    Backend backend(hidden);
    return fused_linear_logp_backward(grad_logp, hidden, weight, bias, targets, lse, temperature, logit_softcap,
                                      output_mask, chunk_size, backend);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_loss(
      const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
      const at::Tensor& targets, double temperature, std::optional<double> logit_softcap, bool return_entropy,
      const std::optional<at::Tensor>& old_logp, const at::Tensor& advantages,
      const std::optional<at::Tensor>& ref_logp, const at::Tensor& policy_weight, const at::Tensor& kl_weight,
      int64_t loss_kind, double epsilon_low, double epsilon_high, std::optional<double> delta,
      double sapo_temperature_pos, double sapo_temperature_neg, bool kl_ratio_weighted,
      std::array<bool, 3> output_mask, std::optional<int64_t> chunk_size) {
    Backend backend(hidden);
    return fused_linear_token_loss(
        hidden, weight, bias, targets, temperature, logit_softcap, return_entropy,
        token_loss_inputs(old_logp, advantages, ref_logp, policy_weight, kl_weight, loss_kind, epsilon_low,
                          epsilon_high, delta, sapo_temperature_pos, sapo_temperature_neg, kl_ratio_weighted),
        output_mask, chunk_size, backend);
  }
};

// Registers every op of this file for one dispatch key (used inside TORCH_LIBRARY_IMPL).
template <typename Backend>
void register_backend_ops(torch::Library& m) {
  m.impl("fused_linear_logp", &BackendOps<Backend>::logp);
  m.impl("fused_linear_logp_backward", &BackendOps<Backend>::logp_backward);
  m.impl("fused_linear_token_loss", &BackendOps<Backend>::token_loss);
}

}  // namespace fusedrl
