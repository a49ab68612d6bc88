"""Offloaded gradient checkpointing of a transformers decoder: each layer's input goes to pinned host memory.

`OffloadedCheckpointing.install(model, offload=True, mlp_chunk_tokens=8192)` turns on transformers' activation
checkpointing and gives every decoder layer (`GradientCheckpointingLayer`) our checkpoint function instead of
torch's (the `_gradient_checkpointing_func` attribute transformers itself sets for this purpose):

  forward  (grad mode) the layer runs without a graph; its input is sent to the host arena by
           `fusedrl.ops.offload_to_host` (a D2H on a side stream after the compute stream's work, the source kept
           alive by the caching allocator until the copy ran) — except the last layer's input (its backward comes
           first: no time to hide a copy), tensors below `min_offload_bytes`, CPU tensors and no-grad passes;
  backward layer i fetches its input (the compute stream waits for that slot's H2D only), prefetches layer i-1's
           input into the other device slot, recomputes with the forward's autocast settings, back-propagates the
           incoming gradient, then releases its slot.

Without offload (`offload=False`, or on CPU, or when pinned memory cannot be had) it is plain recompute
checkpointing with the same arithmetic. `mlp_chunk_tokens` bounds each layer's working set: the MLP and the two
norms work on that many tokens at a time (`fusedrl.nn.chunked_mlp`: only their inputs are kept, not the float32
copies an RMSNorm saves nor the MLP's (tokens, intermediate) tensors), the final norm too (the final hidden states
are not held twice while the loss runs), and the recompute in backward skips the chunked MLP's output value where
the layer only adds it to the residual stream (checked once per layer on the recorded graph,
`fusedrl.nn.recompute_graph`): the MLP then runs twice per step, as with plain checkpointing, not three times.
Under autocast to the activations' dtype, peft's no-op float32 cast of each LoRA input is switched off for the
layer's calls (peft's own `cast_input_dtype_enabled`), so the projections keep no (tokens, H) copies of their input.
An interrupted backward leaves nothing behind: `reset()` (called by the trainer after every micro-batch, and by the
next forward when a previous backward stopped half-way) forgets every entry; a stale handle is refused by the arena
instead of reading another pass's bytes.

Restrictions: dropout must be off inside the layers (the recompute does not replay random numbers), and only the
layer's first positional input may require grad (true of transformers' decoder layers).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from fusedrl.nn.chunked_mlp import (
    autocast_as,
    autocast_state,
    chunk_norm,
    deferred_outputs,
    recompute_in_backward,
    unchunk_mlp,
)
from fusedrl.nn.layer_working_set import chunk_layer, exact_casts_skipped, input_casting_modules, unchunk_layer
from fusedrl.nn.recompute_graph import only_value_free_ops_above
from fusedrl.ops import offload as offload_ops
from fusedrl.ops.offload import arena_bytes

logger = logging.getLogger("fusedrl.offload")

DEFAULT_MIN_OFFLOAD_BYTES = 2 << 20  # below this a copy's latency costs more than the memory it frees


class _SavedInput:
    """One layer input of one pass: on the device (`tensor`) or in the arena (`handle`)."""

    __slots__ = ("tensor", "handle", "pass_id", "previous", "released", "__weakref__")

    def __init__(self, tensor: torch.Tensor | None, handle: int, pass_id: int, previous: _SavedInput | None):
        self.tensor, self.handle, self.pass_id, self.previous, self.released = tensor, handle, pass_id, previous, False


class OffloadedCheckpointing:
    """The checkpoint function of every decoder layer of one model, and the arena its inputs go to."""

    def __init__(self, layers: list[torch.nn.Module], *, offload: bool, mlp_chunk_tokens: int | None,
                 min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES, defer_mlp: bool = True) -> None:
        if not layers:
            raise ValueError("found no decoder layers (transformers GradientCheckpointingLayer) to checkpoint")
        self.layers = layers
        self.offload = offload
        self.min_offload_bytes = min_offload_bytes
        self.mlp_chunk_tokens = mlp_chunk_tokens
        self.defer_mlp = defer_mlp  # recompute without the chunked MLP's output where the graph allows it
        self._deferrable: dict[int, bool] = {}  # per layer index, once checked (fusedrl.nn.recompute_graph)
        self._casting: list[list[torch.nn.Module]] = [[] for _ in layers]  # peft layers that cast their input
        self.fallback_logged = False
        self.final_norm: torch.nn.Module | None = None
        self._arena: torch.ScriptObject | None = None
        self._arena_device: torch.device | None = None
        self._pass_id = 0
        self._last_saved: _SavedInput | None = None
        self._loaded_in_pass = False
        self._anchor = torch.empty(0, requires_grad=True)  # records the node even when no input requires grad

    # ---------------------------------------------------------------------------------------------------------
    # installing
    # ---------------------------------------------------------------------------------------------------------
    @classmethod
    def install(cls, model: torch.nn.Module, *, offload: bool = True, mlp_chunk_tokens: int | None = None,
                min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES, defer_mlp: bool = True) -> OffloadedCheckpointing:
        """Enable checkpointing on `model` (transformers or peft around one) with this class's function. With
        `mlp_chunk_tokens`, each layer's MLP and norms (and the final norm) work on that many tokens at a time, and
        (`defer_mlp`) the recompute in backward skips the MLP's output value where nothing reads it."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        enable = getattr(model, "gradient_checkpointing_enable", None)
        if not callable(enable):
            raise TypeError(f"{type(model).__name__} cannot checkpoint (no gradient_checkpointing_enable)")
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        _check_no_dropout(model, layers)
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        runner = cls(layers, offload=offload, mlp_chunk_tokens=mlp_chunk_tokens, min_offload_bytes=min_offload_bytes,
                     defer_mlp=defer_mlp)
        runner._casting = [input_casting_modules(layer) for layer in layers]
        previous = model.__dict__.get("fusedrl_checkpointing")
        if offload and isinstance(previous, OffloadedCheckpointing) and previous._arena is not None:
            previous.reset()  # the pinned arena goes to the new runner: pinning tens of GiB again takes seconds
            runner._arena, runner._arena_device = previous._arena, previous._arena_device
            previous._arena = None
        for index, layer in enumerate(layers):
            layer._gradient_checkpointing_func = functools.partial(runner._checkpoint, index)
            if mlp_chunk_tokens is not None:
                chunk_layer(layer, mlp_chunk_tokens)
        runner.final_norm = _final_norm_of(model)
        if runner.final_norm is not None and mlp_chunk_tokens is not None:
            chunk_norm(runner.final_norm, mlp_chunk_tokens)
        elif runner.final_norm is not None:
            recompute_in_backward(runner.final_norm)
        model.fusedrl_checkpointing = runner
        return runner

    def uninstall(self, model: torch.nn.Module) -> None:
        """Back to transformers' own checkpointing (torch.utils.checkpoint), MLPs unchunked."""
        self.reset()
        from torch.utils.checkpoint import checkpoint

        for layer in self.layers:
            layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
            unchunk_layer(layer)
        if self.final_norm is not None:
            unchunk_mlp(self.final_norm)  # the same instance-forward restore
        model.__dict__.pop("fusedrl_checkpointing", None)

    # ---------------------------------------------------------------------------------------------------------
    # state
    # ---------------------------------------------------------------------------------------------------------
    @property
    def arena(self) -> torch.ScriptObject | None:
        return self._arena

    def reset(self) -> None:
        """Forget every offloaded input of the current pass (end of a micro-batch, or an interrupted one)."""
        if self._arena is not None:
            self._arena.reset()
        self._pass_id += 1
        self._last_saved = None
        self._loaded_in_pass = False

    def reserve(self, device: torch.device, nbytes: int) -> bool:
        """Pin `nbytes` of host memory now (the memory plan calls this before the first step)."""
        arena = self._arena_for(torch.device(device))
        if arena is None or arena.live_entries() != 0:
            return False
        if arena.capacity() >= nbytes:
            return True
        return self._reserve(arena, nbytes)

    def pinned_bytes(self) -> int:
        return 0 if self._arena is None else int(self._arena.capacity())

    def _arena_for(self, device: torch.device) -> torch.ScriptObject | None:
        if not self.offload or device.type != "cuda":
            return None
        if self._arena is None:
            self._arena = offload_ops.new_arena(device)
            self._arena_device = device
        return self._arena if self._arena_device == device else None

    def _reserve(self, arena: torch.ScriptObject, nbytes: int) -> bool:
        if arena.reserve(nbytes):
            return True
        if not self.fallback_logged:  # one line, then plain checkpointing
            logger.warning("activation offload off: %s pinned bytes could not be had (%s); keeping layer inputs "
                           "on the GPU", f"{nbytes:,}", arena.fallback_reason())
            self.fallback_logged = True
        self.offload = False
        return False

    # ---------------------------------------------------------------------------------------------------------
    # save / load of one layer input
    # ---------------------------------------------------------------------------------------------------------
    def _save(self, hidden: torch.Tensor, layer_index: int) -> _SavedInput:
        if self._loaded_in_pass:  # a backward ran (or stopped half-way) since: this is a new pass
            self.reset()
        handle = offload_ops.NOT_OFFLOADED
        arena = self._arena_for(hidden.device)
        keep = (arena is None or layer_index == len(self.layers) - 1 or hidden.nbytes < self.min_offload_bytes
                or not hidden.is_contiguous())
        if not keep:
            needed = arena_bytes(hidden.nbytes) * (len(self.layers) - 1)
            if arena.live_entries() == 0 and arena.capacity() < needed:
                # Room for every offloaded layer of a pass like this one, pinned once (grows only for longer passes).
                self._reserve(arena, needed)
            if self.offload:
                handle = offload_ops.offload_to_host(arena, hidden)
        saved = _SavedInput(hidden if handle < 0 else None, handle, self._pass_id, self._last_saved)
        self._last_saved = saved
        return saved

    def _load(self, saved: _SavedInput) -> torch.Tensor:
        if saved.pass_id != self._pass_id or saved.released:
            raise RuntimeError("offloaded checkpointing: this layer input was discarded (the pass was reset after an "
                               "interrupted backward); run the forward pass again")
        self._loaded_in_pass = True
        tensor = saved.tensor if saved.handle < 0 else offload_ops.fetch_to_device(self._arena, saved.handle)
        previous = saved.previous
        if previous is not None and previous.handle >= 0 and not previous.released:
            offload_ops.prefetch_to_device(self._arena, previous.handle)  # overlaps this layer's recompute
        return tensor

    def _release(self, saved: _SavedInput) -> None:
        if saved.released:
            return
        saved.released = True
        saved.tensor = None
        if saved.handle >= 0 and saved.pass_id == self._pass_id:
            offload_ops.release_offloaded(self._arena, saved.handle)

    def _exact_casts_skipped(self, layer_index: int, hidden: torch.Tensor) -> contextlib.AbstractContextManager:
        return exact_casts_skipped(self._casting[layer_index], hidden)

    def _recompute(self, layer_index: int, function: Callable[..., Any], hidden: torch.Tensor, rest: tuple,
                   autocast: tuple) -> tuple:
        """The layer's outputs with their graph, for its backward. Where the first check of this layer's graph
        showed that only additions read its chunked MLP's output, that output is a placeholder (computed chunk by
        chunk in the MLP's own backward): the MLP runs once in backward instead of twice."""
        verdict = self._deferrable.get(layer_index)
        if self.defer_mlp and self.mlp_chunk_tokens is not None and verdict is not False:
            outputs = None
            try:
                with torch.enable_grad(), autocast_as(autocast), deferred_outputs() as deferred, \
                        self._exact_casts_skipped(layer_index, hidden):
                    outputs = _as_tuple(function(hidden, *rest))
            except RuntimeError as err:  # first try only, e.g. an in-place write into the placeholder
                if verdict or isinstance(err, torch.OutOfMemoryError):
                    raise
            if outputs is not None and not deferred:  # nothing was deferred (a short pass): complete outputs
                return outputs
            if outputs is not None and (verdict or only_value_free_ops_above(outputs, deferred)):
                self._deferrable[layer_index] = True
                return _without_values(outputs)
            self._deferrable[layer_index] = False
            logger.info("layer %d: its MLP's output is read by more than additions; recomputing it in full",
                        layer_index)
            outputs = deferred = None
        with torch.enable_grad(), autocast_as(autocast), self._exact_casts_skipped(layer_index, hidden):
            return _as_tuple(function(hidden, *rest))

    # ---------------------------------------------------------------------------------------------------------
    # the checkpoint function transformers calls: function(hidden, *rest) with keyword arguments bound
    # ---------------------------------------------------------------------------------------------------------
    def _checkpoint(self, layer_index: int, function: Callable[..., Any], *args: Any) -> Any:
        if not torch.is_grad_enabled():
            with self._exact_casts_skipped(layer_index, args[0]):
                return function(*args)
        hidden, rest = args[0], args[1:]
        bound = getattr(function, "keywords", {}) or {}
        if any(_requires_grad(value) for value in (*rest, *bound.values())):
            # Gradients would have to flow into other inputs: torch's own checkpoint handles that case.
            from torch.utils.checkpoint import checkpoint

            return checkpoint(function, *args, use_reentrant=False)
        outputs = _OffloadedLayer.apply(self, layer_index, function, self._anchor, hidden, *rest)
        return outputs


