"""float64 references of the decode-step ops (rotary_cache_write, decode_attention), for tests."""

from __future__ import annotations

import torch


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: torch.Tensor | None = None,
                   eps: float = 1e-6) -> torch.Tensor:
    """float64 rope(norm(x)) for x (B, heads, D), cos/sin (B, D); norm: a per-head RMSNorm weight (D,) or None."""
    x = x.double().cpu()
    if norm is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.double().cpu()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.double().cpu()[:, None] + rotated * sin.double().cpu()[:, None]


def decode_attention_reference(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start, slot: int,
                               scale: float) -> torch.Tensor:
    """float64 softmax attention of q (B, H, D) over cache slots [start[b], slot] of each row (kv head h // group);
    zeros for a row with nothing to attend."""
    batch, heads, _ = q.shape
    group = heads // cache_k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        first = int(start[b])
        if first > slot:
            continue
        keys = cache_k[b, :, first : slot + 1].double().cpu().repeat_interleave(group, dim=0)  # (H, T, D)
        values = cache_v[b, :, first : slot + 1].double().cpu().repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,htd->ht", q[b].double().cpu(), keys) * scale
        out[b] = torch.einsum("ht,htd->hd", scores.softmax(dim=-1), values)
    return out


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 weight * x / sqrt(mean(x^2) + eps) over the last dimension."""
    x = x.double().cpu()
    return weight.double().cpu() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
