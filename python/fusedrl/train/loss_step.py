"""The optimisation side of a step: micro-batch losses, gradient accumulation, the optimizer step.

Loss normalisation under gradient accumulation: the loss types normalised per micro-batch
(fusedrl.ops.options.PER_MICRO_BATCH_LOSSES) are divided by `gradient_accumulation_steps`; the ones normalised by
the active tokens of the whole optimizer step (PER_STEP_TOKEN_LOSSES) get `num_items_in_batch` = active completion
tokens of all the micro-batches of the step. Accumulating k micro-batches then gives exactly the gradient of one
batch k times as large for dapo, cispo, grpo, sapo, dr_grpo and luspo (all micro-batches have the same number of
completions); for bnpo only when every micro-batch has the same number of active tokens, since bnpo normalises by
each micro-batch's own token count (as in TRL).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusedrl.model.hidden import lm_head_of
from fusedrl.ops import grpo_loss
from fusedrl.ops.options import PER_MICRO_BATCH_LOSSES, PER_STEP_TOKEN_LOSSES
from fusedrl.train.batching import TrainingBatch
from fusedrl.train.config import GRPOConfig
from fusedrl.train.optim import Precision
from fusedrl.train.policy_forward import completion_hidden


def micro_batch_loss(model: torch.nn.Module, batch: TrainingBatch, args: GRPOConfig, precision: Precision,
                     num_items_in_batch: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch, already scaled for gradient accumulation, and the op's metrics."""
    with precision.autocast():
        hidden = completion_hidden(model, batch)
        head = lm_head_of(model)
        output = grpo_loss(
            hidden,
            head.weight,
            batch.completion_ids,
            batch.completion_mask,
            batch.advantages,
            lm_head_bias=head.bias,
            old_logp=batch.old_logp,
            ref_logp=batch.ref_logp,
            sampling_logp=batch.sampling_logp,
            loss_type=args.loss_type,
            importance_sampling_level=args.importance_sampling_level,
            epsilon=args.epsilon,
            epsilon_high=args.epsilon_high,
            delta=args.delta,
            beta=args.beta,
            temperature=args.temperature,
            max_completion_length=args.max_completion_length,
            num_items_in_batch=num_items_in_batch if args.loss_type in PER_STEP_TOKEN_LOSSES else None,
            vllm_importance_sampling_correction=batch.sampling_logp is not None,
            vllm_importance_sampling_mode=args.vllm_importance_sampling_mode,
            vllm_importance_sampling_clip_min=args.vllm_importance_sampling_clip_min,
            vllm_importance_sampling_clip_max=args.vllm_importance_sampling_clip_max,
            logit_softcap=head.logit_softcap,
            return_entropy=True,
            sapo_temperature_pos=args.sapo_temperature_pos,
            sapo_temperature_neg=args.sapo_temperature_neg,
        )
    loss = output.loss
    if args.loss_type in PER_MICRO_BATCH_LOSSES:
        loss = loss / args.gradient_accumulation_steps
    metrics = {name: float(value) for name, value in output.metrics.items()}
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def accumulate_gradients(model: torch.nn.Module, micro_batches: Sequence[TrainingBatch], args: GRPOConfig,
                         precision: Precision) -> dict[str, float]:
    """Forward and backward over the micro-batches of one optimizer step; gradients add up in `.grad`.

    Returns the op's metrics averaged over the micro-batches and "loss", the step's total loss.
    """
    num_items_in_batch = sum(batch.num_active_tokens for batch in micro_batches)
    per_micro_batch = []
    for batch in micro_batches:
        loss, metrics = micro_batch_loss(model, batch, args, precision, num_items_in_batch)
        precision.backward(loss)
        per_micro_batch.append(metrics)
    averaged = mean_of_dicts(per_micro_batch)
    averaged["loss"] = sum(metrics["loss"] for metrics in per_micro_batch)
    return averaged


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   precision: Precision, max_grad_norm: float) -> float:
    """Unscale, clip, step optimizer and scheduler, zero gradients; returns the pre-clip gradient norm."""
    scaler = precision.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm > 0 else float("inf")))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def mean_of_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean over the dicts that have the key."""
    keys = {key for d in dicts for key in d}
    return {key: sum(d[key] for d in dicts if key in d) / sum(1 for d in dicts if key in d) for key in sorted(keys)}
