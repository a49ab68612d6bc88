// bindings.cpp: every fusedrl op, declared once. Read it as the table of contents of torch.ops.fusedrl.
// Implementations are registered per dispatch key next to each op (fused_linear_logp.cpp: CPU,
// fused_linear_logp_cuda.cpp: CUDA); Python attaches fakes and autograd in python/fusedrl/ops/.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "offload_arena.h"
#include "../kernels/nf4.h"

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

// The 16 NF4 values (csrc/kernels/nf4.h, their one definition) as a float32 CPU tensor.
at::Tensor nf4_code() {
  at::Tensor code = at::empty({16}, at::kFloat);
  std::copy(kNf4Code, kNf4Code + 16, code.data_ptr<float>());
  return code;
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
  // (csrc/kernels/token_loss.h). loss_kind: 0 clipped (grpo, bnpo, dr_grpo, dapo, luspo), 1 cispo, 2 sapo.
  // kl_ratio_weighted: the KL term times the importance ratio (TRL's use_bias_correction_kl).
  m.def(
      "fused_linear_token_loss(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, "
      "float? logit_softcap, bool return_entropy, Tensor? old_logp, Tensor advantages, Tensor? ref_logp, "
      "Tensor policy_weight, Tensor kl_weight, int loss_kind, float epsilon_low, float epsilon_high, float? delta, "
      "float sapo_temperature_pos, float sapo_temperature_neg, bool kl_ratio_weighted, bool[3] output_mask, "
      "int? chunk_size) "
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
  // ---- NF4 (bitsandbytes' 4-bit NormalFloat storage; csrc/kernels/nf4.h, composition in csrc/torch/nf4.h).
  // A weight is a list of independently quantized shards stacked along N; nested lists empty for plain absmax.
  // The NF4 table, float32 (16,).
  m.def("nf4_code() -> Tensor", &nf4_code);

  // weight (any shape) -> (packed uint8 (ceil(numel / 2), 1), absmax float32 (ceil(numel / blocksize))): the bytes
  // bitsandbytes' quantize_4bit(quant_type="nf4") writes on the same device.
  m.def("nf4_quantize(Tensor weight, int blocksize) -> (Tensor packed, Tensor absmax)");

  // Blockwise 8-bit quantization of float32 values with a sorted 256-entry map (the nested absmax statistics):
  // -> (codes uint8 like values, absmax float32 per block).
  m.def("blockwise8_quantize(Tensor values, Tensor code, int blocksize) -> (Tensor codes, Tensor absmax)");

  // W (sum(rows), cols) in `dtype`, bit-identical to bitsandbytes' dequantize_4bit.
  m.def(
      "nf4_dequantize(Tensor[] packed, Tensor[] absmax, Tensor[] nested_absmax, Tensor[] nested_code, "
      "float[] offset, int[] rows, int cols, int blocksize, ScalarType dtype) -> Tensor");

  // y = x @ W^T + scaling * (x @ lora_A^T) @ lora_B^T (+ bias) with W in NF4, x (..., K) -> (..., N).
  m.def(
      "nf4_lora_linear(Tensor x, Tensor[] packed, Tensor[] absmax, Tensor[] nested_absmax, Tensor[] nested_code, "
      "float[] offset, int[] rows, int blocksize, Tensor lora_A, Tensor lora_B, float scaling, Tensor? bias) -> Tensor");

  // Backward of nf4_lora_linear (no weight gradient): (grad_x, grad_lora_A, grad_lora_B), each only if selected
  // by output_mask, else an empty tensor.
  m.def(
      "nf4_lora_linear_backward(Tensor grad_y, Tensor x, Tensor[] packed, Tensor[] absmax, Tensor[] nested_absmax, "
      "Tensor[] nested_code, float[] offset, int[] rows, int blocksize, Tensor lora_A, Tensor lora_B, float scaling, "
      "bool[3] output_mask) -> (Tensor grad_x, Tensor grad_lora_A, Tensor grad_lora_B)");

  // ---- Decode step of the static rollout loop (csrc/kernels/decode_attention.h, csrc/torch/decode_attention.h).
  // q (B, H, D), k and v (B, Hkv, D) of the new token -> rotated q (B, H, D); writes rotated k and v to slot `slot`
  // (int64 (1,)) of the caches (>= B, Hkv, L, D). cos, sin (B, D); q_norm, k_norm: Qwen3's per-head RMSNorm weights.
  m.def(
      "rotary_cache_write(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor? q_norm, Tensor? k_norm, "
      "float eps, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor slot) -> Tensor");

  // Grouped-query attention of q (B, H, D) over cache slots [start[b], slot] of each row (start int32 (>= B,)):
  // (B, H, D). splits: parts of the key range run by separate thread blocks (0: chosen from the shapes).
  m.def(
      "decode_attention(Tensor q, Tensor cache_k, Tensor cache_v, Tensor start, Tensor slot, float scale, "
      "int splits) -> Tensor");

  // transformers' LlamaRMSNorm of x (M, N) (contiguous rows) with weight (N,): w * round(x / rms(x)), one rounding
  // per step as transformers rounds -> (M, N).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
}

}  // namespace fusedrl
