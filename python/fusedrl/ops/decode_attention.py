"""Python face of the decode-step ops of the static rollout loop (csrc/kernels/decode_attention.h).

    q_rot = rotary_cache_write(q, k, v, cos, sin, cache_k, cache_v, slot, q_norm=None, k_norm=None, eps=1e-6)
    out = decode_attention(q_rot, cache_k, cache_v, start, slot, scale)
    y = rms_norm(x, weight, eps)

rotary_cache_write applies the optional per-head RMSNorm (Qwen3) and rope to the new token's q and k, writes k and v
into cache slot `slot` (an int64 device scalar, so a CUDA graph can replay the step at every position) and returns
the rotated q; decode_attention attends each row's query heads over cache slots [start[b], slot] (GQA: a kv head
serves heads / kv_heads query heads); rms_norm is transformers' LlamaRMSNorm in one kernel. Inference only (no
autograd).
"""

from __future__ import annotations

import torch

from .. import _ext

_ext.load()

__all__ = ["rotary_cache_write", "decode_attention", "decode_attention_supported", "rms_norm"]

CUDA_HEAD_DIMS = (64, 128)  # decode_attention_cuda_supported in csrc/kernels/decode_attention.cu
CUDA_MAX_GROUP = 16


@torch.library.register_fake("fusedrl::rotary_cache_write")
def _rotary_cache_write_fake(q, k, v, cos, sin, q_norm, k_norm, eps, cache_k, cache_v, slot):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("fusedrl::decode_attention")
def _decode_attention_fake(q, cache_k, cache_v, start, slot, scale, splits):
    return torch.empty_like(q)


@torch.library.register_fake("fusedrl::rms_norm")
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape)


def decode_attention_supported(device: torch.device, dtype: torch.dtype, head_dim: int, group: int) -> bool:
    """Whether both ops run for these shapes on `device` (CPU: any dtype and even head_dim; CUDA: see above)."""
    if head_dim % 2 or dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return False
    if torch.device(device).type == "cpu":
        return True
    return (torch.device(device).type == "cuda" and dtype != torch.float64 and head_dim in CUDA_HEAD_DIMS
            and 1 <= group <= CUDA_MAX_GROUP)


def rotary_cache_write(q, k, v, cos, sin, cache_k, cache_v, slot, q_norm=None, k_norm=None, eps: float = 1e-6):
    """Rotated q (B, H, D); writes rope(norm(k)) and v to cache_k/cache_v[:B, :, slot]. See the module docstring."""
    return torch.ops.fusedrl.rotary_cache_write(q, k, v, cos, sin, q_norm, k_norm, float(eps), cache_k, cache_v,
                                                slot)


def decode_attention(q, cache_k, cache_v, start, slot, scale: float, splits: int = 0):
    """(B, H, D) attention output over slots [start[b], slot]; splits 0: chosen from the shapes (fixed per shape)."""
    return torch.ops.fusedrl.decode_attention(q, cache_k, cache_v, start, slot, float(scale), int(splits))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm (weight * round(x / rms(x))) over the last dimension of x (..., N)."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    return torch.ops.fusedrl.rms_norm(flat, weight, float(eps)).view(x.shape)
