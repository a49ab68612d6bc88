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
        if opts.use_bias_correction_kl:  # TRL 1.16's default: the k3 estimate weighted by the importance ratio
            kl = kl * ratio
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
    # A sampler logp the sampler could not give (NaN), or any value at a padded position, means "no correction":
    # a zero difference, as TRL's nan_to_num.
    diff = torch.nan_to_num((old - sampling_logp) * mask, nan=0.0)
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
        # TRL 1.16: the masked sum of each sequence (a (B, 1) sequence-level loss counts once per active token,
        # i.e. weighted by the length), then the mean over sequences.
        return masked.sum(-1).mean()
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
    """TRL 1.16's metric names and definitions for the same quantities; `is_ratio/*` is fusedrl's own."""
    count = mask.sum().clamp(min=1.0)

    def masked_mean(x, per_sequence=False):
        if per_sequence and x.shape[-1] == 1:  # one value per sequence (sequence-level importance sampling)
            return x.mean()
        return torch.where(active, x, 0.0).sum() / count

    def per_sequence_means(x):
        """(B,) mean over each sequence's active tokens; NaN for a sequence without any (TRL's masked_seq_mean)."""
        if x.shape[-1] == 1:
            return x.squeeze(-1)
        lengths = mask.sum(-1)
        return torch.where(lengths > 0, torch.where(active, x, 0.0).sum(-1) / lengths.clamp(min=1.0), torch.nan)

    sequence_level = opts.importance_sampling_level == "sequence"

    metrics: dict[str, torch.Tensor] = {}
    if kl is not None:
        metrics["kl"] = masked_mean(kl)
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy.to(mask.dtype))
    if opts.loss_type in PPO_CLIPPED_LOSS_TYPES:
        low = ((clip_ratio_source < 1.0 - opts.epsilon_low) & (adv < 0)).to(mask.dtype)
        high = ((clip_ratio_source > 1.0 + opts.epsilon_upper) & (adv > 0)).to(mask.dtype)
        metrics["clip_ratio/low_mean"] = masked_mean(low, sequence_level)
        metrics["clip_ratio/high_mean"] = masked_mean(high, sequence_level)
        metrics["clip_ratio/region_mean"] = masked_mean(torch.maximum(low, high), sequence_level)
        metrics["clip_ratio/low_min"] = _nan_extreme(per_sequence_means(low), torch.amin)
        metrics["clip_ratio/high_max"] = _nan_extreme(per_sequence_means(high), torch.amax)
    elif opts.loss_type == "cispo":
        clipped = ((clip_ratio_source > opts.epsilon_upper) & (adv > 0)).to(mask.dtype)
        metrics["cispo_clip_ratio"] = masked_mean(clipped, sequence_level)
    metrics.update(_ratio_stats("is_ratio", ratio, active, empty=1.0))
    if sampler_weight is not None:
        # TRL: over the active tokens (token modes) or over every sequence (sequence modes); 0 when there is none
        sampler_active = active if sampler_weight.shape[-1] != 1 else torch.ones_like(active[:, :1])
        metrics.update(_ratio_stats("sampling/importance_sampling_ratio", sampler_weight, sampler_active, empty=0.0))
    return metrics


def _nan_extreme(values: torch.Tensor, reduce) -> torch.Tensor:
    """min / max over the non-NaN values (TRL's nanmin / nanmax); 0 instead of NaN when every value is NaN."""
    valid = ~torch.isnan(values)
    fill = torch.inf if reduce is torch.amin else -torch.inf
    extreme = reduce(torch.where(valid, values, fill))
    return torch.where(valid.any(), extreme, torch.zeros_like(extreme))


def _ratio_stats(prefix: str, ratio: torch.Tensor, active: torch.Tensor, empty: float) -> dict[str, torch.Tensor]:
    """min / mean / max over active tokens (over sequences with any active token when `ratio` is (B, 1) and
    `active` (B, T)); `empty` when none is active.

    Written without boolean indexing so that torch.compile(fullgraph=True) traces it.
    """
    selected = active if ratio.shape[-1] != 1 or active.shape[-1] == 1 else active.any(-1, keepdim=True)
    ratio = ratio.expand_as(selected)
    count = selected.sum()
    none = count == 0
    fallback = torch.full((), empty, dtype=ratio.dtype, device=ratio.device)
    low = torch.where(selected, ratio, torch.inf).amin()
    high = torch.where(selected, ratio, -torch.inf).amax()
    mean = torch.where(selected, ratio, 0.0).sum() / count.clamp(min=1)
    return {f"{prefix}/min": torch.where(none, fallback, low), f"{prefix}/mean": torch.where(none, fallback, mean),
            f"{prefix}/max": torch.where(none, fallback, high)}
