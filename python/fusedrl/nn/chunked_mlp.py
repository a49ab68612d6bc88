"""Token-chunked per-token modules (the decoder MLP, the RMSNorms): a working set bounded by a chunk of tokens, not
by batch x context.

A decoder MLP (or norm) acts on each token alone, so `module(x)` equals the concatenation of `module(x[chunk])` over
chunks of tokens. `chunk_mlp(layer.mlp, chunk_tokens)` makes the module do exactly that: the forward computes chunk by
chunk without keeping intermediates (only the input is saved), and the backward recomputes one chunk at a time and
back-propagates it before the next, so the (tokens x intermediate) activations — 14,336 wide on Llama-3.1-8B,
three or four of them with their gradients — exist for one chunk at a time. `chunk_norm` does the same for an
RMSNorm, whose autograd graph otherwise keeps float32 copies of its whole (tokens, H) input; transformers' RMSNorms
keep their input and a float32 rstd per token instead, and differentiate without re-running the forward
(fusedrl.nn.lean_rms_norm). Parameter gradients
(LoRA) accumulate chunk by chunk (float rounding of a sum in another order; identical up to that).

Deferred outputs: a checkpointed layer's recompute in backward only builds the graph that its backward then walks;
the value of the MLP's output is not needed there when the layer merely adds it to the residual stream. Inside
`deferred_outputs()`, a chunked MLP whose graph is recorded returns a zero placeholder (no memory, no compute) and
computes each chunk once, in its own backward: the MLP runs twice per step (forward, backward) as with plain
checkpointing, instead of three times. The caller must check that nothing above the placeholder reads its value
(fusedrl.nn.recompute_graph) and recompute without deferral when something does.

The module keeps its class, parameters and state-dict keys; only the instance's `forward` is replaced, and
`unchunk_mlp` restores it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

from fusedrl.nn.lean_rms_norm import is_transformers_rms_norm, lean_rms_norm

_ORIGINAL_FORWARD = "_fusedrl_unchunked_forward"
_DEVICE_TYPES = ("cuda", "cpu")
_deferral = threading.local()  # .nodes: the list collecting deferred graph nodes, inside deferred_outputs()


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


@contextlib.contextmanager
def deferred_outputs() -> Iterator[list]:
    """Chunked MLPs recorded inside return placeholders; yields the list of their graph nodes (see module doc)."""
    previous = getattr(_deferral, "nodes", None)
    _deferral.nodes = []
    try:
        yield _deferral.nodes
    finally:
        _deferral.nodes = previous


def _chunks(rows: torch.Tensor, chunk_tokens: int, function: Callable) -> torch.Tensor:
    """function over row chunks, written into one output (no torch.cat copy)."""
    out = None
    for start in range(0, rows.shape[0], chunk_tokens):
        part = function(rows[start:start + chunk_tokens])
        if out is None:
            out = part.new_empty((rows.shape[0], part.shape[-1]))
        out[start:start + part.shape[0]] = part
    return out


class _ChunkedTokens(torch.autograd.Function):
    """y = concat(function(x[chunk])) over token chunks of x (..., H); saves x only; backward chunk by chunk.
    With `placeholder` = (width, dtype), y is zeros of that width (the forward is deferred to the backward)."""

    @staticmethod
    def forward(ctx, function: Callable, chunk_tokens: int, placeholder: tuple[int, torch.dtype] | None,
                anchor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.function, ctx.chunk_tokens, ctx.autocast = function, chunk_tokens, autocast_state()
        ctx.save_for_backward(x)
        if placeholder is not None:
            width, dtype = placeholder
            return x.new_zeros((), dtype=dtype).expand(*x.shape[:-1], width)
        with torch.no_grad():
            out = _chunks(x.reshape(-1, x.shape[-1]), chunk_tokens, function)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        rows = x.detach().reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(rows) if ctx.needs_input_grad[4] else None
        for start in range(0, rows.shape[0], ctx.chunk_tokens):
            chunk = rows[start:start + ctx.chunk_tokens].detach().requires_grad_(grad_x is not None)
            with torch.enable_grad(), autocast_as(ctx.autocast):
                out = ctx.function(chunk)
            if out.requires_grad:
                torch.autograd.backward(out, grad_rows[start:start + ctx.chunk_tokens])
            if grad_x is not None:
                grad_x[start:start + ctx.chunk_tokens] = 0 if chunk.grad is None else chunk.grad
            del out, chunk
        return None, None, None, None, None if grad_x is None else grad_x.reshape(x.shape)


def _install(module: torch.nn.Module, chunk_tokens: int, deferrable: bool) -> None:
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    original = module.__dict__.get(_ORIGINAL_FORWARD) or module.forward
    # A norm that runs transformers' own RMSNorm forward gets the lean backward (no forward in backward).
    lean_norm = (not deferrable and getattr(original, "__func__", None) is type(module).forward
                 and is_transformers_rms_norm(module))
    # A tensor that requires grad, so the chunked node is recorded even when x does not (LoRA inside the MLP).
    anchor = torch.empty(0, requires_grad=True)
    seen: dict[str, tuple[int, torch.dtype]] = {}  # the output's (width, dtype) of the last computed pass

    def chunked_forward(x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // max(x.shape[-1], 1)
        if tokens <= chunk_tokens:
            return original(x)
        if not torch.is_grad_enabled():  # no graph: only the transient chunk intermediates matter
            out = _chunks(x.reshape(-1, x.shape[-1]), chunk_tokens, original)
            seen["out"] = (out.shape[-1], out.dtype)
            return out.reshape(*x.shape[:-1], out.shape[-1])
        if lean_norm and x.shape[-1] == module.weight.shape[0]:
            return lean_rms_norm(x, module.weight, module.variance_epsilon, chunk_tokens)
        nodes = getattr(_deferral, "nodes", None)
        placeholder = seen.get("out") if deferrable and nodes is not None else None
        out = _ChunkedTokens.apply(original, chunk_tokens, placeholder, anchor, x)
        if placeholder is not None:
            nodes.append(out.grad_fn)
        else:
            seen["out"] = (out.shape[-1], out.dtype)
        return out

    module.__dict__[_ORIGINAL_FORWARD] = original
    module.forward = chunked_forward
    module.fusedrl_chunk_tokens = chunk_tokens


def chunk_mlp(mlp: torch.nn.Module, chunk_tokens: int) -> None:
    """Make `mlp` (any per-token module: (..., H) -> (..., H')) compute `chunk_tokens` tokens at a time when it
    sees more than that and gradients are recorded; its output may be deferred (see module doc). Calling it again
    changes the chunk size."""
    _install(mlp, chunk_tokens, deferrable=True)


def chunk_norm(norm: torch.nn.Module, chunk_tokens: int) -> None:
    """Like chunk_mlp for a per-token module whose output value is always computed (a norm feeding attention)."""
    _install(norm, chunk_tokens, deferrable=False)


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
    """Undo `chunk_mlp` / `chunk_norm` / `recompute_in_backward`."""
    if _ORIGINAL_FORWARD in mlp.__dict__:
        del mlp.__dict__[_ORIGINAL_FORWARD]
        mlp.__dict__.pop("forward", None)
        mlp.__dict__.pop("fusedrl_chunk_tokens", None)
