"""Python face of `fusedrl::fused_linear_logp`: fake (meta) implementation, autograd, and a small wrapper.

The op computes, for hidden (N, H), lm-head weight (V, H) and target ids (N,), the per-token
logp = log_softmax(softcap(hidden @ W^T + b) / T)[target] without ever holding N x V logits.
Gradient strategy, chosen by the wrapper from what requires grad:
- frozen lm-head: the forward pass also returns d logp / d hidden (N, H); backward only scales it by grad_logp.
- trainable lm-head or bias: the forward saves the log-sum-exp; backward recomputes each chunk's logits
  (fusedrl::fused_linear_logp_backward) and produces the gradients of hidden, weight and bias.
"""

from __future__ import annotations

import torch

from .. import _ext

_ext.load()
_OP = torch.ops.fusedrl.fused_linear_logp
_BACKWARD_OP = torch.ops.fusedrl.fused_linear_logp_backward


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fusedrl::fused_linear_logp")
def _fused_linear_logp_fake(hidden, weight, bias, targets, temperature, logit_softcap, return_entropy,
                            compute_grad_direction, chunk_size):
    n = hidden.shape[0]
    acc = _accumulation_dtype(hidden.dtype)
    logp = hidden.new_empty((n,), dtype=acc)
    entropy = hidden.new_empty((n,) if return_entropy else (0,), dtype=acc)
    lse = hidden.new_empty((n,), dtype=acc)
    grad_direction = hidden.new_empty((n, hidden.shape[1]) if compute_grad_direction else (0,))
    return logp, entropy, lse, grad_direction


@torch.library.register_fake("fusedrl::fused_linear_logp_backward")
def _fused_linear_logp_backward_fake(grad_logp, hidden, weight, bias, targets, lse, temperature, logit_softcap,
                                     output_mask, chunk_size):
    grad_hidden = hidden.new_empty(hidden.shape if output_mask[0] else (0,))
    grad_weight = weight.new_empty(weight.shape if output_mask[1] else (0,))
    grad_bias = weight.new_empty((weight.shape[0],) if output_mask[2] and bias is not None else (0,))
    return grad_hidden, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, logit_softcap, _, compute_grad_direction, chunk_size = inputs
    _, entropy, lse, grad_direction = output
    ctx.mark_non_differentiable(entropy, lse, grad_direction)
    ctx.compute_grad_direction = compute_grad_direction
    ctx.options = (temperature, logit_softcap, chunk_size)
    ctx.has_bias = bias is not None
    if compute_grad_direction:
        ctx.save_for_backward(grad_direction)
    else:
        ctx.save_for_backward(hidden, weight, bias, targets, lse)


def _backward(ctx, grad_logp, _grad_entropy, _grad_lse, _grad_direction):
    if ctx.compute_grad_direction:
        (grad_direction,) = ctx.saved_tensors
        # In the direction's dtype: a float32 product would briefly hold an (N, H) float32 temporary.
        grad_hidden = grad_direction * grad_logp.unsqueeze(-1).to(grad_direction.dtype)
        return grad_hidden, None, None, None, None, None, None, None, None
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    temperature, logit_softcap, chunk_size = ctx.options
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grad_hidden, grad_weight, grad_bias = _BACKWARD_OP(
        grad_logp, hidden, weight, bias, targets, lse, temperature, logit_softcap, mask, chunk_size)
    return (grad_hidden if mask[0] else None, grad_weight if mask[1] else None, grad_bias if mask[2] else None,
            None, None, None, None, None, None)


torch.library.register_autograd("fusedrl::fused_linear_logp", _backward, setup_context=_setup_context)


def linear_logp(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logp (N,) of `targets` under softcap(hidden @ weight^T + bias) / temperature, and entropy (N,).

    logp is float32 (float64 for float64 inputs) and differentiable w.r.t. hidden, weight and bias;
    entropy is a metric without gradient. chunk_size (tokens per chunk) defaults to a memory budget.
    """
    device_type = hidden.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        # As nn.Linear under autocast: the lm-head GEMM runs in the autocast dtype.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    head_trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    compute_grad_direction = needs_grad and hidden.requires_grad and not head_trainable
    logp, entropy, _, _ = _OP(hidden, weight, bias, targets, float(temperature),
                              None if logit_softcap is None else float(logit_softcap), return_entropy,
                              compute_grad_direction, chunk_size)
    return logp, (entropy if return_entropy else None)
