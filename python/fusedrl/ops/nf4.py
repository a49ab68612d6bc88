"""Python face of fusedrl's NF4 ops: bitsandbytes-compatible 4-bit weights and the NF4 + LoRA linear layer.

    packed, state = nf4_quantize(weight)                 # the bytes bitsandbytes' quantize_4bit(nf4) writes
    w = nf4_dequantize(packed, state)                    # bit-identical to bitsandbytes' dequantize_4bit
    y = nf4_lora_linear(x, packed, state, A, B, scaling) # x @ W^T + scaling * (x @ A^T) @ B^T (+ bias)

`packed` may instead be an `NF4Shards` (or a list of (packed, state) pairs), then `state` is None: the shards are
stacked along N. Gradients of nf4_lora_linear flow to x, lora_A, lora_B and bias; the NF4 weight is frozen.
LoRA dropout is the caller's business: the op feeds the same x to both terms. With dropout p > 0, compute
y = nf4_lora_linear(x, packed, state, A, B, 0.0, bias) + scaling * (dropout(x) @ A.T) @ B.T.
The arithmetic, the LoRA folding into one GEMM and the small-M fused kernel are described in csrc/torch/nf4.h.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch

from .. import _ext
from .nf4_state import NESTED_BLOCKSIZE, NF4QuantState, NF4Shards, dynamic_map, nf4_code

_ext.load()

__all__ = ["NF4QuantState", "NF4Shards", "nf4_quantize", "nf4_dequantize", "nf4_lora_linear", "nf4_code",
           "dynamic_map"]

PackedWeight = Union[torch.Tensor, NF4Shards, Sequence[tuple]]
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_AUTOCAST_DEVICES = ("cpu", "cuda")
_LORA_LINEAR = torch.ops.fusedrl.nf4_lora_linear.default


# ---- fakes (meta implementations) ---------------------------------------------------------------------------
@torch.library.register_fake("fusedrl::nf4_quantize")
def _nf4_quantize_fake(weight, blocksize):
    n = weight.numel()
    return (weight.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
            weight.new_empty((-(-n // blocksize),), dtype=torch.float32))


@torch.library.register_fake("fusedrl::blockwise8_quantize")
def _blockwise8_quantize_fake(values, code, blocksize):
    return values.new_empty(values.shape, dtype=torch.uint8), values.new_empty((-(-values.numel() // blocksize),))


@torch.library.register_fake("fusedrl::nf4_dequantize")
def _nf4_dequantize_fake(packed, absmax, nested_absmax, nested_code, offset, rows, cols, blocksize, dtype):
    return packed[0].new_empty((sum(rows), cols), dtype=dtype)


@torch.library.register_fake("fusedrl::nf4_lora_linear")
def _nf4_lora_linear_fake(x, packed, absmax, nested_absmax, nested_code, offset, rows, blocksize, lora_A, lora_B,
                          scaling, bias):
    return x.new_empty((*x.shape[:-1], sum(rows)))


@torch.library.register_fake("fusedrl::nf4_lora_linear_backward")
def _nf4_lora_linear_backward_fake(grad_y, x, packed, absmax, nested_absmax, nested_code, offset, rows, blocksize,
                                   lora_A, lora_B, scaling, output_mask):
    return (x.new_empty(x.shape if output_mask[0] else (0,)),
            lora_A.new_empty(lora_A.shape if output_mask[1] else (0,)),
            lora_B.new_empty(lora_B.shape if output_mask[2] else (0,)))


# The autograd of nf4_lora_linear is registered in C++ (csrc/torch/nf4_autograd.cpp): no Python runs per call.


# ---- public functions -------------------------------------------------------------------------------------------
def _shard_list(packed: PackedWeight, state: NF4QuantState | None) -> list[tuple[torch.Tensor, NF4QuantState]]:
    if isinstance(packed, NF4Shards):
        shards = packed.shards
    elif isinstance(packed, torch.Tensor):
        if not isinstance(state, NF4QuantState):
            raise TypeError(f"NF4: state must be an NF4QuantState for a packed tensor, got {type(state).__name__}")
        shards = [(packed, state)]
    else:
        shards = NF4Shards(list(packed)).shards
    if state is not None and not isinstance(packed, torch.Tensor):
        raise TypeError("NF4: pass state=None with a list of shards (each shard carries its own state)")
    return shards


class _OpArgs(NamedTuple):
    """The ops' weight arguments of one (packed, state) or NF4Shards, built once and cached on the state."""

    packed: list
    absmax: list
    nested_absmax: list
    nested_code: list
    offset: list
    rows: list
    cols: int
    blocksize: int


