"""Rollout engines: the interface the trainer uses and the built-in transformers engine."""

from fusedrl.rollout.base import RolloutEngine, RolloutOutput, SamplingConfig
from fusedrl.rollout.builtin import BuiltinEngine

__all__ = ["BuiltinEngine", "RolloutEngine", "RolloutOutput", "SamplingConfig"]
