"""Standby: vLLM's KV cache released while the trainer runs, re-created before each rollout (CUDA only).

The weights are shared with the training model, so they must never be released or moved: standby uses vLLM's
sleep level 0 (pause scheduling) plus `release_kv_cache_memory()`, which unmaps only the KV-cache pool of vLLM's
cumem allocator, and wakes with `wake_up(tags=["kv_cache"])` then `wake_up(tags=["scheduling"])`. Before waking,
`torch.cuda.empty_cache()` hands the trainer's cached blocks back to the driver so the KV cache can be mapped
again. Level 1/2 sleep (which offload or discard weights) is never used. The CPU build of vLLM has no sleep mode:
there standby is a no-op.

vLLM's `gpu_memory_utilization` (the fraction of the card vLLM may fill with weights, activations and KV cache) is
chosen by `plan_gpu_memory_utilization` from the weights' size, what the trainer keeps resident during a rollout
(LoRA parameters, their Adam states), and the card, unless the user sets it; `check_training_fits` compares the
training peak measured on the first step with what is free while the KV cache is released and says what to set.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

GIB = 2**30
# Left free on the card for CUDA context, NCCL/cuBLAS workspaces and fragmentation.
DEFAULT_MARGIN_BYTES = 2 * GIB
# Bytes the trainer keeps per trainable LoRA parameter between steps: fp32 value + Adam's two fp32 moments (the
# gradient is freed by zero_grad(set_to_none=True) before the rollout).
RESIDENT_BYTES_PER_LORA_PARAMETER = 12
# The least KV cache worth starting an engine for.
MIN_KV_CACHE_BYTES = GIB // 2
MAX_UTILIZATION = 0.95


def expandable_segments_enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether PyTorch's CUDA allocator is configured with expandable segments (read from its own settings)."""
    environ = os.environ if environ is None else environ
    settings = ",".join(environ.get(name, "") for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    return any(item.replace(" ", "").lower() == "expandable_segments:true" for item in settings.split(","))


def check_sleep_mode_allowed(device: torch.device, environ: dict[str, str] | None = None) -> None:
    """vLLM's sleep mode allocates through its own cumem allocator, which breaks with expandable segments."""
    if device.type == "cuda" and expandable_segments_enabled(environ):
        raise RuntimeError(
            "vllm_enable_sleep_mode=True cannot be used with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
            "(vLLM's sleep-mode allocator and expandable segments are incompatible): unset expandable_segments or "
            "set vllm_enable_sleep_mode=False"
        )


def lora_parameter_count(config: Any, rank: int, target_modules: Any) -> int:
    """Trainable parameters of a rank-`rank` LoRA on a Llama-style decoder (every linear unless listed)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    inter = text.intermediate_size
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    names = shapes if isinstance(target_modules, str) else [n for n in target_modules if n in shapes]
    per_layer = sum(rank * (shapes[n][0] + shapes[n][1]) for n in names)
    return per_layer * text.num_hidden_layers


def plan_gpu_memory_utilization(
    weight_bytes: int,
    total_bytes: int,
    trainer_resident_bytes: int,
    margin_bytes: int = DEFAULT_MARGIN_BYTES,
) -> float:
    """vLLM's gpu_memory_utilization so that vLLM and the trainer's resident state fit on the card during a rollout.

    vLLM may fill u * total with weights + activations + KV cache; the trainer keeps `trainer_resident_bytes`
    alongside; `margin_bytes` stay free. Raises when not even the weights plus a minimal KV cache fit.
    """
    for name, value in (("weight_bytes", weight_bytes), ("total_bytes", total_bytes),
                        ("trainer_resident_bytes", trainer_resident_bytes), ("margin_bytes", margin_bytes)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if total_bytes <= 0:
        raise ValueError(f"total_bytes must be > 0, got {total_bytes}")
    available = total_bytes - margin_bytes - trainer_resident_bytes
    needed = weight_bytes + MIN_KV_CACHE_BYTES
    if available < needed:
        raise RuntimeError(
            f"the card ({total_bytes / GIB:.1f} GiB) cannot hold the weights ({weight_bytes / GIB:.2f} GiB), a "
            f"minimal KV cache ({MIN_KV_CACHE_BYTES / GIB:.1f} GiB), the trainer's state "
            f"({trainer_resident_bytes / GIB:.2f} GiB) and {margin_bytes / GIB:.1f} GiB of headroom: use a smaller "
            "model, 4-bit weights or a bigger GPU"
        )
    return round(min(MAX_UTILIZATION, available / total_bytes), 3)


@dataclass(frozen=True)
class MemoryFit:
    fits: bool
    free_for_training_bytes: int
    suggested_utilization: float | None


def check_training_fits(
    training_peak_bytes: int, weight_bytes: int, total_bytes: int, utilization: float,
    margin_bytes: int = DEFAULT_MARGIN_BYTES,
) -> MemoryFit:
    """Whether the training peak (excluding the shared weights) fits while the KV cache is released.

    While training, vLLM holds the weights (shared) and little else; the trainer may use the rest minus the margin.
    When it does not fit, or when the rollout side is too tight, a utilization leaving room for the peak is
    suggested.
    """
    free = total_bytes - margin_bytes - weight_bytes
    fits = training_peak_bytes <= free
    rollout_room = total_bytes - margin_bytes - training_peak_bytes
    suggested = None
    if not fits or utilization * total_bytes > rollout_room + weight_bytes:
        suggested = round(max(0.0, min(MAX_UTILIZATION, (rollout_room + weight_bytes) / total_bytes)), 3)
    return MemoryFit(fits, free, suggested)


class Standby:
    """Releases only vLLM's KV cache (CUDA with sleep mode) between rollouts; a no-op otherwise."""

    def __init__(self, llm: Any, device: torch.device, enabled: bool) -> None:
        self.llm = llm
        self.active = enabled and device.type == "cuda"
        self.device = device
        self.sleeping = False

    def release(self) -> None:
        if not self.active or self.sleeping:
            return
        self.llm.sleep(level=0)  # pause scheduling; weights and KV cache stay mapped
        self.llm.release_kv_cache_memory()  # unmap the KV cache pool only
        self.sleeping = True

    def restore(self) -> None:
        if not self.active or not self.sleeping:
            return
        torch.cuda.empty_cache()  # the trainer's cached blocks go back to the driver for the KV cache
        self.llm.wake_up(tags=["kv_cache"])
        self.llm.wake_up(tags=["scheduling"])
        self.sleeping = False


def warn_if_training_does_not_fit(fit: MemoryFit, utilization: float) -> None:
    if fit.suggested_utilization is not None:
        warnings.warn(
            f"vLLM's gpu_memory_utilization={utilization} leaves too little room for the measured training peak; "
            f"set vllm_gpu_memory_utilization={fit.suggested_utilization} (or gpu_memory_utilization= in "
            "load_model)",
            stacklevel=3,
        )
