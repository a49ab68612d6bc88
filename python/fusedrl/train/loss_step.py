"""The optimisation side of a step: micro-batch losses, gradient accumulation, the optimizer step.

Loss normalisation under gradient accumulation follows TRL 1.16 (loss_scaling.py): grpo, bnpo, dr_grpo, sapo and
luspo losses are divided by `gradient_accumulation_steps`; dapo and cispo divide by the active completion tokens of
the micro-batch's generation round scaled to one accumulation window (x gradient_accumulation_steps /
steps_per_generation), TRL's `num_items_in_batch`. With steps_per_generation = gradient_accumulation_steps that is
the token count of the optimizer step, and accumulating k micro-batches gives exactly the gradient of one batch k
times as large; bnpo normalises by each micro-batch's own token count (as in TRL). MoE models add
router_aux_loss_coef x the router load-balancing loss / gradient_accumulation_steps (model/moe.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from fusedrl.model.hidden import lm_head_of
from fusedrl.model.moe import RouterAux, forward_hidden_and_router_aux
from fusedrl.ops import grpo_loss_with_options
from fusedrl.train.batching import TrainingBatch
from fusedrl.train.checkpointing import reset_after_micro_batch
from fusedrl.train.config import GRPOConfig
from fusedrl.train.loss_scaling import micro_batch_normalisation
from fusedrl.train.optim import Precision
from fusedrl.train.policy_forward import completion_hidden, completion_inputs


def micro_batch_loss(model: torch.nn.Module, batch: TrainingBatch, args: GRPOConfig, precision: Precision,
                     router_aux: RouterAux | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch, already scaled for gradient accumulation (TRL 1.16's rules), and its metrics."""
    num_items_in_batch, divisor = micro_batch_normalisation(
        args.loss_type, generation_tokens=batch.round_tokens or batch.num_active_tokens,
        gradient_accumulation_steps=args.gradient_accumulation_steps, steps_per_generation=args.steps_per_generation)
    aux_loss = None
    with precision.autocast():
        if router_aux is None:
            hidden = completion_hidden(model, batch)
        else:
            input_ids, attention_mask = completion_inputs(batch)
            hidden, aux_loss = forward_hidden_and_router_aux(model, input_ids, attention_mask,
                                                             batch.completion_ids.shape[1], router_aux)
        head = lm_head_of(model)
        options = dataclasses.replace(
            args.loss_options(), logit_softcap=head.logit_softcap, logit_scale=head.logit_scale,
            vllm_importance_sampling_correction=batch.sampling_logp is not None)
        output = grpo_loss_with_options(
            hidden, head.weight, batch.completion_ids, batch.completion_mask, batch.advantages, options,
            lm_head_bias=head.bias, old_logp=batch.old_logp, ref_logp=batch.ref_logp, sampling_logp=batch.sampling_logp,
            num_items_in_batch=num_items_in_batch, return_entropy=True)
    loss = output.loss / divisor
    metrics = {name: float(value) for name, value in output.metrics.items()}
    if aux_loss is not None:
        loss = loss + router_aux.coef * aux_loss.to(loss.dtype) / args.gradient_accumulation_steps
        metrics["aux_loss"] = float(aux_loss.detach())
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def accumulate_gradients(model: torch.nn.Module, micro_batches: Sequence[TrainingBatch], args: GRPOConfig,
                         precision: Precision, router_aux: RouterAux | None = None) -> dict[str, float]:
    """Forward and backward over the micro-batches of one optimizer step; gradients add up in `.grad`.

    Returns the op's metrics averaged over the micro-batches and "loss", the step's total loss.
    """
    per_micro_batch = []
    for batch in micro_batches:
        try:
            loss, metrics = micro_batch_loss(model, batch, args, precision, router_aux)
            precision.backward(loss)
        finally:  # offloaded layer inputs of this micro-batch, even after an exception mid-backward
            reset_after_micro_batch(model)
        per_micro_batch.append(metrics)
    averaged = mean_of_dicts(per_micro_batch)
    averaged["loss"] = sum(metrics["loss"] for metrics in per_micro_batch)
    return averaged


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   precision: Precision, max_grad_norm: float) -> float:
    """Unscale, clip, step optimizer and scheduler, zero gradients; returns the pre-clip gradient norm.

    A float16 step the loss scaler skips (inf/NaN gradients) does not advance the learning-rate schedule either (as
    transformers' Trainer), so a run's schedule is not shortened by overflow steps."""
    scaler = precision.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm > 0 else float("inf")))
    skipped = False
    if scaler is not None:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale_before  # update() lowers the scale exactly when step() skipped
    else:
        optimizer.step()
    if not skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def mean_of_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean over the dicts that have the key."""
    keys = {key for d in dicts for key in d}
    return {key: sum(d[key] for d in dicts if key in d) / sum(1 for d in dicts if key in d) for key in sorted(keys)}
