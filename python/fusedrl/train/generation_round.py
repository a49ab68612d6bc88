"""One generation round: prompts -> completions -> rewards -> advantages -> micro-batches with their logps.

  prompts (generation_batch_size / num_generations unique rows, each repeated num_generations times)
  -> chat template + left truncation -> rollout engine -> decode -> reward functions -> weighted sum
  -> group advantages -> (mask truncated completions) -> shuffle -> `steps_per_generation` micro-batches
  -> old logp (only when the policy can move before a micro-batch is used, or for the sampler correction)
     and reference logp (beta > 0).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from fusedrl.rollout import RolloutEngine, RolloutOutput
from fusedrl.train.advantages import aggregate_rewards, compute_advantages, nanstd
from fusedrl.train.batching import (
    PromptSampler,
    TrainingBatch,
    is_conversational,
    pad_sequences,
    repeat_rows,
    tokenize_prompts,
)
from fusedrl.train.config import GRPOConfig
from fusedrl.train.optim import Precision
from fusedrl.train.policy_forward import per_token_logp
from fusedrl.train.scoring import RewardScorer

logger = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What one round hands the trainer: the micro-batches, the round's metrics and its samples for the log."""

    micro_batches: list[TrainingBatch]
    metrics: dict[str, float]
    completions: list[dict[str, Any]]  # prompt, completion, reward, advantage per completion


