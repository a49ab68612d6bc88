"""GPU sampler filters against transformers' logits processors on fixed logits, and inverse-CDF draws."""

from __future__ import annotations

import pytest
import torch
import transformers

from fusedrl.rollout.base import SamplingConfig
from fusedrl.rollout.sampler import draw_by_inverse_cdf, filtered_logits, sample_step


def _logits(seed: int, rows: int = 5, vocab: int = 67) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * 3
    logits[0, :4] = logits[0, 4]  # ties at the top of one row
    logits[1, 7] = 30.0  # a sharply peaked row
    return logits


def _transformers_chain(sampling: SamplingConfig) -> transformers.LogitsProcessorList:
    chain = []
    if sampling.repetition_penalty != 1.0:
        chain.append(transformers.RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.temperature != 1.0:
        chain.append(transformers.TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k > 0:
        chain.append(transformers.TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        chain.append(transformers.TopPLogitsWarper(sampling.top_p))
    if sampling.min_p is not None:
        chain.append(transformers.MinPLogitsWarper(sampling.min_p))
    return transformers.LogitsProcessorList(chain)


@pytest.mark.parametrize("options", [
    dict(top_k=5), dict(top_k=1), dict(top_p=0.8), dict(top_p=0.05), dict(min_p=0.1), dict(min_p=1.0),
    dict(repetition_penalty=1.3), dict(repetition_penalty=0.7, temperature=0.6, top_k=9, top_p=0.9, min_p=0.05),
])
def test_filters_match_transformers_processors(options):
    logits = _logits(seed=len(str(options)))
    history = torch.randint(0, logits.shape[1], (logits.shape[0], 6), generator=torch.Generator().manual_seed(1))
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, history, True)
    sampling = SamplingConfig(max_new_tokens=1, **options)
    expected = _transformers_chain(sampling)(history, logits.clone())
    ours = filtered_logits(logits, seen, sampling)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected)), options
    finite = ~torch.isinf(expected)
    torch.testing.assert_close(ours[finite], expected[finite], rtol=1e-6, atol=1e-6)


def test_inverse_cdf_frequencies_match_softmax():
    scores = torch.tensor([[0.0, 1.0, float("-inf"), 2.0, -1.0]])
    uniforms = torch.rand(40000, generator=torch.Generator().manual_seed(3))
    tokens = draw_by_inverse_cdf(scores.expand(40000, -1), uniforms)
    frequencies = torch.bincount(tokens, minlength=5).float() / 40000
    probs = scores.softmax(-1)[0]
    assert frequencies[2] == 0  # a filtered token is never drawn
    torch.testing.assert_close(frequencies, probs, atol=0.01, rtol=0)  # 4 sigma of a 40000-draw frequency


@pytest.mark.parametrize("vocab", [5, 640, 1536])
def test_inverse_cdf_in_chunks_matches_one_scan(vocab):
    """Vocabularies that split into chunks draw the same tokens as one scan (up to float rounding at a boundary),
    and never a filtered token, also when whole chunks are filtered."""
    generator = torch.Generator().manual_seed(vocab)
    scores = torch.randn(64, vocab, generator=generator) * 3
    scores[:, : vocab // 2] = float("-inf")  # whole leading chunks of zero probability
    scores[:, -1] = float("-inf")  # and a zero-probability tail
    uniforms = torch.rand(64, generator=generator)
    uniforms[:2] = torch.tensor([0.0, 1 - 2**-24])
    tokens = draw_by_inverse_cdf(scores, uniforms)
    cumulative = scores.softmax(-1).double().cumsum(-1)
    expected = torch.searchsorted(cumulative, (uniforms.double() * cumulative[:, -1])[:, None], right=True)
    assert torch.isfinite(scores.gather(1, tokens[:, None])).all()
    assert (tokens == expected.squeeze(1).clamp(max=vocab - 1)).float().mean() >= 0.95
    frequencies_scores = scores[:1].expand(20000, -1)
    draws = draw_by_inverse_cdf(frequencies_scores, torch.rand(20000, generator=generator))
    frequencies = torch.bincount(draws, minlength=vocab).float() / 20000
    torch.testing.assert_close(frequencies, scores[0].softmax(-1), atol=0.012, rtol=0)


def test_sample_step_logp_is_raw_log_softmax_over_temperature():
    logits = _logits(seed=4)
    sampling = SamplingConfig(max_new_tokens=1, temperature=0.7, top_k=3, repetition_penalty=1.5)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    token, logp = sample_step(logits, seen, torch.full((logits.shape[0],), 0.5), sampling)
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(1, token[:, None]).squeeze(1)
    torch.testing.assert_close(logp, expected)
    assert logp.dtype == torch.float32
    greedy, _ = sample_step(logits, seen, torch.zeros(logits.shape[0]), SamplingConfig(max_new_tokens=1, greedy=True))
    assert torch.equal(greedy, logits.argmax(-1))
