"""GRPOTrainer: the GRPO training loop (TRL's GRPOTrainer semantics on fusedrl's rollout engines and fused loss).

One optimizer step:
  1. take `gradient_accumulation_steps` micro-batches from the generation buffer; a generation round is sampled
     when the buffer says one is due (TRL: every `steps_per_generation * num_iterations` micro-batches):
       prompts (generation_batch_size / num_generations unique rows, each repeated num_generations times)
       -> chat template + left truncation -> rollout engine -> decode -> reward functions -> weighted sum
       -> group advantages -> (mask truncated completions) -> shuffle -> `steps_per_generation` micro-batches
       -> old logp (only when the policy can move before a micro-batch is used, or for the sampler correction)
          and reference logp (beta > 0);
  2. per micro-batch: backbone hidden states of the completion positions (`forward_hidden`, never logits)
     -> `fusedrl.ops.grpo_loss` with the lm-head -> backward;
  3. clip gradients, optimizer and scheduler step (dynamic loss scaling for float16), record metrics.

Loss normalisation under gradient accumulation: grpo, bnpo, dr_grpo, sapo and luspo losses are divided by
`gradient_accumulation_steps`; dapo and cispo get `num_items_in_batch` = active completion tokens of all the
micro-batches of the optimizer step. Accumulating k micro-batches then gives exactly the gradient of one batch
k times as large for dapo, cispo, grpo, sapo, dr_grpo and luspo (all micro-batches have the same number of
completions); for bnpo only when every micro-batch has the same number of active tokens, since bnpo normalises by
each micro-batch's own token count (as in TRL).

Metrics: `trainer.state.history` holds one dict per optimizer step. Reward and completion metrics appear on the
steps that sampled a generation round (every step with the default steps_per_generation = gradient_accumulation_steps
and num_iterations = 1), as in TRL. Callbacks are plain objects; any of `on_train_begin(trainer)`,
`on_log(metrics)`, `on_step_end(trainer)` and `on_train_end(trainer)` they define is called.
"""

from __future__ import annotations

import copy
import functools
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from fusedrl.model.hidden import forward_hidden, lm_head_of
from fusedrl.ops import grpo_loss, selective_logp
from fusedrl.rollout import BuiltinEngine, RolloutEngine, RolloutOutput, SamplingConfig
from fusedrl.train.advantages import aggregate_rewards, compute_advantages, nanstd
from fusedrl.train.batching import (
    PromptSampler,
    TrainingBatch,
    is_conversational,
    pad_sequences,
    repeat_rows,
    tokenize_prompts,
)
from fusedrl.train.buffer import GenerationBuffer
from fusedrl.train.checkpointing import prepare_checkpointing, reset_after_micro_batch
from fusedrl.train.config import GRPOConfig
from fusedrl.train.optim import (
    Precision,
    create_optimizer,
    create_precision,
    create_scheduler,
)

RewardFunc = Callable[..., Sequence[float | None]]

# Loss types normalised per micro-batch (the trainer divides by gradient_accumulation_steps) versus by the active
# token count of the whole optimizer step (passed to the op as num_items_in_batch).
PER_MICRO_BATCH_LOSSES = ("grpo", "bnpo", "dr_grpo", "sapo", "luspo")
PER_TOKEN_LOSSES = ("dapo", "cispo")


@dataclass
class TrainerState:
    """Progress of a run. `micro_step` counts micro-batches (TRL's `_step`); `history` one metrics dict per step."""

    global_step: int = 0
    micro_step: int = 0
    rounds_generated: int = 0
    epoch: float = 0.0
    max_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def reward_func_name(func: RewardFunc) -> str:
    """The name used in metrics ("rewards/<name>/mean"): __name__, a partial's function name, or the class name."""
    if isinstance(func, functools.partial):
        return reward_func_name(func.func)
    return getattr(func, "__name__", None) or type(func).__name__


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory since the last reset, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


