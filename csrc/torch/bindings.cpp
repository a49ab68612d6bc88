// bindings.cpp: every fusedrl op, declared once. Read it as the table of contents of torch.ops.fusedrl.
// Implementations are registered per dispatch key next to each op (fused_linear_logp.cpp: CPU,
// fused_linear_logp_cuda.cpp: CUDA); Python attaches fakes and autograd in python/fusedrl/ops/.
#include <torch/library.h>

#include <string>

#include "offload_arena.h"

#ifndef FUSEDRL_CUDA_ARCHS
#define FUSEDRL_CUDA_ARCHS ""
#endif

namespace fusedrl {
namespace {

// "cuda=<archs>" when the CUDA kernels were compiled, else "cuda=none".
std::string build_info() {
#ifdef FUSEDRL_WITH_CUDA
  return std::string("cuda=") + FUSEDRL_CUDA_ARCHS;
#else
  return "cuda=none";
#endif
}

}  // namespace

TORCH_LIBRARY(fusedrl, m) {
  // How this extension was built: "cuda=<architectures>" or "cuda=none".
  m.def("build_info() -> str", &build_info);

  // Chunked lm-head + log-softmax: per-token logp of `targets` under softcap(hidden @ weight^T + bias) / T,
  // optional entropy, the log-sum-exp (for the backward) and, when compute_grad_direction, d logp / d hidden
  // per token (N, H) computed in the same pass. Never materialises N x V logits.
  m.def(
      "fused_linear_logp(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, "
      "float? logit_softcap, bool return_entropy, bool compute_grad_direction, int? chunk_size) "
      "-> (Tensor logp, Tensor entropy, Tensor lse, Tensor grad_direction)");

  // Backward of fused_linear_logp for a trainable lm-head: recomputes each chunk's logits, scales
  // d logp / d raw by grad_logp and returns the gradients selected by output_mask (hidden, weight, bias).
  m.def(
      "fused_linear_logp_backward(Tensor grad_logp, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "Tensor lse, float temperature, float? logit_softcap, bool[3] output_mask, int? chunk_size) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // Token-level GRPO-family loss with a trainable lm-head: logp, entropy and the loss's gradients w.r.t. hidden,
  // weight and bias (selected by output_mask) in one pass, with dL/dlogp evaluated per token inside the row pass
  // (csrc/kernels/token_loss.h). loss_kind: 0 clipped (grpo, bnpo, dr_grpo, dapo), 1 cispo, 2 sapo.
  m.def(
      "fused_linear_token_loss(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, "
      "float? logit_softcap, bool return_entropy, Tensor? old_logp, Tensor advantages, Tensor? ref_logp, "
      "Tensor policy_weight, Tensor kl_weight, int loss_kind, float epsilon_low, float epsilon_high, float? delta, "
      "float sapo_temperature_pos, float sapo_temperature_neg, bool[3] output_mask, int? chunk_size) "
      "-> (Tensor logp, Tensor entropy, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // Activation offload (offload_arena.cpp): torch.classes.fusedrl.OffloadArena owns a pinned host arena, a D2H and
  // an H2D stream and two device slots. offload_to_host queues src's D2H after the compute stream's work and returns
  // a handle (-1: src stays on the device; always on CPU); prefetch_to_device queues the H2D of a handle into a free
  // slot; fetch_to_device makes the compute stream wait for that slot only and returns the tensor (a view of the
  // slot, valid until release_offloaded); release_offloaded frees the slot for the next prefetch.
  register_offload_arena_class(m);
  m.def("offload_to_host(__torch__.torch.classes.fusedrl.OffloadArena arena, Tensor src) -> int");
  m.def("prefetch_to_device(__torch__.torch.classes.fusedrl.OffloadArena arena, int handle) -> ()");
  m.def("fetch_to_device(__torch__.torch.classes.fusedrl.OffloadArena arena, int handle) -> Tensor");
  m.def("release_offloaded(__torch__.torch.classes.fusedrl.OffloadArena arena, int handle) -> ()");
}

}  // namespace fusedrl
