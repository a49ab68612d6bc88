"""Validation of GRPOConfig's fields: each rule stated once, each error naming the field and what it accepts.

GRPOConfig.__post_init__ calls these in order; the loss and sampling fields are checked by the objects they build
(fusedrl.ops.options.LossOptions, fusedrl.rollout.base.SamplingConfig), not here.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fusedrl.train.config import GRPOConfig

SCALE_REWARDS = ("group", "batch", "none")
OPTIMIZERS = ("adamw_torch", "adamw_8bit")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
DTYPES = ("bfloat16", "float16", "float32")
VLLM_MODES = ("colocate", "server")


def one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
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


def check_counts(config: GRPOConfig) -> None:
    """Counts that must be positive integers (or None where None means "off"/"all")."""
    for name in (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_iterations",
        "max_completion_length",
        "logging_steps",
    ):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    for name in ("max_prompt_length", "num_completions_to_print", "save_total_limit"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}.")
    if not isinstance(config.num_generations, int) or config.num_generations < 2:
        raise ValueError(
            "GRPO needs at least 2 generations per prompt to compute advantages: set num_generations >= 2, "
            f"got {config.num_generations!r}."
        )
    if config.max_steps != -1 and config.max_steps < 1:
        raise ValueError(f"max_steps must be -1 (use num_train_epochs) or >= 1, got {config.max_steps}.")
    if config.max_steps == -1 and not config.num_train_epochs > 0:
        raise ValueError(f"num_train_epochs must be > 0 when max_steps is -1, got {config.num_train_epochs}.")
    if config.save_steps < 0:
        raise ValueError(f"save_steps must be >= 0 (0 disables checkpoints), got {config.save_steps}.")
    if isinstance(config.warmup_steps, bool) or not config.warmup_steps >= 0:
        raise ValueError(f"warmup_steps must be >= 0 (a step count, or a fraction of the total below 1), got "
                         f"{config.warmup_steps!r}.")

def check_vllm(config: GRPOConfig) -> None:
    """The vLLM engine's fields (the engine itself checks them against the loaded model)."""
    one_of("vllm_mode", config.vllm_mode, VLLM_MODES)
    if config.use_vllm and config.vllm_mode == "server":
        raise ValueError(
            "vllm_mode='server' is not supported: fusedrl runs vLLM inside the training process so that it "
            "shares the model's weights; use vllm_mode='colocate' with load_model(..., fast_inference=True)."
        )
    utilization = config.vllm_gpu_memory_utilization
    if utilization is not None and not 0 < utilization <= 1:
        raise ValueError(f"vllm_gpu_memory_utilization must be None or in (0, 1], got {utilization}.")
    length = config.vllm_max_model_length
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
        raise ValueError(f"vllm_max_model_length must be None or an integer >= 1, got {length!r}.")

def check_ranges(config: GRPOConfig) -> None:
    """Optimizer hyper-parameters; also moves a deprecated warmup_ratio into warmup_steps."""
    if not config.learning_rate >= 0:
        raise ValueError(f"learning_rate must be >= 0, got {config.learning_rate}.")
    if not 0 <= config.warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {config.warmup_ratio}.")
    if config.warmup_ratio:
        if config.warmup_steps:
            raise ValueError(f"warmup_ratio ({config.warmup_ratio}) and warmup_steps ({config.warmup_steps}) are both "
                             "set: use warmup_steps alone (a fraction below 1 is a ratio, as in transformers 5).")
        warnings.warn("warmup_ratio is deprecated (transformers 5): use warmup_steps, where a value below 1 is a "
                      f"fraction of the total steps; warmup_steps={config.warmup_ratio} is used.", FutureWarning,
                      stacklevel=4)
        config.warmup_steps, config.warmup_ratio = config.warmup_ratio, 0.0
    if not config.max_grad_norm >= 0:
        raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {config.max_grad_norm}.")
    if config.weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay}.")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(config, name) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(config, name)}.")

def resolve_generation_batch(config: GRPOConfig) -> None:
    """generation_batch_size and steps_per_generation, derived from each other as TRL does for one process."""
    # Single process: TRL's global batch (per_device * num_processes) is per_device_train_batch_size here.
    micro = config.per_device_train_batch_size
    if config.generation_batch_size is not None and config.steps_per_generation is not None:
        raise ValueError(
            "generation_batch_size and steps_per_generation cannot both be set: set one of them and leave the "
            "other None (it is derived)."
        )
    if config.generation_batch_size is None:
        if config.steps_per_generation is None:
            config.steps_per_generation = config.gradient_accumulation_steps
        if config.steps_per_generation < 1:
            raise ValueError(f"steps_per_generation must be >= 1, got {config.steps_per_generation}.")
        config.generation_batch_size = micro * config.steps_per_generation
    else:
        if config.generation_batch_size < 1 or config.generation_batch_size % micro != 0:
            raise ValueError(
                f"generation_batch_size ({config.generation_batch_size}) must be a positive multiple of "
                f"per_device_train_batch_size ({micro})."
            )
        config.steps_per_generation = config.generation_batch_size // micro
    if config.generation_batch_size % config.num_generations != 0:
        raise ValueError(
            f"generation_batch_size ({config.generation_batch_size} = per_device_train_batch_size "
            f"{micro} x steps_per_generation {config.steps_per_generation}) must be divisible by num_generations "
            f"({config.num_generations}) so every rollout holds whole prompt groups: change num_generations, "
            "per_device_train_batch_size, gradient_accumulation_steps or steps_per_generation."
        )


def check_chunking(config: GRPOConfig) -> None:
    """gradient_checkpointing normalised to True / False / "offload" / None, and mlp_chunk_tokens."""
    config.gradient_checkpointing = normalize_checkpointing(config.gradient_checkpointing)
    chunk = config.mlp_chunk_tokens
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0):
        raise ValueError(f"mlp_chunk_tokens must be None (automatic), 0 (off) or a positive int, got {chunk!r}.")


def check_sampler_correction(config: GRPOConfig) -> None:
    """The clip bounds of the sampler importance-sampling correction."""
    clip_min, clip_max = config.vllm_importance_sampling_clip_min, config.vllm_importance_sampling_clip_max
    if clip_min is not None and clip_max is not None and clip_min >= clip_max:
        raise ValueError(
            f"vllm_importance_sampling_clip_min ({clip_min}) must be less than "
            f"vllm_importance_sampling_clip_max ({clip_max})."
        )
    if (
        config.vllm_importance_sampling_correction
        and config.vllm_importance_sampling_mode.endswith("_truncate")
        and clip_min is None
        and clip_max is None
    ):
        raise ValueError(
            "At least one of vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max must be set "
            f"when vllm_importance_sampling_mode is {config.vllm_importance_sampling_mode!r}."
        )
