"""GRPOConfig: every knob of a fusedrl GRPO run, with TRL's field names, meanings and defaults.

Fields shared with TRL's ``GRPOConfig`` (and the ``transformers.TrainingArguments`` fields it inherits) keep TRL's
name, meaning and default, including TRL's overrides of the TrainingArguments defaults (``learning_rate=1e-6``,
``logging_steps=10``, ``gradient_checkpointing=True``, bf16 by default). Fields that are ours are marked "(fusedrl)"
in the attribute list below. Derived values (``steps_per_generation``, ``generation_batch_size``, ``epsilon_high``)
are resolved in ``__post_init__`` the way TRL resolves them for a single process, and invalid combinations raise
``ValueError`` at construction with a message naming the field and what to change.

``to_dict`` / ``from_dict`` round-trip the config through plain dicts (the CLI's TOML files use the same names).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fusedrl.config_fields import check_field_types, check_known_fields

if TYPE_CHECKING:
    import torch

    from fusedrl.ops.options import LossOptions
    from fusedrl.rollout.base import SamplingConfig

SCALE_REWARDS = ("group", "batch", "none")
OPTIMIZERS = ("adamw_torch", "adamw_8bit")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
DTYPES = ("bfloat16", "float16", "float32")
VLLM_MODES = ("colocate", "server")


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}.")


OFFLOAD_ALIASES = ("offload", "unsloth")


def normalize_checkpointing(value: Any) -> bool | str | None:
    """The config value as True, False, "offload" or None; ValueError for anything else."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in OFFLOAD_ALIASES:
        return "offload"
    raise ValueError(f"gradient_checkpointing must be True, False, 'offload' (alias 'unsloth') or None (automatic), "
                     f"got {value!r}")


