"""GRPOTrainer: the GRPO training loop (TRL's GRPOTrainer semantics on fusedrl's rollout engines and fused loss).

One optimizer step:
  1. take `gradient_accumulation_steps` micro-batches from the generation buffer; a generation round
     (generation_round.py: sample, score, advantages, split, old/reference logp) runs when the buffer says one is
     due (TRL: every `steps_per_generation * num_iterations` micro-batches);
  2. per micro-batch: backbone hidden states of the completion positions (never logits) -> `fusedrl.ops.grpo_loss`
     with the lm-head -> backward (loss_step.py, which also explains the normalisation under accumulation);
  3. clip gradients, optimizer and scheduler step (dynamic loss scaling for float16), record metrics.

Metrics: `trainer.state.history` holds one dict per optimizer step. Reward and completion metrics appear on the
steps that sampled a generation round (every step with the default steps_per_generation = gradient_accumulation_steps
and num_iterations = 1), as in TRL. Callbacks are plain objects; any of `on_train_begin(trainer)`,
`on_log(metrics)`, `on_step_end(trainer)` and `on_train_end(trainer)` they define is called.

The run's state (progress, optimizer, scheduler, loss scaler, RNGs, the half-used generation round) is
`state_dict()` / `load_state_dict()`; the model's weights are the model's own (checkpoint.py saves both).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from fusedrl.model.hidden import check_lm_head_reproduces_logits
from fusedrl.model.moe import router_aux_of
from fusedrl.model.reference_adapter import reference_context
from fusedrl.rollout import RolloutEngine, WeightSyncingEngine
from fusedrl.rollout.selection import select_engine
from fusedrl.train import loss_step
from fusedrl.train.batching import TrainingBatch
from fusedrl.train.buffer import GenerationBuffer
from fusedrl.train.checkpointing import prepare_checkpointing
from fusedrl.train.config import GRPOConfig
from fusedrl.train.generation_round import GenerationRound
from fusedrl.train.optim import Precision, create_optimizer, create_precision, create_scheduler
from fusedrl.train.policy_forward import per_token_logp
from fusedrl.train.rng import capture_rng_state, restore_rng_state
from fusedrl.train.scoring import RewardFunc, RewardScorer, check_dataset_columns


@dataclass
class TrainerState:
    """Progress of a run. `micro_step` counts micro-batches (TRL's `_step`); `history` one metrics dict per step."""

    global_step: int = 0
    micro_step: int = 0
    rounds_generated: int = 0
    epoch: float = 0.0
    max_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory since the last reset, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


class GRPOTrainer:
    """Trains `model` with GRPO-family losses on the prompts of `train_dataset`.

    model: a transformers causal LM or a peft model around one (e.g. from `fusedrl.load_model`).
    reward_funcs: one or a list of: a callable (sync or `async def`) with TRL's signature f(prompts, completions,
        completion_ids, **columns) -> list[float | None] (None = cannot score; every other dataset column is passed as
        a keyword list, plus trainer_state, log_metric and log_extra), a sequence-classification reward model, or a
        model id / path to load one from (see scoring.py). reward_processing_classes: the reward models' tokenizers.
    args: GRPOConfig. train_dataset: rows with a "prompt" (chat messages or a string) and any other columns
        (a datasets.Dataset or a sequence of dicts). processing_class: the tokenizer (with a chat template for chat
        prompts). rollout_engine: defaults to BuiltinEngine(model, processing_class).
    callbacks: added to the default ones, which write what `args` asks (checkpoints every save_steps into
        output_dir, metrics.jsonl and the console table every logging_steps, completions when log_completions);
        a CheckpointCallback or MetricsLogger passed here replaces the default one of its kind.
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
        reward_processing_classes: Any = None,
    ) -> None:
        if not isinstance(args, GRPOConfig):
            raise TypeError(f"args must be a fusedrl.GRPOConfig, got {type(args).__name__}")
        self.args = args
        self.model = model
        self.tokenizer = processing_class
        self.device = next(model.parameters()).device
        check_lm_head_reproduces_logits(model)  # refuses unknown logit transforms and adapters on the lm-head
        self.router_aux = router_aux_of(model, args.router_aux_loss_coef)
        self.scorer = RewardScorer(reward_funcs, args.reward_weights, reward_processing_classes, device=self.device)
        self.train_dataset = _check_dataset(train_dataset, processing_class)
        check_dataset_columns(list(self.train_dataset[0]))
        self.engine: RolloutEngine = select_engine(args, model, processing_class, rollout_engine)
        # TRL corrects the sampler mismatch only when vLLM samples; likewise only engines whose sampler differs.
        self.corrects_sampler_mismatch = args.vllm_importance_sampling_correction and getattr(
            self.engine, "sampler_differs_from_trainer", True)
        self.user_callbacks = list(callbacks or [])
        self.callbacks: list[Any] = []  # the defaults plus user_callbacks, assembled when train() starts

        self._prepare_model()
        self.ref_model = self._reference_model() if args.beta > 0 else None
        peft_reference = reference_context(model) if args.beta > 0 and self.ref_model is None else None
        self.precision: Precision = create_precision(args, model)
        self.loss_options = args.loss_options()
        self.rounds = GenerationRound(args, model, self.ref_model, processing_class, self.engine, self.scorer,
                                      self.train_dataset, self.precision,
                                      corrects_sampler_mismatch=self.corrects_sampler_mismatch,
                                      reference_context=peft_reference)
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
    # set-up
    # ------------------------------------------------------------------------------------------------------------
    def _prepare_model(self) -> None:
        """Dropout off if asked; checkpointing (plain / offloaded, MLP chunks) as the config and the memory plan say
        (fusedrl.train.checkpointing: printed on CUDA, MemoryError here when the step cannot fit)."""
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

    @property
    def _micro_steps_per_epoch(self) -> int:
        return self.rounds.sampler.rounds_per_epoch * self.args.steps_per_generation * self.args.num_iterations

    def _total_optimizer_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        steps_per_epoch = self._micro_steps_per_epoch / self.args.gradient_accumulation_steps
        return max(1, math.ceil(self.args.num_train_epochs * steps_per_epoch))

    # ------------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------------
    def train(self) -> TrainerState:
        """Run optimizer steps until `state.max_steps`; returns the state (history holds every step's metrics).

        A fresh trainer seeds every RNG from args.seed first; one restored with load_state_dict keeps its RNGs.
        """
        if self._sampling_generator is None:
            self._seed_everything()
        self.callbacks = self._assemble_callbacks()
        self.model.train()
        if isinstance(self.engine, WeightSyncingEngine):  # e.g. adapter weights restored from a checkpoint
            self.engine.sync_weights()
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
        grad_norm = loss_step.optimizer_step(self.optimizer, self.scheduler, self.precision, self.args.max_grad_norm)
        handoff = {}
        if isinstance(self.engine, WeightSyncingEngine):  # vLLM: the new LoRA weights into its slot
            handoff["vllm/handoff_ms"] = self.engine.sync_weights() * 1e3
        training_seconds = time.perf_counter() - started - generation_seconds
        training_tokens = sum(batch.prompt_mask.sum().item() + batch.completion_mask.sum().item() for batch in micro_batches)
        return {
            **loss_metrics,
            **loss_step.mean_of_dicts(self._round_metrics),
            **handoff,
            "learning_rate": float(learning_rate),
            "grad_norm": grad_norm,
            "step_seconds": time.perf_counter() - started,
            "throughput/training_tokens_per_s": training_tokens / max(training_seconds, 1e-9),
            "memory/peak_gb": peak_memory_gb(self.device),
        }

    def micro_batch_loss(self, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch, already scaled for gradient accumulation, and the op's metrics."""
        return loss_step.micro_batch_loss(self.model, batch, self.args, self.precision, self.router_aux)

    def accumulate_gradients(self, micro_batches: Sequence[TrainingBatch]) -> dict[str, float]:
        """Forward and backward over the micro-batches of one optimizer step (see loss_step.accumulate_gradients)."""
        return loss_step.accumulate_gradients(self.model, micro_batches, self.args, self.precision, self.router_aux)

    def per_token_logp(self, model: torch.nn.Module, batch: TrainingBatch) -> torch.Tensor:
        """(B, T) float32 logp of the completion tokens under `model` at the run's temperature, no graph kept."""
        return per_token_logp(model, batch, self.precision, self.args.temperature)

    @property
    def needs_old_logp(self) -> bool:
        return self.rounds.needs_old_logp

    def _next_micro_batch(self) -> TrainingBatch:
        batch = self.buffer.next()
        self.state.micro_step = self.buffer.micro_step
        self.state.rounds_generated = self.buffer.rounds_generated
        self.state.epoch = self.state.micro_step / self._micro_steps_per_epoch
        return batch

    def _generate_round(self) -> list[TrainingBatch]:
        result = self.rounds.produce(self.buffer.rounds_generated, sampling_generator=self._sampling_generator,
                                     shuffle_generator=self._shuffle_generator, trainer_state=self.state)
        self.last_completions = result.completions
        self._round_metrics.append(result.metrics)
        return result.micro_batches

    def _generators(self) -> dict[str, torch.Generator]:
        """The trainer's own generators (sampling, shuffling); none before train() or load_state_dict seeds them."""
        named = {"sampling": self._sampling_generator, "shuffle": self._shuffle_generator}
        return {name: generator for name, generator in named.items() if generator is not None}

    def _seed_everything(self) -> None:
        transformers.set_seed(self.args.seed)  # python, numpy and torch (all devices)
        self._sampling_generator = torch.Generator(self.device).manual_seed(self.args.seed)
        self._shuffle_generator = torch.Generator().manual_seed(self.args.seed)

    def _assemble_callbacks(self) -> list[Any]:
        """Default callbacks (what args asks to be written) not replaced by a user's one of the same kind, then the
        user's. The defaults are made afresh for every train() call: the previous call's logger closed its files."""
        from fusedrl.train.callbacks import default_callbacks

        kinds = tuple(type(callback) for callback in self.user_callbacks)
        defaults = [callback for callback in default_callbacks(self.args) if not isinstance(callback, kinds)]
        return defaults + self.user_callbacks

    def add_callback(self, callback: Any) -> None:
        """Call `callback`'s on_train_begin / on_log / on_step_end / on_train_end (those it defines) from the next
        train() call on."""
        self.user_callbacks.append(callback)

    def _notify(self, event: str, payload: Any) -> None:
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if callable(handler):
                handler(payload)

    # ------------------------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------------------------
    def model_signature(self) -> dict[str, Any]:
        """What a checkpoint must match to be loaded into this trainer's model (architecture and trainable shapes)."""
        config = getattr(_unwrapped(self.model), "config", None)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        signature: dict[str, Any] = {"trainable_parameters": int(trainable)}
        for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
            signature[key] = getattr(config, key, None)
        signature["name_or_path"] = str(getattr(config, "_name_or_path", "") or "")
        return signature

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run bit for bit except the model's weights.

        "progress" and "model" are JSON-serialisable; the rest holds tensors and plain containers.
        """
        buffer = self.buffer.state_dict()
        if buffer["stored_round"] is not None:
            buffer["stored_round"] = [dataclasses.asdict(batch) for batch in buffer["stored_round"]]
        return {
            "progress": dataclasses.asdict(self.state),
            "model": self.model_signature(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None,
            "rng": capture_rng_state(self._generators()),
            "buffer": buffer,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run `state` (from state_dict) describes; the current max_steps is kept (it may be raised).

        Raises ValueError when the state belongs to another model, KeyError when an entry is missing; nothing is
        changed then.
        """
        saved, current = state["model"], self.model_signature()
        differing = {key: (saved.get(key), value) for key, value in current.items()
                     if key != "name_or_path" and saved.get(key) != value}
        if differing:
            details = ", ".join(f"{key} {old} vs {new}" for key, (old, new) in differing.items())
            raise ValueError(f"the checkpoint was saved for another model ({saved.get('name_or_path') or 'unnamed'}: "
                             f"{details} in this run); resume with the model it was trained from")
        progress = dict(state["progress"])
        progress.pop("max_steps", None)
        buffer = dict(state["buffer"])
        if buffer["stored_round"] is not None:
            buffer["stored_round"] = [TrainingBatch(**batch) for batch in buffer["stored_round"]]
        if self._sampling_generator is None:
            self._seed_everything()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state["scaler"] is not None:
            self.precision.scaler.load_state_dict(state["scaler"])
        saved_generators = state["rng"].get("generators", {})
        restore_rng_state(state["rng"], {name: generator for name, generator in self._generators().items()
                                         if name in saved_generators})  # a state taken before train() has none
        self.buffer.load_state_dict(buffer)
        for key, value in progress.items():
            setattr(self.state, key, value)


def _check_dataset(train_dataset: Any, tokenizer: Any) -> Any:
    """The dataset, checked: indexable, non-empty, dict rows with a "prompt"; chat prompts need a chat template."""
    if train_dataset is None or not hasattr(train_dataset, "__getitem__") or not hasattr(train_dataset, "__len__"):
        raise TypeError("train_dataset must be a datasets.Dataset or a sequence of dict rows")
    if len(train_dataset) == 0:
        raise ValueError("train_dataset is empty; expected at least one row with a 'prompt'")
    first = train_dataset[0]
    if not isinstance(first, dict) or "prompt" not in first:
        columns = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise ValueError(f"train_dataset rows must have a 'prompt' column (text or chat messages); got {columns}")
    if isinstance(first["prompt"], list) and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("processing_class has no chat_template but the prompts are chat messages; use a tokenizer "
                         "with a chat template (an -Instruct model) or plain-text prompts")
    return train_dataset


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model
