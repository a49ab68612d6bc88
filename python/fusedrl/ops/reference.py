"""Plain PyTorch references of the fused ops, written the naive way TRL does it.

They materialise the full logits, so they are for tests (in float64) and as the "naive PyTorch" peer in
benchmarks (logits in the input dtype, log-softmax in float32). The loss follows the structure of TRL's
GRPOTrainer._compute_loss line by line, independently of policy_loss.py, so that each checks the other.
"""

from __future__ import annotations

import math

import torch

from .decode_reference import decode_attention_reference, rms_norm_reference, rope_reference  # noqa: F401
from .grpo_loss import GRPOLossOutput
from .nf4_reference import (nf4_dequantize_reference, nf4_lora_linear_reference,  # noqa: F401
                            nf4_quantize_reference)


def logits_reference(hidden, weight, bias=None, *, temperature=1.0, logit_softcap=None, logit_scale=1.0,
                     compute_dtype=None):
    """softcap(logit_scale * (hidden @ weight^T + bias)) / temperature, the GEMM in the input dtype, the rest in
    compute_dtype."""
    compute_dtype = compute_dtype or (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(compute_dtype) * logit_scale
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits / temperature


def selective_logp_reference(hidden, weight, ids, bias=None, *, temperature=1.0, logit_softcap=None,
                             logit_scale=1.0, compute_dtype=None):
    """-> (logp, entropy), each shaped like ids."""
    logits = logits_reference(hidden, weight, bias, temperature=temperature, logit_softcap=logit_softcap,
                              logit_scale=logit_scale, compute_dtype=compute_dtype)
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def grpo_loss_reference(
    hidden, lm_head_weight, completion_ids, completion_mask, advantages, *, lm_head_bias=None, old_logp=None,
    ref_logp=None, sampling_logp=None, loss_type="dapo", importance_sampling_level="token", epsilon=0.2,
    epsilon_high=None, delta=None, beta=0.0, use_bias_correction_kl=True, temperature=1.0, max_completion_length=None, num_items_in_batch=None,
    vllm_importance_sampling_correction=False, vllm_importance_sampling_mode="sequence_mask",
    vllm_importance_sampling_clip_min=None, vllm_importance_sampling_clip_max=3.0, logit_softcap=None,
    logit_scale=1.0, return_entropy=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, compute_dtype=None, chunk_size=None,
) -> GRPOLossOutput:
    del chunk_size  # accepted so that benchmarks can call both implementations alike
    per_token_logps, entropies = selective_logp_reference(
        hidden, lm_head_weight, completion_ids, lm_head_bias, temperature=temperature, logit_softcap=logit_softcap,
        logit_scale=logit_scale, compute_dtype=compute_dtype)
    dtype = per_token_logps.dtype
    mask = completion_mask.to(dtype)
    epsilon_low = epsilon
    epsilon_high = epsilon if epsilon_high is None else epsilon_high

    advantages = advantages.to(dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_per_token_logps = per_token_logps.detach() if old_logp is None else old_logp.to(dtype)

    importance_sampling_ratio = None
    if vllm_importance_sampling_correction:
        per_token_logps_diff = (old_per_token_logps - sampling_logp.to(dtype)) * mask
        per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
        if vllm_importance_sampling_mode in ("sequence_mask", "sequence_truncate"):
            logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
        else:
            logps_diff = per_token_logps_diff
        importance_sampling_ratio = torch.exp(logps_diff)
        if vllm_importance_sampling_mode in ("sequence_truncate", "token_truncate"):
            importance_sampling_ratio = torch.clamp(importance_sampling_ratio, min=vllm_importance_sampling_clip_min,
                                                    max=vllm_importance_sampling_clip_max)
        else:
            min_val = vllm_importance_sampling_clip_min if vllm_importance_sampling_clip_min is not None else -math.inf
            max_val = vllm_importance_sampling_clip_max if vllm_importance_sampling_clip_max is not None else math.inf
            invalid = (importance_sampling_ratio < min_val) | (importance_sampling_ratio > max_val)
            importance_sampling_ratio = importance_sampling_ratio.masked_fill(invalid, value=0.0)
        importance_sampling_ratio = importance_sampling_ratio.detach()

    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    raw_ratio = coef_1

    if beta != 0.0:
        per_token_kl = torch.exp(ref_logp.to(dtype) - per_token_logps) - (ref_logp.to(dtype) - per_token_logps) - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss1 = coef_1 * advantages
        per_token_loss2 = coef_2 * advantages
        per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    elif loss_type == "sapo":
        temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * advantages
    else:
        raise ValueError(f"Unknown loss type: {loss_type}")

    if importance_sampling_ratio is not None:
        per_token_loss = per_token_loss * importance_sampling_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl

    if loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        max_len = max_completion_length if max_completion_length is not None else completion_ids.shape[1]
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len)
    elif loss_type in ("cispo", "dapo"):
        normalizer = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=dtype)
        loss = (per_token_loss * mask).sum() / normalizer.clamp(min=1.0)
    else:  # luspo
        loss = (per_token_loss * mask).sum(-1).mean()

    completion_token_count = mask.sum().clamp(min=1.0)

    def masked_sequence_means(x):
        if x.shape[1] == 1 and importance_sampling_level == "sequence":
            return x.squeeze(1)
        return (x * mask).sum(-1) / mask.sum(-1)

    def nan_extreme(x, fn):
        x = x[~torch.isnan(x)]
        return fn(x) if x.numel() else torch.zeros((), dtype=dtype)

    def masked_batch_mean(x):
        # TRL tests x.shape[1] == 1 to spot per-sequence values, which misfires when T == 1; test the level instead.
        per_sequence = importance_sampling_level == "sequence" and x.shape[1] == 1
        return x.mean() if per_sequence else (x * mask).sum() / completion_token_count

    metrics = {}
    with torch.no_grad():
        if beta != 0.0:
            metrics["kl"] = masked_batch_mean(per_token_kl)
        if return_entropy:
            metrics["entropy"] = masked_batch_mean(entropies)
        if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
            is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
            metrics["clip_ratio/low_mean"] = masked_batch_mean(is_low_clipped.to(dtype))
            metrics["clip_ratio/high_mean"] = masked_batch_mean(is_high_clipped.to(dtype))
            metrics["clip_ratio/region_mean"] = masked_batch_mean((is_low_clipped | is_high_clipped).to(dtype))
            metrics["clip_ratio/low_min"] = nan_extreme(masked_sequence_means(is_low_clipped.to(dtype)), torch.min)
            metrics["clip_ratio/high_max"] = nan_extreme(masked_sequence_means(is_high_clipped.to(dtype)), torch.max)
        elif loss_type == "cispo":
            metrics["cispo_clip_ratio"] = masked_batch_mean(((coef_1 > epsilon_high) & (advantages > 0)).to(dtype))
        active = mask.bool() if raw_ratio.shape[1] != 1 else mask.bool().any(-1, keepdim=True)
        values = raw_ratio.expand_as(active)[active]
        for name, fn in (("min", torch.min), ("mean", torch.mean), ("max", torch.max)):
            metrics[f"is_ratio/{name}"] = fn(values) if values.numel() else torch.ones((), dtype=dtype)
        if importance_sampling_ratio is not None:  # TRL: active tokens, or every sequence; 0 when empty
            if importance_sampling_ratio.shape[1] == 1:
                values = importance_sampling_ratio.flatten()
            else:
                values = importance_sampling_ratio[mask.bool()]
            for name, fn in (("min", torch.min), ("mean", torch.mean), ("max", torch.max)):
                metrics[f"sampling/importance_sampling_ratio/{name}"] = (
                    fn(values) if values.numel() else torch.zeros((), dtype=dtype))
    return GRPOLossOutput(loss, per_token_logps, entropies if return_entropy else None, metrics)
