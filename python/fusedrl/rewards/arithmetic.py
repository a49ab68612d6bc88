"""Rewards of the quick demo's task (short arithmetic questions answered with one number).

final_number_reward   1.0 when the last number of the completion is the answer ("7", "3 + 4 = 7", "it is 7."), else
                      0.0; None where the ground truth is None. The quick demo trains on it: SmolLM2-135M never
                      answers with a bare number when sampled (0 of 192 samples at temperature 1), so a reward that
                      pays only bare answers gives GRPO nothing to follow in a few minutes.
number_answer_reward  1.0 when the completion is just the answer ("7", "7.", " 7\n"), 0.5 when the answer is the
                      last number of a longer completion ("3 plus 4 is 7."), 0.0 otherwise; None where the ground
                      truth is None. The 0.5 step rewards being right before being brief, so the untrained model's
                      wordy but correct answers already give GRPO a signal to follow.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from fusedrl.rewards.extract import completion_text

_INTEGER = re.compile(r"-?\d+")


def number_answer_score(text: str, truth: str) -> float:
    """The reward of one completion text against the ground-truth integer string (see module docstring)."""
    expected = str(truth).strip()
    if text.strip().rstrip(".").strip() == expected:
        return 1.0
    return 0.5 * final_number_score(text, expected)


def final_number_score(text: str, truth: str) -> float:
    """1.0 when the last integer in `text` is the ground-truth integer string, else 0.0."""
    numbers = _INTEGER.findall(text.replace(",", ""))
    return 1.0 if numbers and numbers[-1] == str(truth).strip() else 0.0


def final_number_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str | None] | None = None, **kwargs: Any
) -> list[float | None]:
    """1.0 when the completion's last number is the answer, else 0.0 (None: no truth)."""
    return _score_all(final_number_score, "final_number_reward", completions, answer)


def number_answer_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str | None] | None = None, **kwargs: Any
) -> list[float | None]:
    """1.0 for the bare answer, 0.5 for the answer as the last number of more text, else 0.0 (None: no truth)."""
    return _score_all(number_answer_score, "number_answer_reward", completions, answer)


def _score_all(
    score: Callable[[str, str], float], name: str, completions: Sequence[Any], answer: Sequence[str | None] | None
) -> list[float | None]:
    if answer is None:
        raise ValueError(f"{name} needs the ground truth as keyword argument `answer` (a dataset column).")
    if len(answer) != len(completions):
        raise ValueError(f"`answer` has {len(answer)} entries but there are {len(completions)} completions.")
    return [
        None if truth is None else score(completion_text(completion), truth)
        for completion, truth in zip(completions, answer)
    ]
