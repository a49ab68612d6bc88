"""Prompt formats: the GSM8K GRPO tutorial's XML reasoning format and a helper building chat prompts from it."""

from __future__ import annotations

SYSTEM_PROMPT = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""

XML_COT_FORMAT = """\
<reasoning>
{reasoning}
</reasoning>
<answer>
{answer}
</answer>
"""


def to_chat_prompt(question: str, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """[system, user] chat messages for one question (only the user message when system_prompt is None)."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a string, got {type(question).__name__}.")
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": question})
    return messages