@dataclass
class GRPOConfig:
    """Configuration of a GRPO-family training run.

    Optimisation (TRL / TrainingArguments names and defaults):
        learning_rate: initial learning rate of the optimizer (TRL default 1e-6).
        per_device_train_batch_size: completions per micro-batch (forward/backward pass).
        gradient_accumulation_steps: micro-batches accumulated per optimizer step.
        max_steps: total optimizer steps; -1 means "derive from num_train_epochs".
        num_train_epochs: passes over the prompt dataset when max_steps is -1.
        optim: (fusedrl subset of TrainingArguments' optim) "adamw_torch" (torch.optim.AdamW) or "adamw_8bit"
            (bitsandbytes AdamW8bit, GPU only). TRL's default "adamw_torch_fused" is not accepted: use "adamw_torch".
        lr_scheduler_type: "linear", "cosine", "constant" or "constant_with_warmup", passed to
            ``transformers.get_scheduler``.
        warmup_steps: linear warmup length, as in transformers 5: an int (or float >= 1) is a number of steps, a
            float in (0, 1) a fraction of the total steps (rounded up).
        warmup_ratio: transformers 4's name for a warmup fraction, deprecated in transformers 5: accepted with a
            FutureWarning and moved to warmup_steps (setting both is an error).
        weight_decay, adam_beta1, adam_beta2, adam_epsilon: AdamW hyper-parameters.
        max_grad_norm: gradient clipping norm; 0 disables clipping.
        seed: random seed set at the start of training (sampling, shuffling, LoRA init).

    Generation:
        num_generations: completions sampled per prompt (group size G); must be >= 2.
        generation_batch_size: completions generated in one rollout; defaults to
            per_device_train_batch_size * steps_per_generation. Mutually exclusive with steps_per_generation.
        steps_per_generation: micro-batches trained on per rollout; defaults to gradient_accumulation_steps.
        num_iterations: optimisation passes over each generated batch (mu in the GRPO paper).
        max_prompt_length: (TRL <= 0.24 field, removed later) None (the default, as TRL 1.16 never truncates)
            keeps whole prompts; an int truncates longer prompts from the left, logged once with the count.
        max_completion_length: maximum number of generated tokens per completion.
        temperature, top_p, top_k (0 = off), min_p (None = off), repetition_penalty: sampling parameters.
        use_vllm: sample rollouts with the vLLM engine of a model loaded by
            `fusedrl.load_model(..., fast_inference=True)` (it shares the model's weights; LoRA reaches it after
            every optimizer step). vllm_mode: "colocate" (vLLM in the training process); TRL's "server" is not
            supported. vllm_gpu_memory_utilization, vllm_max_model_length: must match what the model was loaded
            with (load_model's gpu_memory_utilization, max_seq_length) when set; None accepts the model's.
            vllm_enable_sleep_mode: release vLLM's KV cache while training (CUDA; a no-op on CPU).

    Loss (see fusedrl.ops.grpo_loss, same names):
        beta: KL coefficient (k3 estimator to the reference model); 0 means no reference model is used.
        use_bias_correction_kl: weight each token's k3 KL by its importance ratio (TRL 1.16's default True).
        router_aux_loss_coef: weight of a Mixture-of-Experts model's router load-balancing loss; None takes the
            model config's own (0.0 where it declares none), as TRL.
        epsilon, epsilon_high (defaults to epsilon), delta (two-sided clipping bound, None = off): clipping.
        loss_type: one of "grpo", "bnpo", "dr_grpo", "dapo" (default), "cispo", "sapo", "luspo". TRL's "vespo" is
            not supported yet.
        importance_sampling_level: "token" or "sequence" (GSPO).
        sapo_temperature_pos, sapo_temperature_neg: SAPO gate temperatures.
        mask_truncated_completions: exclude completions without EOS from the loss.
        vllm_importance_sampling_correction, vllm_importance_sampling_mode, vllm_importance_sampling_clip_min,
            vllm_importance_sampling_clip_max: correction for the mismatch between the rollout engine's logprobs and
            the trainer's (applied whatever engine produced the rollout).

    Rewards:
        scale_rewards: "group" (default, divide by the group's std), "batch" (by the batch std) or "none";
            True/False are accepted and mapped to "group"/"none" like TRL.
        reward_weights: one weight per reward function (None = all 1.0). Its length is checked by the trainer,
            which is the first to know how many reward functions there are.

    Precision and memory:
        dtype: (fusedrl; replaces TrainingArguments' bf16/fp16 flags) "bfloat16" (default, like TRL's bf16=True),
            "float16" (the trainer then applies dynamic loss scaling) or "float32".
        gradient_checkpointing: recompute activations in backward (TRL default True). (fusedrl) Also "offload"
            (alias "unsloth"): each decoder layer's input goes to pinned host memory and comes back one layer ahead
            in backward; None (default): chosen from the memory plan before the first step (plain checkpointing
            when it fits, else offload), see fusedrl.train.checkpointing.
        mlp_chunk_tokens: (fusedrl) tokens per chunk of the decoder MLP during recompute and backward; None = from
            the memory plan, 0 = never chunk.
        disable_dropout: set every dropout probability in the model to 0.

    Data, logging and checkpoints:
        shuffle_dataset: shuffle the prompt dataset.
        logging_steps: optimizer steps between two log lines (TRL default 10).
        log_completions: print a sample of (prompt, completion, rewards) every logging_steps.
        num_completions_to_print: how many completions log_completions prints (None = all).
        save_steps: optimizer steps between checkpoints; (fusedrl) 0 disables intermediate checkpoints.
        save_total_limit: keep at most this many checkpoints (None = keep all).
        output_dir: where checkpoints and logs go (TrainingArguments' default "trainer_output").
    """

    # Optimisation
    learning_rate: float = 1e-6
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 3.0
    optim: str = "adamw_torch"
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: float = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42

    # Generation
    num_generations: int = 8
    generation_batch_size: int | None = None
    steps_per_generation: int | None = None
    num_iterations: int = 1
    max_prompt_length: int | None = None
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    vllm_gpu_memory_utilization: float | None = None
    vllm_enable_sleep_mode: bool = False
    vllm_max_model_length: int | None = None

    # Loss
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    router_aux_loss_coef: float | None = None
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    mask_truncated_completions: bool = False
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_min: float | None = None
    vllm_importance_sampling_clip_max: float | None = 3.0

    # Rewards
    scale_rewards: str = "group"
    reward_weights: list[float] | None = None

    # Precision and memory
    dtype: str = "bfloat16"
    gradient_checkpointing: bool | str | None = None
    mlp_chunk_tokens: int | None = None
    disable_dropout: bool = False

    # Data, logging and checkpoints
    shuffle_dataset: bool = True
    logging_steps: int = 10
    log_completions: bool = False
    num_completions_to_print: int | None = None
    save_steps: int = 500
    save_total_limit: int | None = None
    output_dir: str = "trainer_output"

    def __new__(cls, *args: Any, **kwargs: Any) -> GRPOConfig:
        # Before the dataclass __init__ sees them: a TRL field fusedrl does not implement is named with advice
        # (trl_fields.py) rather than a bare "unexpected keyword argument".
        from fusedrl.train.trl_fields import not_supported_error

        error = not_supported_error([name for name in kwargs if name not in cls.__dataclass_fields__])
        if error is not None:
            raise error
        return super().__new__(cls)

    def __post_init__(self) -> None:
        # Same bool mapping as TRL.
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"

        check_field_types(self)
        _one_of("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _one_of("optim", self.optim, OPTIMIZERS)
        _one_of("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        _one_of("dtype", self.dtype, DTYPES)

        self.gradient_checkpointing = normalize_checkpointing(self.gradient_checkpointing)
        chunk = self.mlp_chunk_tokens
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0):
            raise ValueError(f"mlp_chunk_tokens must be None (automatic), 0 (off) or a positive int, got {chunk!r}.")
        self._check_positive_ints()
        self._check_ranges()
        self._check_vllm()
        self._resolve_generation_batch()

        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.reward_weights is not None:
            self.reward_weights = [float(w) for w in self.reward_weights]

        clip_min, clip_max = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if clip_min is not None and clip_max is not None and clip_min >= clip_max:
            raise ValueError(
                f"vllm_importance_sampling_clip_min ({clip_min}) must be less than "
                f"vllm_importance_sampling_clip_max ({clip_max})."
            )
        if (
            self.vllm_importance_sampling_correction
            and self.vllm_importance_sampling_mode.endswith("_truncate")
            and clip_min is None
            and clip_max is None
        ):
            raise ValueError(
                "At least one of vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max must be set "
                f"when vllm_importance_sampling_mode is {self.vllm_importance_sampling_mode!r}."
            )
        # The loss and sampling settings are validated by the objects the op and the engine receive.
        self.loss_options()
        self.sampling_config()
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            warnings.warn(
                "loss_type='luspo' is meant to be used with importance_sampling_level='sequence' (the paper's setup).",
                stacklevel=3,
            )

    def _check_positive_ints(self) -> None:
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "num_iterations",
            "max_completion_length",
            "logging_steps",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        for name in ("max_prompt_length", "num_completions_to_print", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}.")
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ValueError(
                "GRPO needs at least 2 generations per prompt to compute advantages: set num_generations >= 2, "
                f"got {self.num_generations!r}."
            )
        if self.max_steps != -1 and self.max_steps < 1:
            raise ValueError(f"max_steps must be -1 (use num_train_epochs) or >= 1, got {self.max_steps}.")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs must be > 0 when max_steps is -1, got {self.num_train_epochs}.")
        if self.save_steps < 0:
            raise ValueError(f"save_steps must be >= 0 (0 disables checkpoints), got {self.save_steps}.")
        if isinstance(self.warmup_steps, bool) or not self.warmup_steps >= 0:
            raise ValueError(f"warmup_steps must be >= 0 (a step count, or a fraction of the total below 1), got "
                             f"{self.warmup_steps!r}.")

    def _check_vllm(self) -> None:
        _one_of("vllm_mode", self.vllm_mode, VLLM_MODES)
        if self.use_vllm and self.vllm_mode == "server":
            raise ValueError(
                "vllm_mode='server' is not supported: fusedrl runs vLLM inside the training process so that it "
                "shares the model's weights; use vllm_mode='colocate' with load_model(..., fast_inference=True)."
            )
        utilization = self.vllm_gpu_memory_utilization
        if utilization is not None and not 0 < utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be None or in (0, 1], got {utilization}.")
        length = self.vllm_max_model_length
        if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
            raise ValueError(f"vllm_max_model_length must be None or an integer >= 1, got {length!r}.")

    def _check_ranges(self) -> None:
        if not self.learning_rate >= 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.warmup_ratio:
            if self.warmup_steps:
                raise ValueError(f"warmup_ratio ({self.warmup_ratio}) and warmup_steps ({self.warmup_steps}) are both "
                                 "set: use warmup_steps alone (a fraction below 1 is a ratio, as in transformers 5).")
            warnings.warn("warmup_ratio is deprecated (transformers 5): use warmup_steps, where a value below 1 is a "
                          f"fraction of the total steps; warmup_steps={self.warmup_ratio} is used.", FutureWarning,
                          stacklevel=4)
            self.warmup_steps, self.warmup_ratio = self.warmup_ratio, 0.0
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")

    def _resolve_generation_batch(self) -> None:
        # Single process: TRL's global batch (per_device * num_processes) is per_device_train_batch_size here.
        micro = self.per_device_train_batch_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                "generation_batch_size and steps_per_generation cannot both be set: set one of them and leave the "
                "other None (it is derived)."
            )
        if self.generation_batch_size is None:
            if self.steps_per_generation is None:
                self.steps_per_generation = self.gradient_accumulation_steps
            if self.steps_per_generation < 1:
                raise ValueError(f"steps_per_generation must be >= 1, got {self.steps_per_generation}.")
            self.generation_batch_size = micro * self.steps_per_generation
        else:
            if self.generation_batch_size < 1 or self.generation_batch_size % micro != 0:
                raise ValueError(
                    f"generation_batch_size ({self.generation_batch_size}) must be a positive multiple of "
                    f"per_device_train_batch_size ({micro})."
                )
            self.steps_per_generation = self.generation_batch_size // micro
        if self.generation_batch_size % self.num_generations != 0:
            raise ValueError(
                f"generation_batch_size ({self.generation_batch_size} = per_device_train_batch_size "
                f"{micro} x steps_per_generation {self.steps_per_generation}) must be divisible by num_generations "
                f"({self.num_generations}) so every rollout holds whole prompt groups: change num_generations, "
                "per_device_train_batch_size, gradient_accumulation_steps or steps_per_generation."
            )

    # ------------------------------------------------------------------------------------------------------------
    @property
    def prompts_per_generation(self) -> int:
        """Distinct prompts in one rollout (generation_batch_size / num_generations)."""
        assert self.generation_batch_size is not None
        return self.generation_batch_size // self.num_generations

    def loss_options(self) -> LossOptions:
        """The fused loss op's options of this run (the trainer adds the model's logit_softcap and, per batch,
        whether sampler logps are there to correct with)."""
        from fusedrl.ops.options import LossOptions

        return LossOptions(
            loss_type=self.loss_type, importance_sampling_level=self.importance_sampling_level, epsilon=self.epsilon,
            epsilon_high=self.epsilon_high, delta=self.delta, beta=self.beta,
            use_bias_correction_kl=self.use_bias_correction_kl, temperature=self.temperature,
            max_completion_length=self.max_completion_length,
            vllm_importance_sampling_correction=self.vllm_importance_sampling_correction,
            vllm_importance_sampling_mode=self.vllm_importance_sampling_mode,
            vllm_importance_sampling_clip_min=self.vllm_importance_sampling_clip_min,
            vllm_importance_sampling_clip_max=self.vllm_importance_sampling_clip_max,
            sapo_temperature_pos=self.sapo_temperature_pos, sapo_temperature_neg=self.sapo_temperature_neg)

    def sampling_config(self) -> SamplingConfig:
        """The rollout engine's sampling settings of this run."""
        from fusedrl.rollout.base import SamplingConfig

        return SamplingConfig(max_new_tokens=self.max_completion_length, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by `dtype`."""
        import torch

        return getattr(torch, self.dtype)

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Warmup steps for a run of num_training_steps, as transformers 5: int(warmup_steps) when >= 1, else
        ceil(warmup_steps * total)."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil(num_training_steps * self.warmup_steps)

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain Python values (derived fields included); from_dict(to_dict()) gives an equal config."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: list(value) if isinstance(value, list) else value for name, value in values.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GRPOConfig:
        """Build a config from a dict (e.g. a TOML table); unknown keys raise ValueError naming close matches."""
        from fusedrl.train.trl_fields import not_supported_error

        known = {f.name for f in dataclasses.fields(cls)}
        error = not_supported_error([key for key in values if key not in known])
        if error is not None:
            raise error
        check_known_fields("GRPOConfig", values, (f.name for f in dataclasses.fields(cls)))
        values = dict(values)
        # A dict produced by to_dict() carries both derived batch fields; TRL allows only one as input, so drop the
        # derived one when it is consistent with the other.
        gbs, spg = values.get("generation_batch_size"), values.get("steps_per_generation")
        micro = values.get("per_device_train_batch_size", cls.per_device_train_batch_size)
        if gbs is not None and spg is not None and gbs == micro * spg:
            values["generation_batch_size"] = None
        return cls(**values)
