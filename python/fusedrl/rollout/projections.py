"""Linear layers that read the same input (q/k/v, gate/up, or one layer alone) as few GEMMs, LoRA applied live.

For plain `nn.Linear` bases (optionally wrapped by a peft LoRA Linear with one plain active adapter) a group of n
layers with adapters runs n + 2 GEMMs, all writing one (M, sum of outputs) buffer:
  low = x @ A_cat^T                        the A side of every adapter in the group (A_cat: the A's stacked)
  y   = [bias_cat +] low @ B_blk^T          B_blk: block-diagonal, block i = s_i B_i (zero for a layer without one)
  y[:, cols_i] += x @ W_i^T                 the base GEMM of each layer accumulates into its columns (beta = 1)
and the layers' outputs are column views of y. With a residual (groups of one layer) the residual itself is the
buffer: residual += low @ (s B)^T, residual += x @ W^T, in place (no add kernel, no copy). Layers without adapters
run as F.linear. peft's four to six kernels per LoRA layer become about two.

The base weights are the model's own (never copied); A_cat, B_blk and the concatenated bias are small copies in the
base dtype, rewritten in place by `refresh()` at the start of every generation call, so each rollout uses the
current adapters and a CUDA graph that read the buffers stays valid. peft keeps adapters in float32 over a bf16
base: the copies round them to bf16, and the LoRA term is rounded once before the base GEMM adds into it (relative
error ~2^-9 of the LoRA term, far inside the bf16 rounding of the layer output).

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
        self.a_cat: torch.Tensor | None = None  # (sum r, in), None when no layer has an adapter
        self.b_block: torch.Tensor | None = None  # (sum out, sum r) block-diagonal s_i B_i
        self.bias_cat: torch.Tensor | None = None  # (sum out,) when a layer has a bias
        self.columns: list[tuple[int, int]] = []  # per module: its columns of the output buffer
        self._layout: tuple | None = None

    def refresh(self) -> bool:
        """Re-reads which modules are fusable and copies their current adapters (and biases) into the buffers, in
        place when the layout is unchanged. Returns True when the buffers changed (captured graphs are stale)."""
        try:
            adapters = [_active_lora(m) for m in self.modules]
        except LookupError:
            return self._unfuse()
        bases = [_base_linear(m) for m in self.modules]
        dtype, device = bases[0].weight.dtype, bases[0].weight.device
        if any(b.weight.dtype != dtype or b.weight.device != device for b in bases):
            return self._unfuse()
        has_bias = any(b.bias is not None for b in bases)
        layout = (dtype, device, has_bias, tuple(None if a is None else tuple(a[0].shape) for a in adapters))
        reallocate = layout != self._layout
        outs = [b.weight.shape[0] for b in bases]
        columns = [(sum(outs[:i]), sum(outs[: i + 1])) for i in range(len(outs))]
        ranks = [0 if a is None else a[0].shape[0] for a in adapters]
        with torch.no_grad():
            if reallocate:
                total_rank, total_out = sum(ranks), sum(outs)
                lora = total_rank > 0
                self.a_cat = bases[0].weight.new_empty((total_rank, bases[0].weight.shape[1])) if lora else None
                self.b_block = bases[0].weight.new_zeros((total_out, total_rank)) if lora else None
                self.bias_cat = bases[0].weight.new_zeros(total_out) if has_bias and lora else None
            rank0 = 0
            for (col0, col1), rank, adapter, base in zip(columns, ranks, adapters, bases):
                if adapter is not None:
                    self.a_cat[rank0 : rank0 + rank].copy_(adapter[0])
                    torch.mul(adapter[1], adapter[2], out=self.b_block[col0:col1, rank0 : rank0 + rank])
                if self.bias_cat is not None and base.bias is not None:
                    self.bias_cat[col0:col1].copy_(base.bias)
                rank0 += rank
        self.columns, self.fused, self._layout = columns, True, layout
        return reallocate

    def release(self) -> None:
        """Frees the adapter copies (the engine's sleep); the next `refresh()` re-allocates them."""
        self._unfuse()

    def _unfuse(self) -> bool:
        """Back to running each module as-is, buffers freed; True when the group was fused or laid out before."""
        changed = self.fused or self._layout is not None
        self.fused, self.a_cat, self.b_block, self.bias_cat, self._layout = False, None, None, None, None
        return changed

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[module(x)] for x (..., in), possibly column views of one buffer. With a residual (..., out) (groups of
        one module): [residual + module(x)], computed in place in `residual` when it is contiguous."""
        if not self.fused:
            outs = [self.fallback(m, x) for m in self.modules]
            return outs if residual is None else [residual + y for y in outs]
        if residual is not None and len(self.modules) != 1:
            raise ValueError("a residual is added to groups of one module only")
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        bases = [_base_linear(m) for m in self.modules]
        if self.a_cat is None:  # no adapters: the model's own linear layers
            outs = []
            for base in bases:
                if residual is not None and base.bias is None and residual.is_contiguous():
                    y = residual.view(-1, residual.shape[-1]).addmm_(flat, base.weight.t())
                else:
                    y = torch.nn.functional.linear(flat, base.weight, base.bias)
                    y = y if residual is None else y + residual.reshape(y.shape)
                outs.append(y.view(*lead, y.shape[-1]))
            return outs
        low = torch.mm(flat, self.a_cat.t())
        if residual is not None and residual.is_contiguous():
            out = residual.view(-1, residual.shape[-1])
            out.addmm_(low, self.b_block.t())
            if self.bias_cat is not None:
                out += self.bias_cat
        elif self.bias_cat is not None:
            out = torch.addmm(self.bias_cat, low, self.b_block.t())
        else:
            out = torch.mm(low, self.b_block.t())
        for (col0, col1), base in zip(self.columns, bases):
            out[:, col0:col1].addmm_(flat, base.weight.t())
        if residual is not None and not residual.is_contiguous():
            out = out + residual.reshape(out.shape)
        return [out[:, col0:col1].view(*lead, col1 - col0) for col0, col1 in self.columns]
