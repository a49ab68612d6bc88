"""What one checkpointed decoder layer keeps for its backward, bounded (used by fusedrl.nn.offload).

  chunk_layer(layer, chunk_tokens)   the MLP, the two RMSNorms and Qwen3's per-head q/k norms work on `chunk_tokens`
                                     tokens at a time and keep only their input (fusedrl.nn.chunked_mlp): no float32
                                     (tokens, H) copies of a norm, no (tokens, intermediate) MLP tensors; the MLP's
                                     output may be deferred during a recompute. `unchunk_layer` undoes it.
  exact_casts_skipped(modules, x)    under autocast to x's dtype, peft's LoRA layers cast their input to the
                                     adapter's float32 and autocast casts it straight back for the adapter's matmul:
                                     the same values, but each projection keeps its own (tokens, H) copy for backward
                                     (four per Llama layer). peft's documented switch `cast_input_dtype_enabled`
                                     turns that no-op cast off for the duration; no value changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fusedrl.nn.chunked_mlp import chunk_mlp, chunk_norm, unchunk_mlp

LAYER_NORM_NAMES = ("input_layernorm", "post_attention_layernorm")
HEAD_NORM_NAMES = ("q_norm", "k_norm")  # self_attn's per-head norms (Qwen3)
_UNSET = object()


def _width(module: torch.nn.Module | None) -> int:
    weight = getattr(module, "weight", None)
    return weight.numel() if isinstance(weight, torch.Tensor) else 0


def chunk_layer(layer: torch.nn.Module, chunk_tokens: int) -> None:
    if isinstance(getattr(layer, "mlp", None), torch.nn.Module):
        chunk_mlp(layer.mlp, chunk_tokens)
    for name in LAYER_NORM_NAMES:
        if isinstance(getattr(layer, name, None), torch.nn.Module):
            chunk_norm(getattr(layer, name), chunk_tokens)
    # Per-head norms see rows of head_dim: a chunk of chunk_tokens tokens is (hidden / head_dim) times more rows.
    attention = getattr(layer, "self_attn", None)
    hidden = _width(getattr(layer, "input_layernorm", None))
    for name in HEAD_NORM_NAMES:
        norm = getattr(attention, name, None)
        if isinstance(norm, torch.nn.Module) and _width(norm) and hidden:
            chunk_norm(norm, chunk_tokens * max(1, hidden // _width(norm)))


def unchunk_layer(layer: torch.nn.Module) -> None:
    attention = getattr(layer, "self_attn", None)
    modules = [getattr(layer, name, None) for name in ("mlp", *LAYER_NORM_NAMES)]
    modules += [getattr(attention, name, None) for name in HEAD_NORM_NAMES]
    for module in modules:
        if isinstance(module, torch.nn.Module):
            unchunk_mlp(module)


def input_casting_modules(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The peft LoRA layers (not DoRA) inside `layer` whose forward casts the input to the adapter's dtype."""
    return [m for m in layer.modules()
            if type(m).__module__.startswith("peft.tuners.lora") and hasattr(m, "_cast_input_dtype")
            and not any(getattr(m, "use_dora", {}).values())]


@contextlib.contextmanager
def exact_casts_skipped(modules: list[torch.nn.Module], hidden: torch.Tensor) -> Iterator[None]:
    """peft's input casts of `modules` off while autocast to hidden's dtype is on (see module doc)."""
    device = hidden.device.type
    exact = (bool(modules) and device in ("cuda", "cpu") and torch.is_autocast_enabled(device)
             and torch.get_autocast_dtype(device) == hidden.dtype)
    if not exact:
        yield
        return
    previous = [m.__dict__.get("cast_input_dtype_enabled", _UNSET) for m in modules]
    for m in modules:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, value in zip(modules, previous):
            if value is _UNSET:
                m.__dict__.pop("cast_input_dtype_enabled", None)
            else:
                m.cast_input_dtype_enabled = value
