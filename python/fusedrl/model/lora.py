"""LoRA adapter settings for fusedrl models and their conversion to a `peft.LoraConfig`.

`LoraConfig` keeps the handful of knobs a GRPO run needs (rank, alpha, target modules, dropout, bias) and turns
them into the peft config used to attach adapters to a causal LM. The lm-head and the embeddings are never
targeted: "all-linear" in peft already leaves the output layer out, and explicit lists naming them are refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import peft

from fusedrl.config_fields import check_known_fields

# Module names that must stay frozen: the fused loss reads the lm-head weight as a frozen matrix.
_FROZEN_MODULE_NAMES = frozenset({"lm_head", "embed_tokens", "embed_out", "wte", "word_embeddings"})


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter settings (immutable; a list of target modules is stored as a tuple).

    r: adapter rank (> 0). lora_alpha: scaling numerator, the adapter output is scaled by lora_alpha / r.
    target_modules: "all-linear" (every linear layer except the output layer) or a list of module names such as
    ["q_proj", "k_proj", "v_proj", "o_proj"]. lora_dropout: dropout on the adapter input, in [0, 1).
    bias: which biases train, "none" | "all" | "lora_only" (peft's meaning).
    """

    r: int = 16
    lora_alpha: int | float = 32
    target_modules: str | tuple[str, ...] | list[str] = "all-linear"
    lora_dropout: float = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be a float in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                raise ValueError(
                    "LoraConfig.target_modules must be 'all-linear' or a list of module names, "
                    f"got the string {self.target_modules!r}"
                )
        else:
            names = list(self.target_modules)
            if not names or not all(isinstance(name, str) and name for name in names):
                raise ValueError(
                    f"LoraConfig.target_modules must be a non-empty list of module names, got {self.target_modules!r}"
                )
            frozen = sorted(set(names) & _FROZEN_MODULE_NAMES)
            if frozen:
                raise ValueError(
                    f"LoraConfig.target_modules must not name the lm-head or embeddings (got {frozen}): "
                    "fusedrl keeps them frozen"
                )
            object.__setattr__(self, "target_modules", tuple(names))  # frozen: stored as a tuple

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoraConfig:
        """A LoraConfig from a dict (e.g. a TOML [lora] table); unknown keys raise ValueError naming close matches."""
        check_known_fields("LoraConfig", values, (f.name for f in dataclasses.fields(cls)))
        return cls(**values)

    def to_peft(self) -> peft.LoraConfig:
        """The equivalent `peft.LoraConfig` for a causal LM."""
        return peft.LoraConfig(
            task_type=peft.TaskType.CAUSAL_LM,
            r=self.r,
            lora_alpha=self.lora_alpha,
            target_modules=self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules),
            lora_dropout=float(self.lora_dropout),
            bias=self.bias,
        )
