"""Plain-PyTorch references of the NF4 ops (ground truth for the tests; no compiled code).

The dequantization reference is float64: value = code[q] * absmax, with the absmax of a nested state decoded in
float32 exactly as bitsandbytes does (the stored statistic is defined by that float32 arithmetic). Rounding the
float64 value to float32 and then to the output dtype is what the kernels compute (one float32 product: the
float64 product of two float32 numbers rounded to float32 is that product).
"""

from __future__ import annotations

import torch

from .nf4_state import NF4QuantState


def nf4_absmax_reference(state: NF4QuantState) -> torch.Tensor:
    """Per-block float32 scales: plain, or fl(fl(nested_code[q] * nested_absmax[b // 256]) + offset)."""
    if not state.nested:
        return state.absmax.float()
    scaled = state.nested_code[state.absmax_q.long()] * state.nested_absmax.repeat_interleave(256)[: state.nblocks]
    return scaled + torch.tensor(state.offset, dtype=torch.float32, device=scaled.device)


def nf4_codes_reference(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit codes of a packed weight, high nibble first, as int64 (numel,)."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)
    return codes[:numel].long()


def nf4_dequantize_reference(packed: torch.Tensor, state: NF4QuantState) -> torch.Tensor:
    """W (N, K) in float64."""
    n, k = state.shape
    codes = nf4_codes_reference(packed, n * k)
    scale = nf4_absmax_reference(state).double().repeat_interleave(state.blocksize)[: n * k]
    return (state.code.double()[codes] * scale).reshape(n, k)


def nf4_quantize_reference(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int64 (numel,), absmax float32): nearest NF4 value of x / absmax per block, ties to the lower code,
    the scaled value computed in float32 as x * (1 / absmax) (x / absmax in a partial last block)."""
    x = weight.reshape(-1).float()
    n = x.numel()
    code = torch.ops.fusedrl.nf4_code().to(x.device)
    bounds = (code[:-1] + code[1:]) / 2
    absmax = torch.stack([x[i:i + blocksize].abs().max() for i in range(0, n, blocksize)])
    safe = absmax.clamp(min=1e-38)
    full = n // blocksize * blocksize
    scaled = torch.cat([x[:full] * (1.0 / safe[: full // blocksize]).repeat_interleave(blocksize),
                        x[full:] / safe[-1] if full < n else x[:0]]).clamp(-1, 1)
    return torch.bucketize(scaled, bounds), absmax


def nf4_lora_linear_reference(x, weight, lora_A, lora_B, scaling, bias=None):
    """x @ W^T + scaling * (x @ A^T) @ B^T (+ bias) in the inputs' dtype (pass float64 tensors for the truth)."""
    y = x @ weight.t() + scaling * ((x @ lora_A.t()) @ lora_B.t())
    return y if bias is None else y + bias