def _op_args(shards: list[tuple[torch.Tensor, NF4QuantState]]) -> _OpArgs:
    states = [s for _, s in shards]
    nested = states[0].nested
    if any(s.nested != nested or s.blocksize != states[0].blocksize or s.shape[1] != states[0].shape[1]
           for s in states):
        raise ValueError("NF4: all shards must share K, the blocksize and the nesting of the absmax")
    packed = [p.reshape(-1) if p.is_contiguous() else p for p, _ in shards]
    absmax = [s.absmax_q if nested else s.absmax for s in states]
    nested_absmax = [s.nested_absmax for s in states] if nested else []
    nested_code = [s.nested_code for s in states] if nested else []
    # one entry per shard even when unused (plain): an empty float list would change the op's input structure
    offset = [float(s.offset) if nested else 0.0 for s in states]
    rows = [s.shape[0] for s in states]
    return _OpArgs(packed, absmax, nested_absmax, nested_code, offset, rows, states[0].shape[1], states[0].blocksize)


_CACHE_ATTR = "_fusedrl_op_args"


def _cached_op_args(packed: PackedWeight, state: NF4QuantState | None) -> _OpArgs:
    """_op_args of (packed, state), cached on the state (or the NF4Shards) next to the packed tensor it was built
    for: a layer calling the op every step pays for the list building once. The cache is valid while the state's
    tensors are not reassigned (states are replaced, not mutated: `.to()` returns a new state)."""
    holder = packed if isinstance(packed, NF4Shards) else state
    if holder is not None:
        cached = holder.__dict__.get(_CACHE_ATTR)
        if cached is not None and cached[0] is packed:
            return cached[1]
    args = _op_args(_shard_list(packed, state))
    if holder is not None and (isinstance(packed, NF4Shards) or isinstance(packed, torch.Tensor)):
        holder.__dict__[_CACHE_ATTR] = (packed, args)
    return args


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64,
                 compress_statistics: bool = True) -> tuple[torch.Tensor, NF4QuantState]:
    """Quantize a 2-D weight (N, K) to NF4: (packed uint8 (N*K//2, 1), state), the bytes and statistics that
    `bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics, quant_type="nf4")` produces on
    the same device. With compress_statistics the absmax is double-quantized (blocks of 256, dynamic map)."""
    if weight.dim() != 2:
        raise ValueError(f"nf4_quantize: weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"nf4_quantize: weight must be float32, float16 or bfloat16, got {weight.dtype}")
    packed, absmax = torch.ops.fusedrl.nf4_quantize(weight.detach(), blocksize)
    common = dict(shape=tuple(weight.shape), dtype=weight.dtype, blocksize=blocksize,
                  code=nf4_code().to(weight.device))
    if not compress_statistics:
        return packed, NF4QuantState(absmax=absmax, **common)
    offset = absmax.mean()  # the framework's mean, as bitsandbytes computes it
    code = dynamic_map().to(weight.device)
    absmax_q, nested_absmax = torch.ops.fusedrl.blockwise8_quantize(absmax - offset, code, NESTED_BLOCKSIZE)
    return packed, NF4QuantState(absmax_q=absmax_q, nested_absmax=nested_absmax, nested_code=code,
                                 offset=float(offset), **common)


def nf4_dequantize(packed: PackedWeight, state: NF4QuantState | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight (N, K) in out_dtype (default: the state's dtype), bit-identical to bitsandbytes'
    dequantize_4bit; shards are stacked along N."""
    shards = _shard_list(packed, state)
    dtype = out_dtype or shards[0][1].dtype
    a = _cached_op_args(packed, state)
    return torch.ops.fusedrl.nf4_dequantize(a.packed, a.absmax, a.nested_absmax, a.nested_code, a.offset, a.rows,
                                            a.cols, a.blocksize, dtype)


def nf4_lora_linear(x: torch.Tensor, packed: PackedWeight, state: NF4QuantState | None, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + scaling * (x @ lora_A^T) @ lora_B^T (+ bias), W the frozen NF4 weight (N, K).

    x (..., K) in float32, float16, bfloat16 (or float64, for gradchecks); lora_A (r, K) and lora_B (N, r) in one
    floating dtype (the LoRA products run in it); bias (N,). Differentiable w.r.t. x, lora_A, lora_B and bias.
    LoRA dropout is not applied here: with dropout > 0 call it with the undropped x and scaling 0 for the frozen
    path, and add scaling * (dropout(x) @ A^T) @ B^T yourself (or accept the same x for both terms).
    """
    a = _cached_op_args(packed, state)
    if x.shape[-1] != a.cols:
        raise ValueError(f"nf4_lora_linear: x must have K = {a.cols} features (..., {a.cols}), got {tuple(x.shape)}")
    device_type = x.device.type
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        # As peft's LoRA under autocast (its lora_A / lora_B are nn.Linear): every product runs in the autocast
        # dtype, the float32 adapters cast on the way in (their gradients come back in float32 through the cast).
        # Keeping the products in float32 instead cost a float32 copy of x and CUDA-core GEMMs per projection: ~1 s
        # of a 4.6 s Llama-8B QLoRA step at 8 x 4K on an H200 (bench/RESULTS.md).
        dtype = torch.get_autocast_dtype(device_type)
        x = x.to(dtype)
        lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return _LORA_LINEAR(x, a.packed, a.absmax, a.nested_absmax, a.nested_code, a.offset, a.rows, a.blocksize,
                        lora_A, lora_B, float(scaling), bias)
