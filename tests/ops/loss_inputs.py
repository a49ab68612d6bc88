"""Random inputs for the loss op tests: odd shapes, masked rows, peaked logits."""

from __future__ import annotations

import torch


def lm_head_inputs(n, h, v, dtype, device="cpu", *, peaked=True, bias=False, scale=1.0, generator=None):
    """hidden (n, h), weight (v, h), targets (n,), bias (v,) or None. With `peaked`, some weight rows are copies
    of hidden rows so that some logits dominate their row, as trained models produce."""
    g = generator
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    if peaked and n > 0:
        rows = torch.randint(0, v, (min(n, v, 3),), generator=g)
        weight[rows] = hidden[: len(rows)] * 2.0 / max(1.0, float(hidden[: len(rows)].norm(dim=-1).mean()))
    targets = torch.randint(0, v, (n,), generator=g)
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), targets.to(device), cast(b)


def completion_mask(b, t, generator=None, device="cpu"):
    """Right-padded completions of random lengths; the last row is fully masked when b > 1."""
    lengths = torch.randint(1, t + 1, (b,), generator=generator)
    if b > 1:
        lengths[-1] = 0
    return (torch.arange(t)[None, :] < lengths[:, None]).long().to(device)
