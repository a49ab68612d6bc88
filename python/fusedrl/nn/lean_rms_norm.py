"""transformers' RMSNorm with a lean backward: it keeps its input and one float32 rstd per row, and its backward
computes the gradient directly, chunk by chunk, without running the forward again.

    y = weight * (x_f32 * rsqrt(mean(x_f32^2, -1) + eps)).to(x.dtype)        (LlamaRMSNorm, Qwen2/3, Mistral, ...)

Autograd through that keeps float32 (tokens, H) copies of x; `_ChunkedTokens` (fusedrl.nn.chunked_mlp) avoids them
but evaluates the norm a second time in its backward, a third time per step inside a checkpointed layer. Here the
forward repeats the module's op sequence (bitwise its output, under autocast too: autocast casts none of these ops
away from float32) and saves rstd (tokens, 1); the backward evaluates autograd's own derivative formulas in
autograd's order (the casts included), so it rounds as autograd through the module does:

    gf = (grad * weight).to(x.dtype).float()        grad_x = (gf * rstd - x_f32 * rstd^3 * mean(gf * x_f32)).to(x.dtype)
    grad_weight = sum over rows of grad * (x_f32 * rstd).to(x.dtype), accumulated in float32 (float64 for float64)

`is_transformers_rms_norm` recognises the modules whose forward is exactly that formula; others (Gemma's
`1 + weight`, Olmo2's cast after the weight) keep the generic recompute.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _reference_code():
    """LlamaRMSNorm.forward's code: transformers copies that forward into its other RMSNorms."""
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:
        return None
    return LlamaRMSNorm.forward.__code__


def is_transformers_rms_norm(module: torch.nn.Module) -> bool:
    """True for a module whose forward is transformers' RMSNorm formula (the module doc), on a 1-D weight: a class
    named *RMSNorm with `weight` and `variance_epsilon` whose forward is LlamaRMSNorm's code (transformers copies it
    into Qwen2/3, Mistral, ...; a few classes with the same attributes compute something else, e.g. Olmo2)."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and weight.is_floating_point() and isinstance(eps, (int, float)) and not isinstance(eps, bool)):
        return False
    reference, forward = _reference_code(), getattr(type(module).forward, "__code__", None)
    return reference is not None and forward is not None and all(
        getattr(forward, field) == getattr(reference, field) for field in ("co_code", "co_consts", "co_names"))


class _LeanRMSNorm(torch.autograd.Function):
    """The module doc's norm over x (..., H), `chunk_tokens` rows at a time; saves x and rstd (rows, 1) only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, chunk_tokens: int,
                compute_dtype: torch.dtype) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = rows.new_empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype))
        rstd = rows.new_empty((rows.shape[0], 1), dtype=compute_dtype)
        for start in range(0, rows.shape[0], chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            hidden = rows[chunk].to(compute_dtype)
            rstd[chunk] = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
            out[chunk] = weight * (hidden * rstd[chunk]).to(x.dtype)
            del hidden
        ctx.eps, ctx.chunk_tokens = eps, chunk_tokens
        ctx.save_for_backward(x, weight, rstd)
        return out.reshape(x.shape)

    @staticmethod
    @once_differentiable  # rstd is saved as a constant: a second derivative through this would be wrong
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        needs_x, needs_weight = ctx.needs_input_grad[:2]
        rows, grads = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        width = rows.shape[-1]
        grad_x = torch.empty_like(rows) if needs_x else None
        grad_weight = None
        if needs_weight:  # autograd sums grad * y0 in grad's dtype; across chunks we carry float32 (or float64)
            grad_weight = torch.zeros(width, dtype=torch.promote_types(grad_out.dtype, torch.float32),
                                      device=weight.device)
        for start in range(0, rows.shape[0], ctx.chunk_tokens):
            chunk = slice(start, start + ctx.chunk_tokens)
            hidden, rstd_chunk, grad = rows[chunk].to(rstd.dtype), rstd[chunk], grads[chunk]
            if grad_weight is not None:
                grad_weight += (grad * (hidden * rstd_chunk).to(x.dtype)).sum(0, dtype=grad_weight.dtype)
            if grad_x is not None:
                # autograd's order: mul, cast to y0's dtype (the engine), to float32; mul and rsqrt and mean and
                # pow backward (-0.5 * s * rstd^3 / H times 2 x is -x rstd^3 mean(gf x), powers of two exact).
                grad_hidden = (grad * weight).to(x.dtype).to(rstd.dtype)
                coefficient = (-0.5 * (grad_hidden * hidden).sum(-1, keepdim=True)) * rstd_chunk.pow(3) / width * 2.0
                grad_hidden = grad_hidden * rstd_chunk + hidden * coefficient
                grad_x[chunk] = grad_hidden
                del grad_hidden
            del hidden
        return (None if grad_x is None else grad_x.reshape(x.shape),
                None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None)


def lean_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, chunk_tokens: int,
                  compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The norm of the module doc, `chunk_tokens` rows at a time. transformers computes in float32 (also for float64
    inputs); `compute_dtype=torch.float64` lets gradcheck test the derivative itself without float32 noise."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    return _LeanRMSNorm.apply(x, weight, eps, chunk_tokens, compute_dtype)
