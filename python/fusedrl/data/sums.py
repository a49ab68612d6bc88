"""The quick demo's task: one-digit sums ("What is 3 + 4? Reply with only the number." -> "7").

All 81 pairs (a, b) with a, b in 1..9, shuffled once with a fixed seed, are split into 61 training and 20 held-out
questions, so `fusedrl eval --dataset sums` measures questions the demo never trained on. Rows are chat prompts
(user message only) with the answer as a string, the column final_number_reward and number_answer_reward read.
"""

from __future__ import annotations

import random

import datasets

HELD_OUT = 20
_SPLIT_SEED = 1234
INSTRUCTION = "Reply with only the number."


def _pairs() -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    random.Random(_SPLIT_SEED).shuffle(pairs)
    return pairs


def sums_dataset(split: str = "train", limit: int | None = None) -> datasets.Dataset:
    """The "train" (61) or "test" (20 held-out) questions, in a fixed order; the first `limit` of them."""
    pairs = _pairs()
    if split == "train":
        chosen = pairs[HELD_OUT:]
    elif split == "test":
        chosen = pairs[:HELD_OUT]
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
        chosen = chosen[:limit]
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {a} + {b}? {INSTRUCTION}"}], "answer": str(a + b)}
        for a, b in chosen
    ]
    return datasets.Dataset.from_list(rows)