class _OffloadedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runner: OffloadedCheckpointing, layer_index: int, function: Callable, anchor: torch.Tensor,
                hidden: torch.Tensor, *rest: Any):
        ctx.runner, ctx.function, ctx.rest, ctx.layer_index = runner, function, rest, layer_index
        ctx.autocast = autocast_state()
        ctx.hidden_requires_grad = hidden.requires_grad
        # Queued before the layer runs: the D2H copy of its input overlaps the layer's own compute.
        ctx.saved = runner._save(hidden.detach(), layer_index)
        with torch.no_grad(), runner._exact_casts_skipped(layer_index, hidden):
            outputs = function(hidden, *rest)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        runner, saved = ctx.runner, ctx.saved
        try:
            hidden = runner._load(saved).detach().requires_grad_(ctx.hidden_requires_grad)
            outputs = runner._recompute(ctx.layer_index, ctx.function, hidden, ctx.rest, ctx.autocast)
            pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs)
                     if isinstance(out, torch.Tensor) and out.requires_grad and grad is not None]
            if pairs:
                torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
            grad_hidden = hidden.grad if ctx.hidden_requires_grad else None
        finally:
            runner._release(saved)
            ctx.saved = None
        return (None, None, None, None, grad_hidden) + (None,) * len(ctx.rest)


