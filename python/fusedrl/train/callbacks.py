"""The callbacks a run normally wants: checkpoints every save_steps (and resume), metrics log, console table and
progress bar. `GRPOTrainer(..., callbacks=default_callbacks(args))` gives a Python run what `fusedrl train` has."""

from __future__ import annotations

import os
from typing import Any

from .checkpoint import CheckpointCallback
from .config import GRPOConfig
from .metrics_log import MetricsLogger


def default_callbacks(args: GRPOConfig, resume_from: str | os.PathLike[str] | None = None) -> list[Any]:
    """[CheckpointCallback, MetricsLogger], in the order they must run: a resumed checkpoint is restored before the
    logger reads the step. Close the logger (last item) when training ends."""
    callbacks: list[Any] = [CheckpointCallback(args.output_dir, args.save_steps, args.save_total_limit,
                                               resume_from=resume_from)]
    callbacks.append(MetricsLogger(args.output_dir, logging_steps=args.logging_steps, max_steps=args.max_steps,
                                   log_completions=args.log_completions,
                                   num_completions_to_print=args.num_completions_to_print))
    return callbacks
