"""GSM8K reward functions of the popular GRPO tutorial (willccbb's gist, reused by Unsloth's GSM8K notebook).

All take TRL's signature f(prompts, completions, **kwargs) -> list[float | None]; completions are strings or chat
message lists (the last message's content is scored). The ground truth arrives as kwarg `answer`.

correctness_reward   2.0 if the <answer> content equals the ground-truth string exactly (after strip), else 0.0;
                     None where the ground truth is None (no opinion, TRL's convention).
int_reward           0.5 if the <answer> content is a string of digits (str.isdigit, as the tutorial), else 0.0.
strict_format_reward 0.5 if the whole completion is "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n".
soft_format_reward   0.5 if the completion starts with <reasoning>...</reasoning> followed by <answer>...</answer>.
xmlcount_reward      0.125 for each of the four tags written once with the tutorial's newlines, minus 0.001 per
                     character after the closing answer tag. Faithful to the tutorial, including its quirk: a
                     completion ending in "</answer>" with no final newline loses 0.001 per character of the whole
                     text in the "<answer>" term.

Deviation from the tutorial: its format regexes lacked re.DOTALL, so "." never matched the newlines inside a
multi-line reasoning and the format rewards almost never fired; here "." matches newlines.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fusedrl.rewards.extract import completion_text, extract_xml_answer

_STRICT_FORMAT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$", re.DOTALL)
_SOFT_FORMAT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)


def _answers(answer: Sequence[str | None] | None, count: int) -> Sequence[str | None]:
    if answer is None:
        raise ValueError("correctness_reward needs the ground truth as keyword argument `answer` (a dataset column).")
    if len(answer) != count:
        raise ValueError(f"`answer` has {len(answer)} entries but there are {count} completions; they must align.")
    return answer


def correctness_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str | None] | None = None, **kwargs: Any
) -> list[float | None]:
    """2.0 when the extracted <answer> equals the ground truth string, 0.0 otherwise, None without ground truth."""
    truths = _answers(answer, len(completions))
    rewards: list[float | None] = []
    for completion, truth in zip(completions, truths):
        if truth is None:
            rewards.append(None)
        else:
            rewards.append(2.0 if extract_xml_answer(completion_text(completion)) == str(truth).strip() else 0.0)
    return rewards


def int_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """0.5 when the extracted <answer> is made of digits only."""
    return [0.5 if extract_xml_answer(completion_text(c)).isdigit() else 0.0 for c in completions]


def strict_format_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """0.5 when the completion is exactly the tutorial's XML layout, newlines included."""
    return [0.5 if _STRICT_FORMAT.match(completion_text(c)) else 0.0 for c in completions]


def soft_format_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """0.5 when the completion starts with a <reasoning> block followed by an <answer> block."""
    return [0.5 if _SOFT_FORMAT.match(completion_text(c)) else 0.0 for c in completions]


def count_xml(text: str) -> float:
    """The tutorial's tag-count score of one completion (see module docstring)."""
    score = 0.0
    if text.count("<reasoning>\n") == 1:
        score += 0.125
    if text.count("\n</reasoning>\n") == 1:
        score += 0.125
    if text.count("\n<answer>\n") == 1:
        score += 0.125
        score -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        score += 0.125
        score -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return score


def xmlcount_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """Partial credit for each XML tag, penalising text after </answer>."""
    return [count_xml(completion_text(c)) for c in completions]
