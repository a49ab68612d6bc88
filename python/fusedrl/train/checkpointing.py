"""The trainer's activation-memory set-up: which checkpointing (none, plain, offloaded), which MLP chunk size, chosen
from the memory plan before the first step.

`GRPOConfig.gradient_checkpointing`: True (plain recompute), False (none), "offload" (layer inputs in pinned host
memory, fusedrl.nn.offload; "unsloth" is an alias) or None (automatic: the cheapest that the plan says fits).
`GRPOConfig.mlp_chunk_tokens`: None (from the plan), 0 (never chunk) or a chunk size in tokens.
On CUDA the plan is printed next to the card's free memory and a step that cannot fit raises MemoryError here,
before any work; on CPU nothing is offloaded and no budget is checked.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fusedrl.nn.offload import OffloadedCheckpointing
from fusedrl.train.config_checks import normalize_checkpointing
from fusedrl.train.memory_plan import MemoryPlan, ModelShape, available_host_bytes, choose, estimate

logger = logging.getLogger("fusedrl.memory")

def device_budget(device: torch.device) -> int:
    """Bytes this process can use on `device`: the driver's free memory plus what torch already holds."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device))


def prepare_checkpointing(model: torch.nn.Module, args: Any, *, engine_bytes: int = 0) -> MemoryPlan | None:
    """Apply the config's checkpointing to `model` and return the memory plan it follows (None when off)."""
    mode = normalize_checkpointing(args.gradient_checkpointing)
    runner = getattr(model, "fusedrl_checkpointing", None)
    if mode is False:
        if runner is not None:
            runner.uninstall(model)
        return None
    device = next(model.parameters()).device
    sequence = (args.max_prompt_length or 512) + args.max_completion_length
    batch = args.per_device_train_batch_size
    compute_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    shape = ModelShape.of(model, compute_dtype)
    chunk = args.mlp_chunk_tokens or None
    if device.type == "cuda":
        budget = device_budget(device)
        plan = choose(shape, batch, sequence, budget, offload=None if mode is None else mode == "offload",
                      mlp_chunk_tokens=chunk, engine_bytes=engine_bytes,
                      chunk_given=args.mlp_chunk_tokens is not None,
                      host_budget_bytes=pinnable_host_bytes(available_host_bytes(), runner))
        logger.warning(plan.describe(budget))  # one line before the first step, shown by default
    else:  # CPU: no budget; offload is a no-op, chunking only if asked
        plan = estimate(shape, batch, sequence, offload=mode == "offload", mlp_chunk_tokens=chunk,
                        engine_bytes=engine_bytes)
    if not plan.offload and plan.mlp_chunk_tokens is None:
        if runner is not None:
            runner.uninstall(model)
        if not _is_checkpointing(model):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return plan
    runner = OffloadedCheckpointing.install(model, offload=plan.offload, mlp_chunk_tokens=plan.mlp_chunk_tokens)
    if plan.offload and device.type == "cuda":
        runner.reserve(device, plan.pinned_host_bytes)  # pinned once, now, not in the middle of a step
    return plan


def pinnable_host_bytes(available: int | None, runner: Any = None) -> int | None:
    """Host bytes the plan may pin: 3/4 of the available memory (pinned memory cannot be swapped; a quarter stays
    for everything else), plus the arena the model's installed runner already pinned, which the new runner takes
    over (a second trainer on the same model, e.g. in a notebook, must not see its own arena as used memory)."""
    if available is None:
        return None
    pinned = runner.pinned_bytes() if isinstance(runner, OffloadedCheckpointing) else 0
    return available * 3 // 4 + pinned


def reset_after_micro_batch(model: torch.nn.Module) -> None:
    """Forget the offloaded inputs of a finished (or interrupted) micro-batch."""
    runner = getattr(model, "fusedrl_checkpointing", None)
    if runner is not None:
        runner.reset()


def _is_checkpointing(model: torch.nn.Module) -> bool:
    if not callable(getattr(model, "gradient_checkpointing_enable", None)):
        return True
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # newer, older transformers
        if hasattr(type(inner), name):
            return bool(getattr(inner, name))
    return True