class GenerationRound:
    """Produces the micro-batches of generation rounds from a prompt dataset (see the module docstring)."""

    def __init__(
        self,
        args: GRPOConfig,
        model: torch.nn.Module,
        ref_model: torch.nn.Module | None,
        tokenizer: transformers.PreTrainedTokenizerBase,
        engine: RolloutEngine,
        scorer: RewardScorer,
        dataset: Any,
        precision: Precision,
        *,
        corrects_sampler_mismatch: bool,
        reference_context: Any = None,
    ) -> None:
        self.args = args
        self.model = model
        self.ref_model = ref_model
        self.tokenizer = tokenizer
        self.engine = engine
        self.scorer = scorer
        self.dataset = dataset
        self.precision = precision
        self.corrects_sampler_mismatch = corrects_sampler_mismatch
        self.reference_context = reference_context
        self._warned_truncation = False
        self.device = next(model.parameters()).device
        self.pad_token_id = _pad_token_id(tokenizer)
        self.sampler = PromptSampler(len(dataset), args.prompts_per_generation, shuffle=args.shuffle_dataset,
                                     seed=args.seed)
        self.sampling = args.sampling_config()

    @property
    def needs_old_logp(self) -> bool:
        """TRL's rule: the policy can move between sampling and use, or the sampler correction needs it."""
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or self.corrects_sampler_mismatch

    def produce(self, round_index: int, *, sampling_generator: torch.Generator | None,
                shuffle_generator: torch.Generator | None, trainer_state: Any) -> RoundResult:
        """Sample, score and split round `round_index` into `steps_per_generation` micro-batches."""
        rows = repeat_rows(self._prompt_rows(round_index), self.args.num_generations)
        prompts = [row["prompt"] for row in rows]
        prompt_ids = self._truncated(tokenize_prompts(self.tokenizer, prompts))
        started = time.perf_counter()
        self.engine.wake()
        try:
            rollout = self.engine.generate(prompt_ids, self.sampling, sampling_generator)
        finally:
            self.engine.sleep()
        generation_seconds = time.perf_counter() - started
        completion_lists = [ids[: int(n)].tolist() for ids, n in zip(rollout.completion_ids, rollout.completion_mask.sum(1))]
        completions = self._decode(prompts, completion_lists)
        rewards_per_func = self.scorer.score(rows, prompts, completions, completion_lists, trainer_state)
        logged_metrics, extra_columns = self.scorer.pop_logged()  # from reward functions' log_metric / log_extra
        rewards = aggregate_rewards(rewards_per_func, self.scorer.weights)
        advantages, reward_stats = compute_advantages(rewards, self.args.num_generations, self.args.scale_rewards)

        batch = self._training_batch(prompt_ids, rollout, advantages)
        batch = batch.replace(round_tokens=float(batch.completion_mask.sum()))
        micro_batches = self.split_micro_batches(batch.shuffled(shuffle_generator), self.args.steps_per_generation)
        micro_batches = [self._with_reference_logps(micro_batch) for micro_batch in micro_batches]
        samples = [
            {"prompt": prompt, "completion": completion, "reward": float(reward), "advantage": float(advantage)}
            for prompt, completion, reward, advantage in zip(prompts, completions, rewards, advantages)
        ]
        for column, values in extra_columns.items():
            if len(values) != len(samples):
                raise ValueError(f"log_extra({column!r}, ...) received {len(values)} values for {len(samples)} "
                                 "completions; log one value per completion")
            for sample, value in zip(samples, values):
                sample[column] = value
        metrics = self._metrics(rollout, rewards_per_func, reward_stats, micro_batches, generation_seconds)
        metrics.update(logged_metrics)
        return RoundResult(micro_batches, metrics, samples)

    def _truncated(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """Left truncation to max_prompt_length (None: none, TRL 1.16's behaviour); the first time it cuts a prompt,
        a warning says how many prompts of that round it cut."""
        limit = self.args.max_prompt_length
        if limit is None:
            return prompt_ids
        cut = sum(len(ids) > limit for ids in prompt_ids)
        if cut and not self._warned_truncation:
            self._warned_truncation = True
            logger.warning("max_prompt_length=%d: %d of the %d prompts of this round were longer and lost their first "
                           "tokens (left truncation). Shown once; set max_prompt_length=None to keep whole prompts.",
                           limit, cut, len(prompt_ids))
        return [ids[-limit:] for ids in prompt_ids]

    def split_micro_batches(self, batch: TrainingBatch, count: int) -> list[TrainingBatch]:
        """`count` equal micro-batches trimmed of padding columns (no loss type depends on the padded width)."""
        return batch.split(count)

    def _prompt_rows(self, round_index: int) -> list[dict[str, Any]]:
        epoch, position = divmod(round_index, self.sampler.rounds_per_epoch)
        indices = self.sampler.epoch_rounds(epoch)[position]
        return [dict(self.dataset[int(index)]) for index in indices]

    def _decode(self, prompts: list[Any], completion_lists: list[list[int]]) -> list[Any]:
        texts = self.tokenizer.batch_decode(completion_lists, skip_special_tokens=True)
        if is_conversational(prompts[0]):
            return [[{"role": "assistant", "content": text}] for text in texts]
        return texts

    def _training_batch(self, prompt_ids: list[list[int]], rollout: RolloutOutput, advantages: torch.Tensor) -> TrainingBatch:
        prompt_tensor, prompt_mask = pad_sequences(prompt_ids, self.pad_token_id, side="left", device=self.device)
        completion_mask = rollout.completion_mask.to(self.device)
        if self.args.mask_truncated_completions:
            completion_mask = completion_mask * (~rollout.truncated.to(self.device)).unsqueeze(1).long()
        return TrainingBatch(
            prompt_ids=prompt_tensor,
            prompt_mask=prompt_mask,
            completion_ids=rollout.completion_ids.to(self.device),
            completion_mask=completion_mask,
            advantages=advantages.to(self.device),
            sampling_logp=rollout.sampling_logp.to(self.device) if self.corrects_sampler_mismatch else None,
        )

    def _with_reference_logps(self, batch: TrainingBatch) -> TrainingBatch:
        temperature = self.args.temperature
        old_logp = per_token_logp(self.model, batch, self.precision, temperature) if self.needs_old_logp else None
        ref_logp = None
        if self.args.beta > 0:
            if self.ref_model is not None:
                ref_logp = per_token_logp(self.ref_model, batch, self.precision, temperature)
            else:  # a peft model: adapters disabled, or the starting adapter (model/reference_adapter.py)
                with self.reference_context():
                    ref_logp = per_token_logp(self.model, batch, self.precision, temperature)
        return batch.replace(old_logp=old_logp, ref_logp=ref_logp)

    def _metrics(self, rollout: RolloutOutput, rewards_per_func: torch.Tensor, reward_stats: dict[str, float],
                 micro_batches: list[TrainingBatch], generation_seconds: float) -> dict[str, float]:
        lengths = rollout.completion_mask.sum(1).float()
        metrics = {
            "reward": reward_stats["reward_mean"],
            "reward_std": reward_stats["reward_std"],
            "frac_reward_zero_std": reward_stats["frac_reward_zero_std"],
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(rollout.truncated.float().mean()),
            "generation_seconds": generation_seconds,
            "throughput/generation_tokens_per_s": float(lengths.sum()) / max(generation_seconds, 1e-9),
        }
        for index, name in enumerate(self.scorer.names):
            column = rewards_per_func[:, index]
            metrics[f"rewards/{name}/mean"] = float(torch.nan_to_num(torch.nanmean(column), nan=0.0))
            metrics[f"rewards/{name}/std"] = float(torch.nan_to_num(nanstd(column), nan=0.0))
        # TRL: over the active tokens the sampler could score (a NaN sampler logp is left out, not counted as 0)
        gaps = [_scored_gaps(batch) for batch in micro_batches
                if batch.old_logp is not None and batch.sampling_logp is not None]
        if gaps and sum(gap.numel() for gap in gaps) > 0:
            all_gaps = torch.cat(gaps)
            metrics["sampling/sampling_logp_difference/mean"] = float(all_gaps.mean())
            metrics["sampling/sampling_logp_difference/max"] = float(all_gaps.max())
        return metrics


def _scored_gaps(batch: TrainingBatch) -> torch.Tensor:
    gap = (batch.old_logp - batch.sampling_logp).abs()
    return gap[batch.completion_mask.bool() & ~torch.isnan(gap)]


def _pad_token_id(tokenizer: transformers.PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("processing_class has neither a pad_token_id nor an eos_token_id; set tokenizer.pad_token")
    return int(pad)
