"""Token-level GRPO-family loss with a trainable lm-head: gradients from the forward pass.

With a trainable head the per-token coefficient dL/dlogp is needed while each chunk's logits are still in
memory, or the logits must be recomputed in the backward (four GEMMs). For token-level losses with a known
normaliser dL/dlogp_t depends on logp_t alone, so fusedrl::fused_linear_token_loss evaluates it inside the row
pass and produces the gradients of hidden, weight and bias with three GEMMs. The loss value and metrics come from
policy_loss on the returned logp; autograd receives the precomputed gradients and scales them by grad_output.

Not eligible (and served by the generic path): sequence-level importance sampling (GSPO couples a sequence's
tokens), the sampler correction without old_logp (its weight would depend on the current logp), and
float16: its gradients must be formed after a loss scaler has scaled grad_output, or small ones underflow.
"""

from __future__ import annotations

import torch

from .. import _ext
from .options import LossOptions
from .policy_loss import policy_loss, sampler_correction

_ext.load()
_OP = torch.ops.fusedrl.fused_linear_token_loss
LOSS_KINDS = {"grpo": 0, "bnpo": 0, "dr_grpo": 0, "dapo": 0, "luspo": 0, "cispo": 1, "sapo": 2}


def eligible(opts: LossOptions, old_logp: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether the forward-gradient path serves this configuration; `dtype` is the lm-head GEMM's dtype."""
    return (opts.importance_sampling_level == "token" and opts.loss_type in LOSS_KINDS
            and (not opts.vllm_importance_sampling_correction or old_logp is not None) and dtype != torch.float16)


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the lm-head GEMM runs in: the autocast dtype when autocast is on (as nn.Linear), else hidden's."""
    device_type = hidden.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


@torch.library.register_fake("fusedrl::fused_linear_token_loss")
def _fused_linear_token_loss_fake(hidden, weight, bias, targets, temperature, logit_softcap, return_entropy, old_logp,
                                  advantages, ref_logp, policy_weight, kl_weight, loss_kind, epsilon_low, epsilon_high,
                                  delta, sapo_temperature_pos, sapo_temperature_neg, kl_ratio_weighted, output_mask,
                                  chunk_size):
    n = hidden.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return (hidden.new_empty((n,), dtype=acc), hidden.new_empty((n,) if return_entropy else (0,), dtype=acc),
            hidden.new_empty(hidden.shape if output_mask[0] else (0,)),
            weight.new_empty(weight.shape if output_mask[1] else (0,)),
            weight.new_empty((weight.shape[0],) if output_mask[2] and bias is not None else (0,)))


class _PrecomputedGradients(torch.autograd.Function):
    """Returns `loss`; its gradients w.r.t. hidden, weight and bias are the given ones times grad_output."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        hidden_shape, hidden_dtype, weight_dtype = ctx.shapes
        # In the input's dtype (e.g. float32 parameters under bf16 autocast), so a loss scale cannot overflow.
        scale = lambda g, dtype: g.to(dtype) * grad.to(dtype)  # noqa: E731
        return (None,
                scale(grad_hidden, hidden_dtype).view(hidden_shape) if ctx.needs_input_grad[1] else None,
                scale(grad_weight, weight_dtype) if ctx.needs_input_grad[2] else None,
                scale(grad_bias, weight_dtype) if ctx.needs_input_grad[3] else None,
                None, None, None)


def token_weights(mask: torch.Tensor, opts: LossOptions, num_items_in_batch, sampler_weight):
    """(policy_weight, kl_weight), each (B, T): the loss type's normaliser x mask (x sampler weight | x beta), so
    that loss = sum_t policy_weight_t * policy_t + kl_weight_t * kl_t (kl_t times r_t with use_bias_correction_kl),
    as policy_loss normalises it."""
    batch, width = mask.shape
    if opts.loss_type in ("grpo", "sapo"):
        norm = 1.0 / (mask.sum(-1, keepdim=True).clamp(min=1.0) * batch)
    elif opts.loss_type == "bnpo":
        norm = 1.0 / mask.sum().clamp(min=1.0)
    elif opts.loss_type == "luspo":  # each sequence's masked sum, then the mean over sequences
        norm = torch.tensor(1.0 / batch, dtype=mask.dtype, device=mask.device)
    elif opts.loss_type == "dr_grpo":
        norm = torch.tensor(1.0 / (batch * (opts.max_completion_length or width)), dtype=mask.dtype, device=mask.device)
    else:  # dapo, cispo
        total = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype,
                                                                              device=mask.device)
        norm = 1.0 / total.clamp(min=1.0)
    weight = mask * norm
    policy = weight * sampler_weight if sampler_weight is not None else weight
    return policy.expand(batch, width), weight * opts.beta


def _as_float32(value: float) -> float:
    """SAPO's temperatures as TRL (and policy_loss) use them: torch.where over two Python floats gives a float32
    tensor, so 1.05 is really float32(1.05). Rounded alike here so that both paths give the same gradient."""
    return float(torch.tensor(value, dtype=torch.float32))


def grpo_loss_trainable_head(hidden, weight, bias, completion_ids, completion_mask, advantages, opts: LossOptions, *,
                             old_logp, ref_logp, sampling_logp, num_items_in_batch, return_entropy, chunk_size):
    """-> (loss, logp (B, T), entropy or None, metrics) for an eligible configuration (see `eligible`)."""
    batch, width, size = hidden.shape
    dtype = compute_dtype(hidden)
    run_hidden, run_weight = hidden.to(dtype), weight.to(dtype)
    run_bias = None if bias is None else bias.to(dtype)
    acc = torch.float64 if run_hidden.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        mask = completion_mask.bool().to(acc)
        adv = advantages.to(acc)
        adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand(batch, width)
        old = None if old_logp is None else old_logp.to(acc)
        sampler_weight = None
        if opts.vllm_importance_sampling_correction:
            sampler_weight = sampler_correction(old, sampling_logp.to(acc), mask, opts)
        policy_weight, kl_weight = token_weights(mask, opts, num_items_in_batch, sampler_weight)
        flat = lambda t: None if t is None else t.reshape(-1).contiguous()  # noqa: E731
        needs = [hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]
        logp, entropy, grad_hidden, grad_weight, grad_bias = _OP(
            run_hidden.reshape(batch * width, size), run_weight, run_bias, completion_ids.reshape(-1),
            float(opts.head_temperature), opts.head_softcap, return_entropy, flat(old),
            flat(adv), flat(None if ref_logp is None else ref_logp.to(acc)), flat(policy_weight), flat(kl_weight),
            LOSS_KINDS[opts.loss_type], float(opts.epsilon_low), float(opts.epsilon_upper), opts.delta,
            _as_float32(opts.sapo_temperature_pos), _as_float32(opts.sapo_temperature_neg),
            opts.use_bias_correction_kl, needs, chunk_size)
        logp = logp.view(batch, width)
        entropy = entropy.view(batch, width) if return_entropy else None
        loss_value, metrics = policy_loss(logp, completion_mask, advantages, opts, old_logp=old_logp,
                                          ref_logp=ref_logp, sampling_logp=sampling_logp,
                                          num_items_in_batch=num_items_in_batch, entropy=entropy)
    loss = _PrecomputedGradients.apply(loss_value, hidden, weight, bias, grad_hidden, grad_weight, grad_bias)
    return loss, logp, entropy, metrics
