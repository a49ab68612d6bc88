"""Reward of the quick demo's task (short arithmetic questions answered with one number).

number_answer_reward  1.0 when the completion is just the answer ("7", "7.", " 7\n"), 0.5 when the answer is the
                      last number of a longer completion ("3 plus 4 is 7."), 0.0 otherwise; None where the ground
                      truth is None. The 0.5 step rewards being right before being brief, so the untrained model's
                      wordy but correct answers already give GRPO a signal to follow.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fusedrl.rewards.extract import completion_text

_INTEGER = re.compile(r"-?\d+")


def number_answer_score(text: str, truth: str) -> float:
    """The reward of one completion text against the ground-truth integer string (see module docstring)."""
    expected = str(truth).strip()
    if text.strip().rstrip(".").strip() == expected:
        return 1.0
    numbers = _INTEGER.findall(text.replace(",", ""))
    return 0.5 if numbers and numbers[-1] == expected else 0.0


def number_answer_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str | None] | None = None, **kwargs: Any
) -> list[float | None]:
    """1.0 for the bare answer, 0.5 for the answer as the last number of more text, else 0.0 (None: no truth)."""
    if answer is None:
        raise ValueError("number_answer_reward needs the ground truth as keyword argument `answer` (a dataset column).")
    if len(answer) != len(completions):
        raise ValueError(f"`answer` has {len(answer)} entries but there are {len(completions)} completions.")
    return [
        None if truth is None else number_answer_score(completion_text(completion), truth)
        for completion, truth in zip(completions, answer)
    ]
