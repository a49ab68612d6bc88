"""Answer extraction helpers shared by the reward functions and the dataset preparation.

extract_xml_answer: text between the last "<answer>" and the following "</answer>" (the GSM8K GRPO tutorial's rule;
    text without tags comes back whole, stripped).
extract_hash_answer: the GSM8K ground truth after "#### " (None when absent).
parse_number: "1,234", "$12", "42." and " -3.5 " -> float; None when the text is not one number.
extract_last_number: the last number appearing anywhere in a text, parsed with parse_number.
completion_text: a TRL completion (string, or list of chat messages) -> its text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NUMBER_IN_TEXT = re.compile(r"[+-]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def extract_xml_answer(text: str) -> str:
    """Content of the last <answer>...</answer> block, stripped (the whole text, stripped, if there is no tag)."""
    answer = text.split("<answer>")[-1]
    answer = answer.split("</answer>")[0]
    return answer.strip()


def extract_hash_answer(text: str) -> str | None:
    """GSM8K ground truth: the text after "####", stripped; None if the marker is missing."""
    if "####" not in text:
        return None
    return text.split("####")[-1].strip()


def parse_number(text: str | None) -> float | None:
    """One number from a short answer string, or None.

    Normalises thousands separators (","), currency ("$"), surrounding whitespace and one trailing period; a single
    trailing "%" is dropped too. Returns None for anything that is not a single finite number (e.g. "12 apples").
    """
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    if cleaned.endswith("."):
        cleaned = cleaned[:-1]
    if cleaned.endswith("%"):
        cleaned = cleaned[:-1]
    if not _NUMBER.fullmatch(cleaned):
        return None
    value = float(cleaned)
    return value if math.isfinite(value) else None


def extract_last_number(text: str) -> float | None:
    """The last number written anywhere in text ("... so she has $1,250." -> 1250.0), or None."""
    matches = _NUMBER_IN_TEXT.findall(text)
    for candidate in reversed(matches):
        value = parse_number(candidate)
        if value is not None:
            return value
    return None


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # content blocks: [{"type": "text", "text": ...}, ...]
        return "".join(block.get("text", "") for block in content if isinstance(block, Mapping))
    if content is None:
        return ""
    raise TypeError(f"message content must be a string or a list of content blocks, got {type(content).__name__}.")


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """Text of a TRL completion: the string itself, or the content of the last message of a chat completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and len(completion) > 0 and isinstance(completion[-1], Mapping):
        return _content_text(completion[-1].get("content"))
    raise TypeError(
        "a completion must be a string or a non-empty list of chat messages ({'role': ..., 'content': ...}), "
        f"got {completion!r:.80}."
    )
