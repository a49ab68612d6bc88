"""Tiny synthetic verifiable tasks for fast learning tests: integer arithmetic questions with exact answers.

arithmetic_dataset(n, seed) -> datasets.Dataset with "prompt" (chat messages) and "answer" (the result as a string,
e.g. "What is 12 + 7?" -> "19"), so the GSM8K reward functions (correctness_reward, proximity_reward) score it.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable, Sequence

import datasets

from fusedrl.data.prompts import to_chat_prompt

OPERATIONS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def arithmetic_dataset(
    n: int,
    seed: int = 0,
    low: int = 0,
    high: int = 20,
    operations: Sequence[str] = ("+",),
    system_prompt: str | None = None,
) -> datasets.Dataset:
    """n questions "What is a <op> b?" with a, b uniform in [low, high] and the op drawn from `operations`."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if low > high:
        raise ValueError(f"low ({low}) must be <= high ({high}).")
    unknown = [op for op in operations if op not in OPERATIONS]
    if not operations or unknown:
        raise ValueError(f"operations must be a non-empty subset of {list(OPERATIONS)}, got {list(operations)}.")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(low, high), rng.randint(low, high), rng.choice(list(operations))
        question = f"What is {a} {op} {b}?"
        rows.append({"prompt": to_chat_prompt(question, system_prompt), "answer": str(OPERATIONS[op](a, b))})
    return datasets.Dataset.from_list(rows)
