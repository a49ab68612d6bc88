"""Token-chunked MLP: the decoder MLP's working set bounded by a chunk of tokens, not by batch x context.

A decoder MLP acts on each token alone, so `mlp(x)` equals the concatenation of `mlp(x[chunk])` over chunks of
tokens. `chunk_mlp(layer.mlp, chunk_tokens)` makes the module do exactly that: the forward computes chunk by chunk
without keeping intermediates (only the MLP input is saved), and the backward recomputes one chunk at a time and
back-propagates it before the next, so the (tokens x intermediate) activations — 14,336 wide on Llama-3.1-8B,
three or four of them with their gradients — exist for one chunk at a time. Parameter gradients (LoRA) accumulate
chunk by chunk (float rounding of a sum in another order; identical up to that).

The module keeps its class, parameters and state-dict keys; only the instance's `forward` is replaced, and
`unchunk_mlp` restores it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

_ORIGINAL_FORWARD = "_fusedrl_unchunked_forward"
_DEVICE_TYPES = ("cuda", "cpu")


def autocast_state() -> tuple[tuple[str, bool, torch.dtype], ...]:
    """The autocast settings now in force, to replay a recompute under the same precision."""
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _DEVICE_TYPES)


def autocast_as(state: tuple[tuple[str, bool, torch.dtype], ...]) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for device_type, enabled, dtype in state:
        if device_type == "cuda" and not torch.cuda.is_available():
            continue
        stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
    return stack


class _ChunkedTokens(torch.autograd.Function):
    """y = concat(function(x[chunk])) over token chunks of x (..., H); saves x only; backward chunk by chunk."""

    @staticmethod
    def forward(ctx, function: Callable, chunk_tokens: int, anchor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            outputs = [function(rows[start:start + chunk_tokens]) for start in range(0, rows.shape[0], chunk_tokens)]
        ctx.function, ctx.chunk_tokens, ctx.autocast = function, chunk_tokens, autocast_state()
        ctx.save_for_backward(x)
        out = torch.cat(outputs)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        rows = x.detach().reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(rows) if ctx.needs_input_grad[3] else None
        for start in range(0, rows.shape[0], ctx.chunk_tokens):
            chunk = rows[start:start + ctx.chunk_tokens].detach().requires_grad_(grad_x is not None)
            with torch.enable_grad(), autocast_as(ctx.autocast):
                out = ctx.function(chunk)
            if out.requires_grad:
                torch.autograd.backward(out, grad_rows[start:start + ctx.chunk_tokens])
            if grad_x is not None:
                grad_x[start:start + ctx.chunk_tokens] = 0 if chunk.grad is None else chunk.grad
        return None, None, None, None if grad_x is None else grad_x.reshape(x.shape)


def chunk_mlp(mlp: torch.nn.Module, chunk_tokens: int) -> None:
    """Make `mlp` (any per-token module: (..., H) -> (..., H')) compute `chunk_tokens` tokens at a time when it
    sees more than that and gradients are recorded. Calling it again changes the chunk size."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    original = mlp.__dict__.get(_ORIGINAL_FORWARD) or mlp.forward
    # A tensor that requires grad, so the chunked node is recorded even when x does not (LoRA inside the MLP).
    anchor = torch.empty(0, requires_grad=True)

    def chunked_forward(x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // max(x.shape[-1], 1)
        if tokens <= chunk_tokens or not torch.is_grad_enabled():
            if tokens <= chunk_tokens:
                return original(x)
            with torch.no_grad():  # no graph: only the transient chunk intermediates matter
                rows = x.reshape(-1, x.shape[-1])
                out = torch.cat([original(rows[s:s + chunk_tokens]) for s in range(0, rows.shape[0], chunk_tokens)])
            return out.reshape(*x.shape[:-1], out.shape[-1])
        return _ChunkedTokens.apply(original, chunk_tokens, anchor, x)

    mlp.__dict__[_ORIGINAL_FORWARD] = original
    mlp.forward = chunked_forward
    mlp.fusedrl_chunk_tokens = chunk_tokens


def recompute_in_backward(module: torch.nn.Module) -> None:
    """Make `module` save only its input and recompute itself in backward (torch.utils.checkpoint), e.g. a final
    RMSNorm that would otherwise keep float32 copies of its (tokens, H) input. `unchunk_mlp` undoes it."""
    from torch.utils.checkpoint import checkpoint

    original = module.__dict__.get(_ORIGINAL_FORWARD) or module.forward

    def recomputed_forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return original(x)
        return checkpoint(original, x, use_reentrant=False)

    module.__dict__[_ORIGINAL_FORWARD] = original
    module.forward = recomputed_forward


def unchunk_mlp(mlp: torch.nn.Module) -> None:
    """Undo `chunk_mlp`."""
    if _ORIGINAL_FORWARD in mlp.__dict__:
        del mlp.__dict__[_ORIGINAL_FORWARD]
        mlp.__dict__.pop("forward", None)
        mlp.__dict__.pop("fusedrl_chunk_tokens", None)
