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
from fusedrl.train.config_checks import (
    DTYPES,
    LR_SCHEDULERS,
    OPTIMIZERS,
    SCALE_REWARDS,
    check_chunking,
    check_counts,
    check_ranges,
    check_sampler_correction,
    check_vllm,
    one_of,
    resolve_generation_batch,
)

if TYPE_CHECKING:
    import torch

    from fusedrl.ops.options import LossOptions
    from fusedrl.rollout.base import SamplingConfig

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
        one_of("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        one_of("optim", self.optim, OPTIMIZERS)
        one_of("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        one_of("dtype", self.dtype, DTYPES)
        check_chunking(self)
        check_counts(self)
        check_ranges(self)
        check_vllm(self)
        resolve_generation_batch(self)
        check_sampler_correction(self)

        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.reward_weights is not None:
            self.reward_weights = [float(w) for w in self.reward_weights]
        # The loss and sampling settings are validated by the objects the op and the engine receive.
        self.loss_options()
        self.sampling_config()
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            warnings.warn(
                "loss_type='luspo' is meant to be used with importance_sampling_level='sequence' (the paper's setup).",
                stacklevel=3,
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
