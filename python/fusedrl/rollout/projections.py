"""Linear layers that read the same input (q/k/v, gate/up, or one layer alone) as few GEMMs, LoRA applied live.

For plain `nn.Linear` bases (optionally wrapped by a peft LoRA Linear with one plain active adapter) a group runs
  low = x @ A_cat^T                                   one GEMM for the A side of every adapter in the group
  y_i = [bias_i +] x @ W_i^T                           the base GEMM (a bias in its epilogue)
  y_i += low[:, r_i] @ (s_i B_i)^T                     one beta=1 GEMM per adapter
and with a residual (a single module): residual += x @ W^T, residual += low @ (s B)^T, in place (beta=1 GEMMs, no
add kernel, no copy).
so a LoRA layer costs two GEMMs (plus its share of the A GEMM) instead of peft's six kernels. The base weights are
the model's own (never copied); A_cat and s_i B_i are small copies of the adapters in the base dtype, rewritten in
place by `refresh()` at the start of every generation call, so each rollout uses the current adapters and a CUDA
graph that read the buffers stays valid. peft keeps adapters in float32 over a bf16 base: the copies round them
to bf16 (relative error 2^-9 of the LoRA term, well inside bf16 noise of the layer output).

Anything else (a quantized base layer, DoRA, several active adapters, dropout in training mode, biased adapters)
runs each module as-is via `fallback`.
"""

from __future__ import annotations

from typing import Callable

import torch


def _active_lora(module: torch.nn.Module):
    """(A weight, B weight, scaling) of a peft LoRA Linear with one plain active adapter; None for a plain
    nn.Linear; raises LookupError when the module is neither (it then runs as-is)."""
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if lora_a is None:
        if type(module) is torch.nn.Linear:
            return None
        raise LookupError(type(module).__name__)
    if getattr(module, "fuses_lora", False) or module.merged or module.training:
        raise LookupError("fused, merged or training")
    base = getattr(module, "base_layer", None)
    if type(base) is not torch.nn.Linear:
        raise LookupError("base layer is not nn.Linear")
    if module.disable_adapters:
        return None
    active = [name for name in module.active_adapters if name in lora_a]
    if not active:
        return None
    if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
        raise LookupError("several adapters or a variant")
    a, b = lora_a[active[0]], lora_b[active[0]]
    if a.bias is not None or b.bias is not None or not isinstance(a, torch.nn.Linear):
        raise LookupError("biased adapter")
    return a.weight, b.weight, float(module.scaling[active[0]])


def _base_linear(module: torch.nn.Module) -> torch.nn.Linear:
    return module if type(module) is torch.nn.Linear else module.base_layer


class ProjectionGroup:
    """`modules` read the same input; `fallback(module, x)` runs one module as-is when the group cannot be fused."""

    def __init__(self, modules: list[torch.nn.Module], fallback: Callable) -> None:
        self.modules = list(modules)
        self.fallback = fallback
        self.fused = False
        self.a_cat: torch.Tensor | None = None  # (sum r, in)
        self.b_scaled: list[torch.Tensor | None] = []  # per module (out, r) or None
        self.ranks: list[tuple[int, int]] = []  # per module: columns of `low`
        self._layout: tuple | None = None

    def refresh(self) -> bool:
        """Re-reads which modules are fusable and copies their current adapters into the buffers (in place when
        the layout is unchanged). Returns True when the buffers were re-allocated (captured graphs are stale)."""
        try:
            adapters = [_active_lora(m) for m in self.modules]
        except LookupError:
            changed = self.fused or self._layout is not None
            self.fused, self.a_cat, self.b_scaled, self._layout = False, None, [], None
            return changed
        weights = [_base_linear(m).weight for m in self.modules]
        dtype, device = weights[0].dtype, weights[0].device
        if any(w.dtype != dtype or w.device != device for w in weights):
            self.fused, self._layout = False, None
            return True
        layout = (dtype, device, tuple(None if a is None else tuple(a[0].shape) for a in adapters))
        reallocate = layout != self._layout
        ranks, column = [], 0
        for adapter in adapters:
            rank = 0 if adapter is None else adapter[0].shape[0]
            ranks.append((column, column + rank))
            column += rank
        with torch.no_grad():
            if reallocate:
                self.a_cat = weights[0].new_empty((column, weights[0].shape[1])) if column else None
                self.b_scaled = [None if a is None else a[1].new_empty(a[1].shape, dtype=dtype) for a in adapters]
            for (start, end), adapter, b_copy in zip(ranks, adapters, self.b_scaled):
                if adapter is not None:
                    self.a_cat[start:end].copy_(adapter[0])
                    torch.mul(adapter[1], adapter[2], out=b_copy)
        self.ranks, self.fused, self._layout = ranks, True, layout
        return reallocate

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[module(x)] for x (..., in). With a residual (..., out) (groups of one module only): [residual +
        module(x)], computed in place in `residual` when it is contiguous (the caller's tensor is overwritten)."""
        if not self.fused:
            outs = [self.fallback(m, x) for m in self.modules]
            return outs if residual is None else [residual + y for y in outs]
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        low = torch.mm(flat, self.a_cat.t()) if self.a_cat is not None else None
        outs = []
        for module, (start, end), b_scaled in zip(self.modules, self.ranks, self.b_scaled):
            base = _base_linear(module)
            if residual is not None and base.bias is None and residual.is_contiguous():
                y = residual.view(-1, residual.shape[-1]).addmm_(flat, base.weight.t())
            elif residual is not None and base.bias is None:
                y = torch.addmm(residual.reshape(-1, residual.shape[-1]), flat, base.weight.t())
            elif base.bias is not None:
                y = torch.addmm(base.bias, flat, base.weight.t())
                if residual is not None:
                    y += residual.reshape(-1, residual.shape[-1])
            else:
                y = torch.mm(flat, base.weight.t())
            if b_scaled is not None:
                y.addmm_(low[:, start:end], b_scaled.t())
            outs.append(y.view(*lead, y.shape[-1]))
        return outs

