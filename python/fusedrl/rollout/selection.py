"""Which rollout engine a trainer uses: the one given, the model's vLLM engine (use_vllm=True), or the built-in one."""

from __future__ import annotations

from typing import Any

import torch

from fusedrl.rollout.base import RolloutEngine
from fusedrl.rollout.builtin import BuiltinEngine

USE_VLLM_HINT = (
    "use_vllm=True needs a model loaded with fusedrl.load_model(..., fast_inference=True) (it starts vLLM and "
    "shares its weights with the training model); in a `fusedrl train` config that is use_vllm = true, which "
    "loads the model that way"
)


def select_engine(args: Any, model: torch.nn.Module, tokenizer: Any, rollout_engine: RolloutEngine | None) -> RolloutEngine:
    """The engine for a GRPOConfig `args`; with use_vllm the model's engine, checked against the vllm_* fields."""
    if rollout_engine is not None:
        return rollout_engine
    if not args.use_vllm:
        return BuiltinEngine(model, tokenizer)
    engine = getattr(model, "vllm_engine", None)
    if engine is None:
        raise ValueError(USE_VLLM_HINT)
    if args.vllm_max_model_length is not None and args.vllm_max_model_length != engine.max_model_len:
        raise ValueError(
            f"vllm_max_model_length={args.vllm_max_model_length} but the model's vLLM engine was started with "
            f"max_model_len={engine.max_model_len}: load the model with max_seq_length={args.vllm_max_model_length} "
            "or leave vllm_max_model_length unset"
        )
    utilization = args.vllm_gpu_memory_utilization
    if utilization is not None and engine.device.type == "cuda" and utilization != engine.gpu_memory_utilization:
        raise ValueError(
            f"vllm_gpu_memory_utilization={utilization} but the model's vLLM engine was started with "
            f"{engine.gpu_memory_utilization}: pass gpu_memory_utilization={utilization} to load_model instead"
        )
    engine.use_standby(args.vllm_enable_sleep_mode)
    return engine
