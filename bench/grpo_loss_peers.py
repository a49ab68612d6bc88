"""The peers of bench_grpo_loss.py, each set up as its users set it up, and the random inputs they share.

  naive    PyTorch as TRL does it (fusedrl.ops.reference, or the leaner inline version below)
  liger    Liger-Kernel's LigerFusedLinearGRPOLoss with the arguments TRL passes (its default chunk_size)
  fusedrl  fusedrl.ops.grpo_loss / fusedrl.ops.selective_logp
A step runs forward + backward (or the no-grad forward for logprob-only) and returns what the checks compare.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass
class Inputs:
    hidden: torch.Tensor  # (B, T, H)
    weight: torch.Tensor  # (V, H)
    completion_ids: torch.Tensor  # (B, T) long
    completion_mask: torch.Tensor  # (B, T) long, whole-row tail masking
    advantages: torch.Tensor  # (B,) fp32
    old_logp: torch.Tensor | None  # (B, T) fp32

    def footprint_bytes(self) -> int:
        tensors = [self.hidden, self.weight, self.completion_ids, self.completion_mask, self.advantages]
        if self.old_logp is not None:
            tensors.append(self.old_logp)
        return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------------------------- inputs


def chunked_logp(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """Per-token logp without holding all N x V logits (used only to make realistic old_logp)."""
    flat_hidden, flat_ids = hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1)
    out = torch.empty(flat_ids.shape, dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for start in range(0, flat_ids.numel(), rows):
            logits = (flat_hidden[start : start + rows] @ weight.t()).float()
            out[start : start + rows] = logits.gather(-1, flat_ids[start : start + rows, None]).squeeze(-1) - (
                logits.logsumexp(-1)
            )
    return out.reshape(ids.shape)


def make_inputs(
    shape: Any, n_tokens: int, seq_len: int, masked_fraction: float, dtype: torch.dtype,
    device: torch.device, seed: int,
) -> Inputs:
    """Random inputs; each row keeps a prefix of tokens (a completion) and masks its tail."""
    if n_tokens % seq_len != 0:
        raise ValueError(f"n_tokens={n_tokens} must be a multiple of --seq-len={seq_len}")
    if not 0.0 <= masked_fraction < 1.0:
        raise ValueError(f"--masked-fraction must be in [0, 1), got {masked_fraction}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batch = n_tokens // seq_len
    hidden = torch.randn(batch, seq_len, shape.hidden, generator=gen, dtype=torch.float32).to(device, dtype)
    weight = (torch.randn(shape.vocab, shape.hidden, generator=gen) / math.sqrt(shape.hidden)).to(device, dtype)
    ids = torch.randint(0, shape.vocab, (batch, seq_len), generator=gen).to(device)
    # Masked tail length uniform in [0, 2 * masked_fraction * T], so about masked_fraction of tokens are masked.
    tail = (torch.rand(batch, generator=gen) * 2 * masked_fraction * seq_len).long().clamp(max=seq_len - 1)
    lengths = seq_len - tail
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long().to(device)
    advantages = torch.randn(batch, generator=gen).to(device)
    logp = chunked_logp(hidden, weight, ids)
    old_logp = logp + 0.05 * torch.randn(logp.shape, generator=gen).to(device)
    return Inputs(hidden, weight, ids, mask, advantages, old_logp)


# --------------------------------------------------------------------------------------------- naive path


def naive_logp(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()  # (B, T, V) in the input dtype, materialised
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def naive_grpo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor | None, mask: torch.Tensor, advantages: torch.Tensor,
    level: str, epsilon: float,
) -> torch.Tensor:
    """TRL's dapo loss (clipped surrogate, normalised by this batch's active tokens), token or sequence level."""
    mask = mask.to(logp.dtype)
    old = logp.detach() if old_logp is None else old_logp
    log_ratio = logp - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon)
    adv = advantages.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


# --------------------------------------------------------------------------------------------- implementations

StepResult = dict[str, torch.Tensor]  # "loss" / "logp" -> tensor
Step = Callable[[], StepResult]


def naive_source(choice: str) -> str:
    """'reference' (fusedrl.ops.reference, TRL-like: also computes the entropy) when importable, else 'inline'."""
    if choice == "reference":
        try:
            from fusedrl.ops.reference import grpo_loss_reference, selective_logp_reference  # noqa: F401
        except ImportError:
            return "inline"
    return choice


def build_naive(inputs: Inputs, level: str | None, epsilon: float, source: str) -> Step:
    """level: importance_sampling_level, None for logprob-only."""
    if source == "reference":
        from fusedrl.ops.reference import grpo_loss_reference, selective_logp_reference

        def logp_fn(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return selective_logp_reference(hidden, weight, ids)[0]

        def loss_fn() -> torch.Tensor:
            return grpo_loss_reference(
                inputs.hidden, inputs.weight, inputs.completion_ids, inputs.completion_mask, inputs.advantages,
                old_logp=inputs.old_logp, loss_type="dapo", importance_sampling_level=level,
                epsilon=epsilon).loss
    else:
        logp_fn = naive_logp

        def loss_fn() -> torch.Tensor:
            logp = naive_logp(inputs.hidden, inputs.weight, inputs.completion_ids)
            return naive_grpo_loss(logp, inputs.old_logp, inputs.completion_mask, inputs.advantages, level,
                                   epsilon)

    if level is None:
        def logprob_step() -> StepResult:
            with torch.no_grad():
                return {"logp": logp_fn(inputs.hidden, inputs.weight, inputs.completion_ids)}
        return logprob_step

    def loss_step() -> StepResult:
        loss = loss_fn()
        loss.backward()
        return {"loss": loss.detach()}
    return loss_step


def liger_version() -> str | None:
    try:
        return importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return None


def build_liger(inputs: Inputs, level: str | None, epsilon: float, compiled: bool) -> Step:
    """Liger configured as TRL configures it (its default chunk_size); raises ImportError when Liger is not
    importable (the caller records the reason)."""
    if level is None:
        # Liger exposes no public logprob-only op; its GRPO loss computes logp through this chunked helper.
        from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

        def logprob_step() -> StepResult:
            with torch.no_grad():
                return {"logp": LigerFusedLinearPPOBase.chunk_forward(
                    inputs.hidden, inputs.weight, inputs.completion_ids)}
        return logprob_step

    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_module = LigerFusedLinearGRPOLoss(
        beta=0.0, compiled=compiled, use_ref_model=False, epsilon_low=epsilon,
        epsilon_high=epsilon, loss_type="dapo", importance_sampling_level=level, temperature=1.0,
    )

    def loss_step() -> StepResult:
        out = loss_module(inputs.hidden, inputs.weight, inputs.completion_ids, inputs.completion_mask,
                          inputs.advantages, old_per_token_logps=inputs.old_logp)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return {"loss": loss.detach()}
    return loss_step


def build_fusedrl(inputs: Inputs, level: str | None, epsilon: float) -> Step:
    """Raises ImportError when fusedrl.ops lacks the ops (the caller records the reason)."""
    from fusedrl.ops import grpo_loss, selective_logp

    if level is None:
        def logprob_step() -> StepResult:
            logp, _ = selective_logp(inputs.hidden, inputs.weight, inputs.completion_ids)
            return {"logp": logp}
        return logprob_step

    def loss_step() -> StepResult:
        out = grpo_loss(inputs.hidden, inputs.weight, inputs.completion_ids, inputs.completion_mask,
                        inputs.advantages, old_logp=inputs.old_logp, loss_type="dapo",
                        importance_sampling_level=level, epsilon=epsilon)
        out.loss.backward()
        return {"loss": out.loss.detach()}
    return loss_step


def liger_default_chunk_size() -> int | None:
    """The chunk_size LigerFusedLinearGRPOLoss uses when its caller (TRL) does not pass one."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    parameter = inspect.signature(LigerFusedLinearGRPOLoss.__init__).parameters.get("chunk_size")
    return None if parameter is None else parameter.default