def _without_values(outputs: tuple) -> tuple:
    """A deferred recompute's outputs hold placeholder sums that backward never reads: an addition's backward does
    not read its result. Their bytes are given back now (the tensors keep shape, dtype and graph for backward)."""
    for out in outputs:
        if (isinstance(out, torch.Tensor) and out._base is None and out.grad_fn is not None
                and type(out.grad_fn).__name__ in ("AddBackward0", "SubBackward0")):
            out.untyped_storage().resize_(0)
    return outputs


def _as_tuple(outputs: Any) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _final_norm_of(model: torch.nn.Module) -> torch.nn.Module | None:
    from fusedrl.model.hidden import decoder_of

    try:
        norm = getattr(decoder_of(model), "norm", None)
    except TypeError:
        return None
    return norm if isinstance(norm, torch.nn.Module) else None


def _requires_grad(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (tuple, list)):
        return any(_requires_grad(item) for item in value)
    return False


def _check_no_dropout(model: torch.nn.Module, layers: list[torch.nn.Module]) -> None:
    active = [name for layer in layers for name, m in layer.named_modules()
              if isinstance(m, torch.nn.Dropout) and m.p > 0]
    config = getattr(model, "config", None)
    attention_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0) if config is not None else 0.0
    if active or attention_dropout > 0:
        raise ValueError(
            "offloaded checkpointing recomputes layers without replaying random numbers, so dropout must be off "
            f"(active: {sorted(set(active))[:4]}, attention_dropout={attention_dropout}); set disable_dropout=True"
        )
