"""`fusedrl.ops.grpo_loss` and `fusedrl.ops.selective_logp`: the fused lm-head + log-softmax + GRPO-family loss.

hidden (B, T, H) -> fused chunked lm-head + log-softmax (fusedrl::fused_linear_logp; never N x V logits)
-> per-token logp (B, T) -> GRPO-family objective (policy_loss.py, TRL semantics) -> loss and metrics.
Position t of `hidden` predicts `completion_ids[:, t]`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import trainable_head
from .linear_logp import linear_logp
from .options import LossOptions
from .policy_loss import policy_loss


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor                # scalar
    logp: torch.Tensor                # (B, T) float32 (float64 for float64 inputs); reusable as old logp
    entropy: torch.Tensor | None      # (B, T) when return_entropy
    metrics: dict[str, torch.Tensor]  # 0-d tensors, TRL names: kl, entropy, clip_ratio/*, cispo_clip_ratio, is_ratio/*,
                                      # sampling/importance_sampling_ratio/*


def grpo_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    sampling_logp: torch.Tensor | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    use_bias_correction_kl: bool = True,
    temperature: float = 1.0,
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    vllm_importance_sampling_correction: bool = False,
    vllm_importance_sampling_mode: str = "sequence_mask",
    vllm_importance_sampling_clip_min: float | None = None,
    vllm_importance_sampling_clip_max: float | None = 3.0,
    logit_softcap: float | None = None,
    logit_scale: float = 1.0,
    return_entropy: bool = False,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    chunk_size: int | None = None,
) -> GRPOLossOutput:
    """GRPO-family loss of one micro-batch, matching TRL 1.16's GRPOTrainer._compute_loss for the same options.

    The logits are softcap(logit_scale * (hidden @ W^T + b)) / temperature, TRL's fused lm-head order (logit_scale:
    Cohere's `logit_scale`, 1 / Granite's `logits_scaling`; softcap: `final_logit_softcapping`).
    use_bias_correction_kl (TRL 1.16's default True) weights the k3 KL of each token by its importance ratio.

    grpo / sapo / bnpo / dr_grpo / luspo are normalised within this micro-batch (divide by the number of
    accumulation steps yourself); dapo / cispo divide by `num_items_in_batch`, the active-token count of the
    whole accumulated batch (default: this micro-batch's), so micro-batches sum to the big-batch gradient.
    """
    opts = LossOptions(
        loss_type=loss_type, importance_sampling_level=importance_sampling_level, epsilon=epsilon,
        epsilon_high=epsilon_high, delta=delta, beta=beta, use_bias_correction_kl=use_bias_correction_kl,
        temperature=temperature,
        max_completion_length=max_completion_length,
        vllm_importance_sampling_correction=vllm_importance_sampling_correction,
        vllm_importance_sampling_mode=vllm_importance_sampling_mode,
        vllm_importance_sampling_clip_min=vllm_importance_sampling_clip_min,
        vllm_importance_sampling_clip_max=vllm_importance_sampling_clip_max, logit_softcap=logit_softcap,
        logit_scale=logit_scale, sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg)
    return grpo_loss_with_options(hidden, lm_head_weight, completion_ids, completion_mask, advantages, opts,
                                  lm_head_bias=lm_head_bias, old_logp=old_logp, ref_logp=ref_logp,
                                  sampling_logp=sampling_logp, num_items_in_batch=num_items_in_batch,
                                  return_entropy=return_entropy, chunk_size=chunk_size)


def grpo_loss_with_options(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    opts: LossOptions,
    *,
    lm_head_bias: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    sampling_logp: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> GRPOLossOutput:
    """grpo_loss with its loss options in one LossOptions (e.g. GRPOConfig.loss_options())."""
    check_loss_inputs(hidden, lm_head_weight, completion_ids, completion_mask, advantages, old_logp=old_logp,
                      ref_logp=ref_logp, sampling_logp=sampling_logp, opts=opts)
    head_trainable = torch.is_grad_enabled() and (
        lm_head_weight.requires_grad or (lm_head_bias is not None and lm_head_bias.requires_grad))
    if head_trainable and trainable_head.eligible(opts, old_logp, trainable_head.compute_dtype(hidden)):  # gradients from the forward pass: 3 GEMMs
        return GRPOLossOutput(*trainable_head.grpo_loss_trainable_head(
            hidden, lm_head_weight, lm_head_bias, completion_ids, completion_mask, advantages, opts,
            old_logp=old_logp, ref_logp=ref_logp, sampling_logp=sampling_logp, num_items_in_batch=num_items_in_batch,
            return_entropy=return_entropy, chunk_size=chunk_size))
    batch, width, size = hidden.shape
    logp, entropy = linear_logp(hidden.reshape(batch * width, size), lm_head_weight, completion_ids.reshape(-1),
                                lm_head_bias, temperature=opts.head_temperature, logit_softcap=opts.head_softcap,
                                return_entropy=return_entropy, chunk_size=chunk_size)
    logp = logp.view(batch, width)
    entropy = entropy.view(batch, width) if entropy is not None else None
    loss, metrics = policy_loss(logp, completion_mask, advantages, opts, old_logp=old_logp, ref_logp=ref_logp,
                                sampling_logp=sampling_logp, num_items_in_batch=num_items_in_batch, entropy=entropy)
    return GRPOLossOutput(loss, logp, entropy, metrics)


@torch.no_grad()
def selective_logp(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    completion_ids: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    logit_scale: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logp (B, T) (and entropy) without gradient: old-policy and reference log-probabilities."""
    _check_hidden_and_ids(hidden, lm_head_weight, completion_ids)
    opts = LossOptions(temperature=temperature, logit_softcap=logit_softcap, logit_scale=logit_scale)
    batch, width, size = hidden.shape
    logp, entropy = linear_logp(hidden.reshape(batch * width, size), lm_head_weight, completion_ids.reshape(-1),
                                lm_head_bias, temperature=opts.head_temperature, logit_softcap=opts.head_softcap,
                                return_entropy=return_entropy, chunk_size=chunk_size)
    return logp.view(batch, width), (entropy.view(batch, width) if entropy is not None else None)


# ---------------------------------------------------------------------------------------------------------------
# argument checks: each message names the argument and what was expected


def check_loss_inputs(hidden, lm_head_weight, completion_ids, completion_mask, advantages, *, old_logp, ref_logp,
                      sampling_logp, opts: LossOptions) -> None:
    _check_hidden_and_ids(hidden, lm_head_weight, completion_ids)
    shape = tuple(completion_ids.shape)
    _check_per_token("completion_mask", completion_mask, shape, hidden.device)
    if advantages.dim() == 1:
        _check_same(advantages.shape[0], shape[0], "advantages", "(B,) = ({},)".format(shape[0]), advantages.shape)
    else:
        _check_per_token("advantages", advantages, shape, hidden.device)
    if advantages.device != hidden.device:
        raise ValueError(f"advantages is on {advantages.device} but hidden is on {hidden.device}")
    for name, value in (("old_logp", old_logp), ("ref_logp", ref_logp), ("sampling_logp", sampling_logp)):
        if value is not None:
            _check_per_token(name, value, shape, hidden.device)
    if opts.beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={opts.beta} needs ref_logp (the reference model's per-token logp); pass it or set beta=0")
    if opts.vllm_importance_sampling_correction and sampling_logp is None:
        raise ValueError("vllm_importance_sampling_correction=True needs sampling_logp (the sampler's per-token logp)")


def _check_hidden_and_ids(hidden, lm_head_weight, completion_ids) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, H), got shape {tuple(hidden.shape)}")
    if completion_ids.dim() != 2 or tuple(completion_ids.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"completion_ids must be (B, T) = {tuple(hidden.shape[:2])} like hidden, "
                         f"got shape {tuple(completion_ids.shape)}")
    if completion_ids.dtype != torch.long:
        raise ValueError(f"completion_ids must be int64 (torch.long), got {completion_ids.dtype}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"lm_head_weight must be (V, H) with H = {hidden.shape[2]}, got {tuple(lm_head_weight.shape)}")
    for name, tensor in (("lm_head_weight", lm_head_weight), ("completion_ids", completion_ids)):
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")


def _check_per_token(name, tensor, shape, device) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must be (B, T) = {shape}, got shape {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but hidden is on {device}")


def _check_same(got, expected, name, what, shape) -> None:
    if got != expected:
        raise ValueError(f"{name} must be {what}, got shape {tuple(shape)}")
