"""Runs a GRPO trainer and summarises its reward curve: what the learning tests assert on."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass
class RewardCurve:
    history: list[dict[str, float]]
    rewards: list[float]
    first: float    # mean reward of the first three steps
    last: float     # mean reward of the last three steps
    seconds: float  # wall time of train()

    def summary(self) -> str:
        steps = len(self.history)
        return (f"{steps} steps in {self.seconds:.1f} s ({self.seconds / steps:.2f} s/step); "
                f"reward {self.first:.3f} -> {self.last:.3f}")


def train_and_measure(trainer: Any) -> RewardCurve:
    started = time.perf_counter()
    history = trainer.train().history
    seconds = time.perf_counter() - started
    rewards = [h["reward"] for h in history]
    return RewardCurve(history, rewards, sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3, seconds)
