"""GRPO-family objective on per-token log-probabilities (B, T): importance weights, surrogate, sampler
correction, KL, normalisation and metrics, with TRL's GRPOTrainer semantics.

This is the cheap half of the fused loss: it touches B x T numbers, never the vocabulary. Autograd derives
dL/dlogp per token here and hands it to the fused lm-head op's backward. Masked positions are excluded with
`torch.where`, so non-finite values at padding can never leak into the loss as NaN.
"""

from __future__ import annotations

import torch

from .options import PPO_CLIPPED_LOSS_TYPES, LossOptions


def policy_loss(
    logp: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    opts: LossOptions,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    sampling_logp: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> (scalar loss, metrics). logp (B, T) carries the gradient; every other input is treated as data."""
    dtype = logp.dtype
    active = completion_mask.bool()
    mask = active.to(dtype)
    adv = advantages.to(dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    old = logp.detach() if old_logp is None else old_logp.to(dtype)

    log_ratio = torch.where(active, logp - old, 0.0)
    if opts.importance_sampling_level == "token":
        log_weight = log_ratio
    else:  # GSPO: exp of the masked mean log-ratio of the sequence
        log_weight = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp(log_weight)

    per_token, ratio_for_clip_metrics = _surrogate(ratio, adv, logp, opts)
    sampler_weight = None
    if opts.vllm_importance_sampling_correction:
        sampler_weight = sampler_correction(old, sampling_logp.to(dtype), mask, opts)
        per_token = per_token * sampler_weight
    kl = None
    if opts.beta != 0.0:
        delta = ref_logp.to(dtype) - logp
        kl = torch.where(active, torch.exp(delta) - delta - 1.0, 0.0)
        per_token = per_token + opts.beta * kl

    loss = _normalise(per_token, active, mask, opts, num_items_in_batch)
    with torch.no_grad():
        metrics = _metrics(ratio, ratio_for_clip_metrics, adv, active, mask, opts, kl, entropy, sampler_weight)
    return loss, metrics


def _surrogate(ratio, adv, logp, opts: LossOptions):
    """Per-token loss before correction and KL; also the ratio TRL's clip metrics look at."""
    if opts.loss_type == "cispo":
        clamped = torch.clamp(ratio, max=opts.epsilon_upper).detach()
        return -clamped * adv * logp, ratio
    if opts.loss_type == "sapo":
        temperatures = torch.where(adv > 0, opts.sapo_temperature_pos, opts.sapo_temperature_neg)
        soft = torch.sigmoid(temperatures * (ratio - 1.0)) * 4.0 / temperatures
        return -soft * adv, ratio
    clipped = torch.clamp(ratio, 1.0 - opts.epsilon_low, 1.0 + opts.epsilon_upper)
    if opts.delta is not None:  # two-sided clipping
        ratio = torch.clamp(ratio, max=opts.delta)
    return -torch.min(ratio * adv, clipped * adv), ratio


def sampler_correction(old, sampling_logp, mask, opts: LossOptions):
    """Weight correcting for the sampler (e.g. vLLM) disagreeing with the trainer; no gradient."""
    diff = (old - sampling_logp) * mask
    if opts.vllm_importance_sampling_mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    weight = torch.exp(diff)
    lo, hi = opts.vllm_importance_sampling_clip_min, opts.vllm_importance_sampling_clip_max
    if opts.vllm_importance_sampling_mode.endswith("truncate"):
        return torch.clamp(weight, min=lo, max=hi).detach()
    outside = torch.zeros_like(weight, dtype=torch.bool)
    if lo is not None:
        outside |= weight < lo
    if hi is not None:
        outside |= weight > hi
    return weight.masked_fill(outside, 0.0).detach()


def _normalise(per_token, active, mask, opts: LossOptions, num_items_in_batch):
    batch, width = mask.shape
    masked = torch.where(active, per_token, 0.0)
    if opts.loss_type == "luspo":
        # Each sequence's loss weighted by its length, as TRL. Where the per-token loss is (B, T) (token level or
        # beta > 0) TRL also sums padded positions; they are excluded here.
        lengths = mask.sum(1, keepdim=True)
        return (per_token * lengths).mean() if per_token.shape[-1] == 1 else (masked * lengths).mean()
    if opts.loss_type in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if opts.loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if opts.loss_type == "dr_grpo":
        max_len = opts.max_completion_length if opts.max_completion_length is not None else width
        return masked.sum() / (batch * max_len)
    # dapo, cispo: a token count over the whole accumulated batch, so micro-batches add up to one big batch
    total = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype,
                                                                          device=mask.device)
    return masked.sum() / total.clamp(min=1.0)


def _metrics(ratio, clip_ratio_source, adv, active, mask, opts: LossOptions, kl, entropy, sampler_weight):
    count = mask.sum().clamp(min=1.0)

    def masked_mean(x, per_sequence=False):
        if per_sequence and x.shape[-1] == 1:  # one value per sequence (sequence-level importance sampling)
            return x.mean()
        return torch.where(active, x, 0.0).sum() / count

    sequence_level = opts.importance_sampling_level == "sequence"

    metrics: dict[str, torch.Tensor] = {}
    if kl is not None:
        metrics["kl"] = masked_mean(kl)
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy.to(mask.dtype))
    if opts.loss_type in PPO_CLIPPED_LOSS_TYPES:
        low = (clip_ratio_source < 1.0 - opts.epsilon_low) & (adv < 0)
        high = (clip_ratio_source > 1.0 + opts.epsilon_upper) & (adv > 0)
        metrics["clip_ratio/low_mean"] = masked_mean(low.to(mask.dtype), sequence_level)
        metrics["clip_ratio/high_mean"] = masked_mean(high.to(mask.dtype), sequence_level)
        metrics["clip_ratio/region_mean"] = masked_mean((low | high).to(mask.dtype), sequence_level)
    elif opts.loss_type == "cispo":
        metrics["clip_ratio/cispo_mean"] = masked_mean(((clip_ratio_source > opts.epsilon_upper) & (adv > 0)).to(mask.dtype),
                                                     sequence_level)
    metrics.update(_ratio_stats("is_ratio", ratio, active))
    if sampler_weight is not None:
        metrics.update(_ratio_stats("sampling_is_ratio", sampler_weight, active))
    return metrics


def _ratio_stats(prefix: str, ratio: torch.Tensor, active: torch.Tensor) -> dict[str, torch.Tensor]:
    """min / mean / max over active tokens (or over sequences with any active token); 1 when none is active.

    Written without boolean indexing so that torch.compile(fullgraph=True) traces it.
    """
    selected = active if ratio.shape[-1] != 1 else active.any(-1, keepdim=True)
    ratio = ratio.expand_as(selected)
    count = selected.sum()
    none = count == 0
    one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
    low = torch.where(selected, ratio, torch.inf).amin()
    high = torch.where(selected, ratio, -torch.inf).amax()
    mean = torch.where(selected, ratio, 0.0).sum() / count.clamp(min=1)
    return {f"{prefix}/min": torch.where(none, one, low), f"{prefix}/mean": torch.where(none, one, mean),
            f"{prefix}/max": torch.where(none, one, high)}
