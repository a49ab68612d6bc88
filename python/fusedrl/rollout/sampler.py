"""One sampling step on the device, in fixed shapes (so it can be captured in a CUDA graph).

Input: raw logits (B, V) of the model's dtype, a (B, V) bool `seen` mask of tokens already in each row (prompt and
completion, for the repetition penalty) and one uniform number per row in [0, 1). Output: the chosen token (B,)
and its sampler log-probability log_softmax(raw_logits / temperature) (B,) in float32, the quantity every engine
reports (`RolloutOutput.sampling_logp`), computed from a (B,) log-sum-exp, so no per-step (B, V) tensor outlives
the step.

The filter chain follows transformers' processors in `generate`'s order and semantics (repetition penalty,
temperature, top-k keeping ties, top-p removing the low tail whose mass is <= 1 - top_p, min-p relative to the top
probability, each keeping at least one token); greedy takes the argmax after the repetition penalty. A token is
drawn by inverting the cumulative distribution of the filtered probabilities (natural vocabulary order) at the
row's uniform number, so the random numbers are (B,) per step and can be drawn up front from the caller's
generator: the same generator state gives the same tokens.
"""

from __future__ import annotations

import torch

from fusedrl.rollout.base import SamplingConfig


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule on seen tokens: negative logits times `penalty`, positive ones divided by it."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the tokens whose logit is >= the k-th largest (ties kept), -inf elsewhere."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Drop the least likely tokens whose total probability is <= 1 - top_p; the most likely token always stays."""
    sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, sorted_index, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability (the top token stays)."""
    probs = logits.softmax(dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(remove, float("-inf"))


def filtered_logits(logits: torch.Tensor, seen: torch.Tensor | None, sampling: SamplingConfig) -> torch.Tensor:
    """The float32 logits the sampler draws from (or takes the argmax of, when greedy)."""
    scores = logits.float()
    if sampling.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty != 1 needs the `seen` mask of tokens already in each row")
        scores = apply_repetition_penalty(scores, seen, sampling.repetition_penalty)
    if sampling.greedy:
        return scores
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if sampling.top_k > 0:
        scores = top_k_filter(scores, sampling.top_k)
    if sampling.top_p < 1.0:
        scores = top_p_filter(scores, sampling.top_p)
    if sampling.min_p is not None:
        scores = min_p_filter(scores, sampling.min_p)
    return scores


def _chunk_width(vocab: int) -> int:
    """The largest power of two <= 512 dividing `vocab` (0 when below 64: one scan over the vocabulary then)."""
    width = 512
    while width >= 64 and vocab % width:
        width //= 2
    return width if width >= 64 else 0


def draw_by_inverse_cdf(scores: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Token index per row with probability softmax(scores): the first index whose cumulative mass exceeds u.

    In two levels where the vocabulary splits into chunks (a scan over a 128K vocabulary is one slow kernel per
    row): the chunk whose cumulative mass first exceeds the target, then the index inside it. The target is clamped
    below the total (and below the chunk's own mass), so the chosen token always has positive probability."""
    probs = scores.softmax(dim=-1)
    width = _chunk_width(probs.shape[-1])
    if not width:
        cumulative = probs.cumsum(dim=-1)
        total = cumulative[..., -1:]
        # u * total < total for u < 1; the clamp guards float rounding, so a zero-probability tail is never chosen.
        target = torch.minimum(uniform.unsqueeze(-1).float() * total, total * (1 - 2**-20))
        index = torch.searchsorted(cumulative, target, right=True).squeeze(-1)
        return index.clamp_(max=scores.shape[-1] - 1)
    rows, vocab = probs.shape
    chunks = probs.view(rows, vocab // width, width)
    chunk_cumulative = chunks.sum(dim=-1).cumsum(dim=-1)  # (rows, chunks)
    total = chunk_cumulative[:, -1:]
    target = torch.minimum(uniform.unsqueeze(-1).float() * total, total * (1 - 2**-20))
    chunk = torch.searchsorted(chunk_cumulative, target, right=True).clamp_(max=vocab // width - 1)  # (rows, 1)
    before = chunk_cumulative.gather(1, (chunk - 1).clamp(min=0)) * (chunk > 0)
    inside = chunks.gather(1, chunk[..., None].expand(rows, 1, width)).squeeze(1).cumsum(dim=-1)  # (rows, width)
    inner_target = torch.minimum(target - before, inside[:, -1:] * (1 - 2**-20))
    offset = torch.searchsorted(inside, inner_target, right=True).clamp_(max=width - 1)
    return (chunk * width + offset).squeeze(-1)


def sample_step(
    logits: torch.Tensor, seen: torch.Tensor | None, uniform: torch.Tensor, sampling: SamplingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token (B,) long, sampling logp (B,) float32) for raw `logits` (B, V); see the module docstring."""
    raw = logits.float() / sampling.temperature
    scores = filtered_logits(logits, seen, sampling)
    token = scores.argmax(dim=-1) if sampling.greedy else draw_by_inverse_cdf(scores, uniform)
    logp = raw.gather(-1, token.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(raw, dim=-1)
    return token, logp
