"""The generation buffer: when to sample a new generation batch and which stored micro-batch to train on.

TRL's rule (`GRPOTrainer._prepare_inputs`): micro-step `s` (counting every micro-batch the trainer consumes) starts a
new generation round when `s % (steps_per_generation * num_iterations) == 0`; it trains on slice
`s % steps_per_generation` of the stored round. So a round of `steps_per_generation` micro-batches is walked through
`num_iterations` times before the next round is sampled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

MicroBatch = TypeVar("MicroBatch")


class GenerationBuffer(Generic[MicroBatch]):
    """Holds the micro-batches of the current generation round and hands them out in TRL's order.

    `produce_round()` must return exactly `steps_per_generation` micro-batches; it is called lazily, on the first
    micro-step of each round.
    """

    def __init__(
        self,
        produce_round: Callable[[], Sequence[MicroBatch]],
        *,
        steps_per_generation: int,
        num_iterations: int,
    ) -> None:
        if steps_per_generation < 1:
            raise ValueError(f"steps_per_generation must be >= 1, got {steps_per_generation}")
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        self._produce_round = produce_round
        self.steps_per_generation = steps_per_generation
        self.num_iterations = num_iterations
        self.micro_step = 0
        self.rounds_generated = 0
        self._stored: list[MicroBatch] | None = None

    @property
    def generate_every(self) -> int:
        """Micro-steps between two generation rounds."""
        return self.steps_per_generation * self.num_iterations

    def needs_generation(self) -> bool:
        return self._stored is None or self.micro_step % self.generate_every == 0

    def next(self) -> MicroBatch:
        """The micro-batch for the current micro-step; samples a new round first when one is due."""
        if self.needs_generation():
            stored = list(self._produce_round())
            if len(stored) != self.steps_per_generation:
                raise RuntimeError(
                    f"a generation round produced {len(stored)} micro-batches, expected steps_per_generation="
                    f"{self.steps_per_generation}"
                )
            self._stored = stored
            self.rounds_generated += 1
        assert self._stored is not None
        micro_batch = self._stored[self.micro_step % self.steps_per_generation]
        self.micro_step += 1
        return micro_batch

    @property
    def stored_round(self) -> list[MicroBatch] | None:
        """The micro-batches of the current round (None before the first), e.g. for checkpointing mid-round."""
        return None if self._stored is None else list(self._stored)

    def restore(self, *, micro_step: int, rounds_generated: int, stored_round: Sequence[MicroBatch] | None) -> None:
        """Put the buffer back where a checkpoint left it; `stored_round` None means "sample anew when due"."""
        if stored_round is not None and len(stored_round) != self.steps_per_generation:
            raise ValueError(
                f"stored_round has {len(stored_round)} micro-batches, expected steps_per_generation="
                f"{self.steps_per_generation}"
            )
        if stored_round is None and micro_step % self.generate_every != 0:
            raise ValueError(
                f"micro_step {micro_step} is in the middle of a generation round (rounds have {self.generate_every} "
                "micro-steps), so the stored round is needed to resume it"
            )
        self.micro_step = micro_step
        self.rounds_generated = rounds_generated
        self._stored = None if stored_round is None else list(stored_round)

    def state_dict(self) -> dict[str, Any]:
        """Position and, in the middle of a round, the stored micro-batches (needed to finish that round)."""
        mid_round = self._stored is not None and self.micro_step % self.generate_every != 0
        return {"micro_step": self.micro_step, "rounds_generated": self.rounds_generated,
                "stored_round": list(self._stored) if mid_round else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restore(micro_step=state["micro_step"], rounds_generated=state["rounds_generated"],
                     stored_round=state["stored_round"])
