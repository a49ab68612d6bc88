"""Rollout engines: the interface the trainer uses and the built-in transformers engine."""

from fusedrl.rollout.base import RolloutEngine, RolloutOutput, SamplingConfig, WeightSyncingEngine
from fusedrl.rollout.builtin import BuiltinEngine

__all__ = ["BuiltinEngine", "RolloutEngine", "RolloutOutput", "SamplingConfig", "VLLMEngine", "WeightSyncingEngine"]


def __getattr__(name: str):
    if name == "VLLMEngine":  # imported lazily: vLLM is optional and heavy
        from fusedrl.rollout.vllm_engine import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module 'fusedrl.rollout' has no attribute {name!r}")
