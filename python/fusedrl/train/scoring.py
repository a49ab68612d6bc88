"""Reward functions: their names, their weights, and scoring one generation round with them.

A reward function has TRL's signature f(prompts, completions, completion_ids, **columns) -> list[float | None]:
one value per completion, None where it cannot score (every other dataset column is passed as a keyword list,
plus `trainer_state`). The round's reward is the weighted sum of the functions' rewards (advantages.py).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

RewardFunc = Callable[..., Sequence[float | None]]


def reward_func_name(func: RewardFunc) -> str:
    """The name used in metrics ("rewards/<name>/mean"): __name__, a partial's function name, or the class name."""
    if isinstance(func, functools.partial):
        return reward_func_name(func.func)
    return getattr(func, "__name__", None) or type(func).__name__


class RewardScorer:
    """The reward functions of a run with their names and weights (validated once, at construction)."""

    def __init__(self, reward_funcs: RewardFunc | Sequence[RewardFunc], reward_weights: Sequence[float] | None) -> None:
        funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
        if not funcs:
            raise ValueError("reward_funcs must hold at least one reward function")
        for index, func in enumerate(funcs):
            if not callable(func):
                raise TypeError(f"reward_funcs[{index}] must be callable, got {type(func).__name__}")
        weights = [1.0] * len(funcs) if reward_weights is None else list(reward_weights)
        if len(weights) != len(funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries but {len(funcs)} reward functions were "
                             "given; give one weight per reward function (or reward_weights=None for all 1.0)")
        self.funcs = funcs
        self.names = [reward_func_name(func) for func in funcs]
        self.weights = torch.tensor(weights, dtype=torch.float32)

    def score(self, rows: list[dict[str, Any]], prompts: list[Any], completions: list[Any],
              completion_ids: list[list[int]], trainer_state: Any) -> torch.Tensor:
        """(N, F) float32 rewards, NaN where a function returned None.

        Raises ValueError when a function returns another number of values than completions, TypeError when a value
        is neither a real number nor None.
        """
        columns = {key: [row[key] for row in rows] for key in rows[0] if key not in ("prompt", "completion")}
        rewards = torch.full((len(rows), len(self.funcs)), float("nan"), dtype=torch.float32)
        for index, (func, name) in enumerate(zip(self.funcs, self.names)):
            values = list(func(prompts=prompts, completions=completions, completion_ids=completion_ids,
                               trainer_state=trainer_state, **columns))
            if len(values) != len(rows):
                raise ValueError(f"reward function {name!r} returned {len(values)} rewards; expected one per "
                                 f"completion ({len(rows)})")
            rewards[:, index] = torch.tensor([_reward_value(name, position, value)
                                              for position, value in enumerate(values)])
        return rewards


def _reward_value(name: str, position: int, value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"reward function {name!r} returned {value!r:.60} at position {position}; expected a "
                        "float (or None when it cannot score)")
    return float(value)