class GRPOTrainer:
    """Trains `model` with GRPO-family losses on the prompts of `train_dataset`.

    model: a transformers causal LM or a peft model around one (e.g. from `fusedrl.load_model`).
    reward_funcs: one callable or a list, TRL signature f(prompts, completions, completion_ids, **columns)
        -> list[float | None] (None = cannot score; every other dataset column is passed as a keyword list).
    args: GRPOConfig. train_dataset: rows with a "prompt" (chat messages or a string) and any other columns
        (a datasets.Dataset or a sequence of dicts). processing_class: the tokenizer (with a chat template for chat
        prompts). rollout_engine: defaults to BuiltinEngine(model, processing_class).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        reward_funcs: RewardFunc | Sequence[RewardFunc],
        args: GRPOConfig,
        train_dataset: Any,
        processing_class: transformers.PreTrainedTokenizerBase,
        rollout_engine: RolloutEngine | None = None,
        callbacks: Sequence[Any] | None = None,
    ) -> None:
        if not isinstance(args, GRPOConfig):
            raise TypeError(f"args must be a fusedrl.GRPOConfig, got {type(args).__name__}")
        self.args = args
        self.model = model
        self.tokenizer = processing_class
        self.reward_funcs, self.reward_func_names, self.reward_weights = self._check_reward_funcs(reward_funcs)
        self.train_dataset = self._check_dataset(train_dataset)
        self.engine: RolloutEngine = rollout_engine if rollout_engine is not None else BuiltinEngine(model, processing_class)
        # TRL corrects the sampler mismatch only when vLLM samples; likewise only engines whose sampler differs.
        self.corrects_sampler_mismatch = args.vllm_importance_sampling_correction and getattr(
            self.engine, "sampler_differs_from_trainer", True)
        self.callbacks = list(callbacks or [])
        self.device = next(model.parameters()).device
        self.pad_token_id = self._pad_token_id()

        self._prepare_model()
        self.ref_model = self._reference_model() if args.beta > 0 else None
        self.precision: Precision = create_precision(args, model)
        self.sampler = PromptSampler(
            len(self.train_dataset), args.prompts_per_generation, shuffle=args.shuffle_dataset, seed=args.seed
        )
        self.sampling = SamplingConfig(
            max_new_tokens=args.max_completion_length,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
        )
        self.state = TrainerState(max_steps=self._total_optimizer_steps())
        self.optimizer = create_optimizer(model, args)
        self.scheduler = create_scheduler(self.optimizer, args, self.state.max_steps)
        self.buffer: GenerationBuffer[TrainingBatch] = GenerationBuffer(
            self._generate_round, steps_per_generation=args.steps_per_generation, num_iterations=args.num_iterations
        )
        self.last_completions: list[dict[str, Any]] = []  # prompts, completions and rewards of the latest round
        self._round_metrics: list[dict[str, float]] = []
        self._sampling_generator: torch.Generator | None = None
        self._shuffle_generator: torch.Generator | None = None

    # ------------------------------------------------------------------------------------------------------------
    # set-up checks
    # ------------------------------------------------------------------------------------------------------------
    def _check_reward_funcs(
        self, reward_funcs: RewardFunc | Sequence[RewardFunc]
    ) -> tuple[list[RewardFunc], list[str], torch.Tensor]:
        funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
        if not funcs:
            raise ValueError("reward_funcs must hold at least one reward function")
        for index, func in enumerate(funcs):
            if not callable(func):
                raise TypeError(f"reward_funcs[{index}] must be callable, got {type(func).__name__}")
        weights = self.args.reward_weights
        if weights is None:
            weights = [1.0] * len(funcs)
        if len(weights) != len(funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} entries but {len(funcs)} reward functions were given; "
                "give one weight per reward function (or reward_weights=None for all 1.0)"
            )
        return funcs, [reward_func_name(func) for func in funcs], torch.tensor(weights, dtype=torch.float32)

    @staticmethod
    def _check_dataset(train_dataset: Any) -> Any:
        if train_dataset is None or not hasattr(train_dataset, "__getitem__") or not hasattr(train_dataset, "__len__"):
            raise TypeError("train_dataset must be a datasets.Dataset or a sequence of dict rows")
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty")
        first = train_dataset[0]
        if not isinstance(first, dict) or "prompt" not in first:
            raise ValueError(f"train_dataset rows must be dicts with a 'prompt' column, got {first!r:.120}")
        return train_dataset

    def _pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None:
            raise ValueError("processing_class has neither a pad_token_id nor an eos_token_id")
        return int(pad)

    def _prepare_model(self) -> None:
        """Dropout off if asked; checkpointing (plain / offloaded, MLP chunks) as the config and memory plan say."""
        if self.args.disable_dropout:
            for module in self.model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        self.memory_plan = None
        if callable(getattr(self.model, "gradient_checkpointing_enable", None)):
            self.memory_plan = prepare_checkpointing(self.model, self.args)

    def _reference_model(self) -> torch.nn.Module | None:
        """The frozen reference for the KL term: None for a peft model (its adapters are disabled instead)."""
        if hasattr(self.model, "disable_adapter"):
            return None
        reference = copy.deepcopy(self.model).eval()
        reference.requires_grad_(False)
        return reference

    def _total_optimizer_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        micro_steps_per_epoch = self.sampler.rounds_per_epoch * self.args.steps_per_generation * self.args.num_iterations
        steps_per_epoch = micro_steps_per_epoch / self.args.gradient_accumulation_steps
        return max(1, math.ceil(self.args.num_train_epochs * steps_per_epoch))

    # ------------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------------
    def train(self) -> TrainerState:
        """Run optimizer steps until `state.max_steps`; returns the state (history holds every step's metrics)."""
        self._seed_everything()
        self.model.train()
        self._notify("on_train_begin", self)
        while self.state.global_step < self.state.max_steps:
            metrics = self.training_step()
            self.state.global_step += 1
            metrics["step"] = float(self.state.global_step)
            metrics["epoch"] = self.state.epoch
            self.state.history.append(metrics)
            self._notify("on_log", metrics)
            self._notify("on_step_end", self)
        self._notify("on_train_end", self)
        return self.state

    def training_step(self) -> dict[str, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns its metrics."""
        started = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._round_metrics = []
        micro_batches = [self._next_micro_batch() for _ in range(self.args.gradient_accumulation_steps)]
        generation_seconds = sum(m["generation_seconds"] for m in self._round_metrics)
        loss_metrics = self.accumulate_gradients(micro_batches)
        learning_rate = self.scheduler.get_last_lr()[0]
        grad_norm = self._optimizer_step()
        training_seconds = time.perf_counter() - started - generation_seconds
        training_tokens = sum(batch.prompt_mask.sum().item() + batch.completion_mask.sum().item() for batch in micro_batches)
        return {
            **loss_metrics,
            **_mean_of_dicts(self._round_metrics),
            "learning_rate": float(learning_rate),
            "grad_norm": grad_norm,
            "step_seconds": time.perf_counter() - started,
            "throughput/training_tokens_per_s": training_tokens / max(training_seconds, 1e-9),
            "memory/peak_gb": peak_memory_gb(self.device),
        }

    def _next_micro_batch(self) -> TrainingBatch:
        batch = self.buffer.next()
        self.state.micro_step = self.buffer.micro_step
        self.state.rounds_generated = self.buffer.rounds_generated
        micro_steps_per_epoch = self.sampler.rounds_per_epoch * self.args.steps_per_generation * self.args.num_iterations
        self.state.epoch = self.state.micro_step / micro_steps_per_epoch
        return batch

    def rng_generators(self) -> dict[str, torch.Generator]:
        """The trainer's own generators (sampling, shuffling), for checkpoints; empty until train() seeds them."""
        named = {"sampling": self._sampling_generator, "shuffle": self._shuffle_generator}
        return {name: generator for name, generator in named.items() if generator is not None}

    def _seed_everything(self) -> None:
        transformers.set_seed(self.args.seed)  # python, numpy and torch (all devices)
        self._sampling_generator = torch.Generator(self.device).manual_seed(self.args.seed)
        self._shuffle_generator = torch.Generator().manual_seed(self.args.seed)

    def _notify(self, event: str, payload: Any) -> None:
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if callable(handler):
                handler(payload)

    # ------------------------------------------------------------------------------------------------------------
    # generation round
    # ------------------------------------------------------------------------------------------------------------
    def _generate_round(self) -> list[TrainingBatch]:
        """Sample, score and split one generation batch into `steps_per_generation` micro-batches."""
        rows = repeat_rows(self._next_prompt_rows(), self.args.num_generations)
        prompts = [row["prompt"] for row in rows]
        prompt_ids = tokenize_prompts(self.tokenizer, prompts, max_prompt_length=self.args.max_prompt_length)
        rollout, generation_seconds = self._generate(prompt_ids)
        completion_lists = [
            ids[: int(length)].tolist() for ids, length in zip(rollout.completion_ids, rollout.completion_mask.sum(1))
        ]
        completions = self._decode(prompts, completion_lists)
        rewards_per_func = self._score(rows, prompts, completions, completion_lists)
        rewards = aggregate_rewards(rewards_per_func, self.reward_weights)
        advantages, reward_stats = compute_advantages(rewards, self.args.num_generations, self.args.scale_rewards)

        batch = self._training_batch(prompt_ids, rollout, advantages)
        micro_batches = self.split_micro_batches(batch.shuffled(self._shuffle_generator), self.args.steps_per_generation)
        micro_batches = [self._with_reference_logps(micro_batch) for micro_batch in micro_batches]

        self.last_completions = [
            {"prompt": prompt, "completion": completion, "reward": float(reward), "advantage": float(advantage)}
            for prompt, completion, reward, advantage in zip(prompts, completions, rewards, advantages)
        ]
        self._round_metrics.append(
            self._round_metrics_of(rollout, rewards_per_func, reward_stats, micro_batches, generation_seconds)
        )
        return micro_batches

    def split_micro_batches(self, batch: TrainingBatch, count: int) -> list[TrainingBatch]:
        """`count` equal micro-batches trimmed of padding columns. luspo with a per-token loss (token level, or
        beta > 0) keeps the completion width: its loss averages over every column (TRL: the generation batch's)."""
        per_token = self.args.importance_sampling_level == "token" or self.args.beta > 0
        keep_width = self.args.loss_type == "luspo" and per_token
        return batch.split(count, trim_completions=not keep_width)

    def _next_prompt_rows(self) -> list[dict[str, Any]]:
        round_index = self.buffer.rounds_generated
        epoch, position = divmod(round_index, self.sampler.rounds_per_epoch)
        indices = self.sampler.epoch_rounds(epoch)[position]
        return [dict(self.train_dataset[int(index)]) for index in indices]

    def _generate(self, prompt_ids: list[list[int]]) -> tuple[RolloutOutput, float]:
        started = time.perf_counter()
        self.engine.wake()
        try:
            rollout = self.engine.generate(prompt_ids, self.sampling, self._sampling_generator)
        finally:
            self.engine.sleep()
        return rollout, time.perf_counter() - started

    def _decode(self, prompts: list[Any], completion_lists: list[list[int]]) -> list[Any]:
        texts = self.tokenizer.batch_decode(completion_lists, skip_special_tokens=True)
        if is_conversational(prompts[0]):
            return [[{"role": "assistant", "content": text}] for text in texts]
        return texts

    def _score(
        self, rows: list[dict[str, Any]], prompts: list[Any], completions: list[Any], completion_ids: list[list[int]]
    ) -> torch.Tensor:
        """(N, F) float32 rewards, NaN where a function returned None."""
        columns = {key: [row[key] for row in rows] for key in rows[0] if key not in ("prompt", "completion")}
        rewards = torch.full((len(rows), len(self.reward_funcs)), float("nan"), dtype=torch.float32)
        for index, (func, name) in enumerate(zip(self.reward_funcs, self.reward_func_names)):
            values = func(
                prompts=prompts, completions=completions, completion_ids=completion_ids, trainer_state=self.state, **columns
            )
            values = list(values)
            if len(values) != len(rows):
                raise ValueError(f"reward function {name!r} returned {len(values)} rewards for {len(rows)} completions")
            rewards[:, index] = torch.tensor([float("nan") if v is None else float(v) for v in values])
        return rewards

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

    @property
    def needs_old_logp(self) -> bool:
        """TRL's rule: the policy can move between sampling and use, or the sampler correction needs it."""
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or self.corrects_sampler_mismatch

    def _with_reference_logps(self, batch: TrainingBatch) -> TrainingBatch:
        old_logp = self._per_token_logp(self.model, batch) if self.needs_old_logp else None
        ref_logp = None
        if self.args.beta > 0:
            if self.ref_model is not None:
                ref_logp = self._per_token_logp(self.ref_model, batch)
            else:
                with self.model.disable_adapter():
                    ref_logp = self._per_token_logp(self.model, batch)
        return batch.replace(old_logp=old_logp, ref_logp=ref_logp)

    @torch.no_grad()
    def _per_token_logp(self, model: torch.nn.Module, batch: TrainingBatch) -> torch.Tensor:
        """(B, T) fp32 logp of the completion tokens under `model`, no graph kept."""
        with self.precision.autocast():
            hidden = self._completion_hidden(model, batch)
            head = lm_head_of(model)
            logp, _ = selective_logp(
                hidden,
                head.weight,
                batch.completion_ids,
                lm_head_bias=head.bias,
                temperature=self.args.temperature,
                logit_softcap=head.logit_softcap,
            )
        return logp.float()

    @staticmethod
    def _completion_hidden(model: torch.nn.Module, batch: TrainingBatch) -> torch.Tensor:
        input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
        attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
        return forward_hidden(model, input_ids, attention_mask, logits_to_keep=batch.completion_ids.shape[1])

    def _round_metrics_of(
        self,
        rollout: RolloutOutput,
        rewards_per_func: torch.Tensor,
        reward_stats: dict[str, float],
        micro_batches: list[TrainingBatch],
        generation_seconds: float,
    ) -> dict[str, float]:
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
        for index, name in enumerate(self.reward_func_names):
            column = rewards_per_func[:, index]
            metrics[f"rewards/{name}/mean"] = float(torch.nan_to_num(torch.nanmean(column), nan=0.0))
            metrics[f"rewards/{name}/std"] = float(torch.nan_to_num(nanstd(column), nan=0.0))
        sampler_gaps = [
            (batch.old_logp - batch.sampling_logp).abs()[batch.completion_mask.bool()]
            for batch in micro_batches
            if batch.old_logp is not None and batch.sampling_logp is not None
        ]
        if sampler_gaps and sum(gap.numel() for gap in sampler_gaps) > 0:
            gaps = torch.cat(sampler_gaps)
            metrics["sampling/sampling_logp_difference/mean"] = float(gaps.mean())
            metrics["sampling/sampling_logp_difference/max"] = float(gaps.max())
        return metrics

    # ------------------------------------------------------------------------------------------------------------
    # loss, backward, optimizer step
    # ------------------------------------------------------------------------------------------------------------
    def micro_batch_loss(self, batch: TrainingBatch, num_items_in_batch: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch, already scaled for gradient accumulation, and the op's metrics."""
        args = self.args
        with self.precision.autocast():
            hidden = self._completion_hidden(self.model, batch)
            head = lm_head_of(self.model)
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
                num_items_in_batch=num_items_in_batch if args.loss_type in PER_TOKEN_LOSSES else None,
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

    def accumulate_gradients(self, micro_batches: Sequence[TrainingBatch]) -> dict[str, float]:
        """Forward and backward over the micro-batches of one optimizer step; gradients add up in `.grad`.

        Returns the op's metrics averaged over the micro-batches and "loss", the step's total loss.
        """
        num_items_in_batch = sum(batch.num_active_tokens for batch in micro_batches)
        per_micro_batch = []
        for batch in micro_batches:
            try:
                loss, metrics = self.micro_batch_loss(batch, num_items_in_batch)
                if self.precision.scaler is not None:
                    self.precision.scaler.scale(loss).backward()
                else:
                    loss.backward()
            finally:  # offloaded layer inputs of this micro-batch, even after an exception mid-backward
                reset_after_micro_batch(self.model)
            per_micro_batch.append(metrics)
        averaged = _mean_of_dicts(per_micro_batch)
        averaged["loss"] = sum(metrics["loss"] for metrics in per_micro_batch)
        return averaged

    def _optimizer_step(self) -> float:
        """Unscale, clip, step optimizer and scheduler, zero gradients; returns the pre-clip gradient norm."""
        scaler = self.precision.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm


def _mean_of_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean over the dicts that have the key."""
    keys = {key for d in dicts for key in d}
    return {key: sum(d[key] for d in dicts if key in d) / sum(1 for d in dicts if key in d) for key in sorted(keys)}
