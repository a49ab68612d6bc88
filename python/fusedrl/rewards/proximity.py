"""Numeric closeness reward: partial credit for answers near the ground truth, a denser signal than exact match.

    prediction p: the number in the completion's <answer> block, or, if that block is missing or not one number,
                  the last number written anywhere in the completion (so it gives signal before the format is learned)
    truth t:      parse_number(answer)
    rel_error   = |p - t| / max(|t|, 1)
    reward      = max_reward * exp(-rel_error / scale)

So an exact answer gets max_reward (1.0 by default), an answer 10% off gets exp(-1) ~ 0.37 of it with the default
scale 0.1, and the reward decays smoothly to 0 (never negative). A completion with no number gets 0.0; a ground truth
that is not a number gets None (this function has no opinion, TRL's convention). Signature is TRL's:
f(prompts, completions, answer=..., **kwargs) -> list[float | None].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from fusedrl.rewards.extract import completion_text, extract_last_number, extract_xml_answer, parse_number

RewardFunction = Callable[..., list[float | None]]


def predicted_number(text: str) -> float | None:
    """The answer a completion commits to: the <answer> block's number, else its last number."""
    if "<answer>" in text:
        value = parse_number(extract_xml_answer(text))
        if value is not None:
            return value
    return extract_last_number(text)


def proximity_score(prediction: float | None, truth: float, scale: float = 0.1, max_reward: float = 1.0) -> float:
    """max_reward * exp(-|prediction - truth| / max(|truth|, 1) / scale); 0.0 when prediction is None."""
    if prediction is None:
        return 0.0
    rel_error = abs(prediction - truth) / max(abs(truth), 1.0)
    return max_reward * math.exp(-rel_error / scale)


def make_proximity_reward(scale: float = 0.1, max_reward: float = 1.0) -> RewardFunction:
    """A proximity reward function with the given decay scale (relative error at which reward falls to 1/e)."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}.")
    if not max_reward > 0:
        raise ValueError(f"max_reward must be > 0, got {max_reward}.")

    def proximity_reward(
        prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str | None] | None = None, **kwargs: Any
    ) -> list[float | None]:
        if answer is None:
            raise ValueError("proximity_reward needs the ground truth as keyword argument `answer` (a dataset column).")
        if len(answer) != len(completions):
            raise ValueError(
                f"`answer` has {len(answer)} entries but there are {len(completions)} completions; they must align."
            )
        rewards: list[float | None] = []
        for completion, truth_text in zip(completions, answer):
            truth = parse_number(None if truth_text is None else str(truth_text))
            if truth is None:
                rewards.append(None)
            else:
                rewards.append(proximity_score(predicted_number(completion_text(completion)), truth, scale, max_reward))
        return rewards

    return proximity_reward


proximity_reward = make_proximity_reward()
