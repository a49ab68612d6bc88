"""The rollout-engine interface: sampling settings, the batch of completions an engine returns, the protocol.

Every engine (built-in transformers generation, vLLM) takes token-id prompts and returns right-padded completion
ids (N, Tc), a completion mask (N, Tc) that is 1 for generated tokens up to and including the first EOS, the
sampler's per-token log-probabilities log_softmax(logits / temperature) of the chosen tokens (N, Tc) in float32
(0 at padding), and a truncation flag (N,) for completions that hit max_new_tokens without an EOS.
The trainer only talks to this interface, so it never knows which engine it has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled.

    max_new_tokens: completion length limit (> 0). temperature: logits are divided by it (> 0); it also defines
    sampling_logp. top_p: nucleus mass in (0, 1] (1 = off). top_k: keep the k most likely tokens (0 = off).
    min_p: drop tokens below min_p * max probability, in [0, 1] (None = off). repetition_penalty: > 0 (1 = off).
    greedy: argmax decoding instead of sampling (top_p, top_k and min_p are then unused).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens <= 0
        ):
            raise ValueError(f"SamplingConfig.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not _is_finite_number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"SamplingConfig.temperature must be a finite number > 0, got {self.temperature!r}")
        if not _is_finite_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if self.min_p is not None and (not _is_finite_number(self.min_p) or not 0 <= self.min_p <= 1):
            raise ValueError(f"SamplingConfig.min_p must be None or in [0, 1], got {self.min_p!r}")
        if not _is_finite_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(
                f"SamplingConfig.repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}"
            )
        if not isinstance(self.greedy, bool):
            raise TypeError(f"SamplingConfig.greedy must be a bool, got {self.greedy!r}")


def check_generate_arguments(
    prompt_ids: list[list[int]], sampling: SamplingConfig, generator: torch.Generator | None, vocab_size: int
) -> None:
    """The argument checks every engine's generate() shares: a SamplingConfig, a torch.Generator or None, and a
    non-empty list of non-empty prompts of token ids in [0, vocab_size)."""
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(prompt_ids, (list, tuple)) or len(prompt_ids) == 0:
        raise ValueError("prompt_ids must be a non-empty list of token-id lists")
    for row, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt_ids[{row}] is empty: every prompt needs at least one token")
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt):
            raise ValueError(f"prompt_ids[{row}] must hold ints in [0, {vocab_size}), got {list(prompt)[:8]}...")


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class RolloutOutput:
    """Completions for N prompts, right-padded to the longest completion Tc.

    completion_ids: (N, Tc) long, padded with the pad id. completion_mask: (N, Tc) long, 1 for generated tokens up
    to and including the first EOS. sampling_logp: (N, Tc) float32, the sampler's log_softmax(logits / temperature)
    at the chosen token, 0 at padding. truncated: (N,) bool, True when no EOS came within max_new_tokens.
    """

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sampling_logp: torch.Tensor
    truncated: torch.Tensor

    def __post_init__(self) -> None:
        if self.completion_ids.dim() != 2:
            raise ValueError(f"completion_ids must be (N, Tc), got shape {tuple(self.completion_ids.shape)}")
        shape = self.completion_ids.shape
        for name in ("completion_mask", "sampling_logp"):
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"{name} must have completion_ids' shape {tuple(shape)}, got {tuple(getattr(self, name).shape)}"
                )
        if self.truncated.shape != shape[:1]:
            raise ValueError(f"truncated must be ({shape[0]},), got shape {tuple(self.truncated.shape)}")


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a generation backend."""

    # True when the sampler computes its logprobs with other kernels or weights than the trainer (vLLM), so that
    # the trainer's vllm_importance_sampling_correction has a mismatch to correct; False for an engine that samples
    # from the training model itself.
    sampler_differs_from_trainer: bool

    def generate(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        generator: torch.Generator | None = None,
    ) -> RolloutOutput:
        """Complete each prompt (token ids, no padding) once; `generator` makes sampling reproducible."""
        ...

    def sleep(self) -> None:
        """Release generation-only memory (KV cache) while the trainer runs."""
        ...

    def wake(self) -> None:
        """Get ready to generate again after `sleep`."""
        ...


@runtime_checkable
class WeightSyncingEngine(Protocol):
    """An engine that keeps its own copy of what the optimizer changes (vLLM's LoRA slots): the trainer calls
    `sync_weights` after every optimizer step; it returns the seconds the handoff took."""

    def sync_weights(self) -> float:
        ...
