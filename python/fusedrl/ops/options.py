"""Validated options of the GRPO-family loss, with TRL's GRPOConfig names and meanings."""

from __future__ import annotations

from dataclasses import dataclass

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
# Loss types that clip the importance ratio PPO-style (and report clip ratios).
PPO_CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SAMPLER_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# Normalisation groups: a micro-batch's loss is normalised within the micro-batch (a trainer accumulating k
# micro-batches divides each by k), or by `num_items_in_batch`, the active tokens of the whole optimizer step.
PER_MICRO_BATCH_LOSSES = ("grpo", "bnpo", "dr_grpo", "sapo", "luspo")
PER_STEP_TOKEN_LOSSES = ("dapo", "cispo")


@dataclass(frozen=True)
class LossOptions:
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    temperature: float = 1.0
    max_completion_length: int | None = None
    vllm_importance_sampling_correction: bool = False
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_min: float | None = None
    vllm_importance_sampling_clip_max: float | None = 3.0
    logit_softcap: float | None = None
    logit_scale: float = 1.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05

    def __post_init__(self) -> None:
        _one_of("loss_type", self.loss_type, LOSS_TYPES)
        _one_of("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _one_of("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, SAMPLER_CORRECTION_MODES)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        if self.epsilon_high is not None and not self.epsilon_high >= 0:
            raise ValueError(f"epsilon_high must be >= 0 or None, got {self.epsilon_high}")
        if self.delta is not None and not self.delta > 0:
            raise ValueError(f"delta must be > 0 or None (TRL recommends > 1 + epsilon_high), got {self.delta}")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1 or None, got {self.max_completion_length}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"logit_softcap must be > 0 or None, got {self.logit_softcap}")
        if not (self.logit_scale > 0 and self.logit_scale < float("inf")):
            raise ValueError(f"logit_scale must be a finite number > 0, got {self.logit_scale}")
        if self.sapo_temperature_pos <= 0 or self.sapo_temperature_neg <= 0:
            raise ValueError("sapo_temperature_pos and sapo_temperature_neg must be > 0, got "
                             f"{self.sapo_temperature_pos} and {self.sapo_temperature_neg}")

    @property
    def head_temperature(self) -> float:
        """The temperature the lm-head op applies: logit_scale folded in (z = softcap(s * raw) / T)."""
        return self.temperature / self.logit_scale

    @property
    def head_softcap(self) -> float | None:
        """The softcap the lm-head op applies to raw logits, logit_scale folded in:
        c tanh(s x / c) = s c' tanh(x / c') with c' = c / s."""
        return None if self.logit_softcap is None else self.logit_softcap / self.logit_scale

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_upper(self) -> float:
        """epsilon_high, defaulting to epsilon as in TRL."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
