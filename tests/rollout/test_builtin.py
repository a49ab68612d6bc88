"""BuiltinEngine: masks, truncation, sampler log-probs, reproducibility and left padding on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from fusedrl.model import LoraConfig
from fusedrl.model.hidden import position_ids_from_mask
from fusedrl.model.checkpointing import enable_activation_checkpointing
from fusedrl.model.tiny import tiny_model_from_tokenizer, tiny_word_tokenizer
from fusedrl.rollout import BuiltinEngine, RolloutEngine, RolloutOutput, SamplingConfig

WORDS = [f"w{i}" for i in range(150)] + list("0123456789+-=?")


def _engine(*, eos_boost: float = 0.0, pad_is_eos: bool = False, seed: int = 0) -> BuiltinEngine:
    """A tiny random Llama; `eos_boost` scales up the EOS row of the lm-head so EOS comes early."""
    tokenizer = tiny_word_tokenizer(WORDS)
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    model = tiny_model_from_tokenizer(tokenizer, hidden=64, layers=2, seed=seed)
    if eos_boost:
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_token_id] *= eos_boost
            model.lm_head.weight[tokenizer.eos_token_id] += eos_boost * 0.05
    return BuiltinEngine(model, tokenizer)


def _random_prompts(engine: BuiltinEngine, lengths: list[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    first_word = engine.tokenizer.convert_tokens_to_ids("w0")
    return [torch.randint(first_word, len(engine.tokenizer), (n,), generator=generator).tolist() for n in lengths]


def _recomputed_logp(engine: BuiltinEngine, prompts: list[list[int]], out: RolloutOutput, temperature: float):
    """log_softmax(logits / T) at the chosen tokens from one full forward over prompt + completion."""
    input_ids, attention_mask = engine._left_pad(prompts)
    full_ids = torch.cat([input_ids, out.completion_ids], dim=1)
    full_mask = torch.cat([attention_mask, out.completion_mask], dim=1)
    with torch.no_grad():
        logits = engine.model(
            input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask)
        ).logits.float()
    completion_logits = logits[:, input_ids.shape[1] - 1 : -1]
    logp = torch.log_softmax(completion_logits / temperature, dim=-1)
    return logp.gather(-1, out.completion_ids.unsqueeze(-1)).squeeze(-1) * out.completion_mask


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_masks_truncation_and_padding(pad_is_eos):
    engine = _engine(eos_boost=6.0, pad_is_eos=pad_is_eos)
    prompts = _random_prompts(engine, [3, 9, 1, 6, 12, 4, 7, 5, 2, 8, 10, 11], seed=1)
    sampling = SamplingConfig(max_new_tokens=13, temperature=1.0)
    out = engine.generate(prompts, sampling, generator=torch.Generator().manual_seed(2))

    count, length = out.completion_ids.shape
    assert count == len(prompts) and length <= 13
    assert out.completion_ids.dtype == torch.long and out.completion_mask.dtype == torch.long
    assert out.sampling_logp.dtype == torch.float32 and out.truncated.dtype == torch.bool
    eos, pad = engine.tokenizer.eos_token_id, engine.tokenizer.pad_token_id
    assert out.truncated.any() and (~out.truncated).any(), "the test needs both finished and truncated rows"
    for row in range(count):
        ids, mask = out.completion_ids[row].tolist(), out.completion_mask[row].tolist()
        active = sum(mask)
        assert mask == [1] * active + [0] * (length - active)  # a prefix
        if out.truncated[row]:
            assert active == 13 and eos not in ids
        else:
            assert ids.index(eos) == active - 1  # mask ends with the first EOS, inclusive
        assert all(token == pad for token in ids[active:])
        assert all(value == 0.0 for value in out.sampling_logp[row, active:].tolist())
        assert all(value < 0.0 for value in out.sampling_logp[row, :active].tolist())
    assert length == int(out.completion_mask.sum(1).max())


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=12, top_p=0.9, repetition_penalty=1.3),
        SamplingConfig(max_new_tokens=10, temperature=1.6, min_p=0.05),
        SamplingConfig(max_new_tokens=10, temperature=0.5, greedy=True),
    ],
    ids=["topk-topp-reppen", "minp", "greedy"],
)
def test_sampling_logp_is_raw_logits_over_temperature(sampling):
    engine = _engine(eos_boost=4.0)
    prompts = _random_prompts(engine, [5, 2, 8, 3, 6], seed=3)
    out = engine.generate(prompts, sampling, generator=torch.Generator().manual_seed(4))
    expected = _recomputed_logp(engine, prompts, out, sampling.temperature)
    torch.testing.assert_close(out.sampling_logp, expected, rtol=1e-4, atol=1e-4)


def test_top_k_one_equals_greedy():
    engine = _engine()
    prompts = _random_prompts(engine, [4, 7, 2], seed=5)
    greedy = engine.generate(prompts, SamplingConfig(max_new_tokens=8, greedy=True))
    top1 = engine.generate(prompts, SamplingConfig(max_new_tokens=8, temperature=2.0, top_k=1))
    assert torch.equal(greedy.completion_ids, top1.completion_ids)


def test_reproducible_with_generator_and_global_rng_untouched():
    engine = _engine(eos_boost=3.0)
    prompts = _random_prompts(engine, [4, 7, 2, 5], seed=6)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.2)
    global_state = torch.random.get_rng_state()
    first = engine.generate(prompts, sampling, generator=torch.Generator().manual_seed(11))
    second = engine.generate(prompts, sampling, generator=torch.Generator().manual_seed(11))
    other = engine.generate(prompts, sampling, generator=torch.Generator().manual_seed(12))
    assert torch.equal(torch.random.get_rng_state(), global_state)
    assert torch.equal(first.completion_ids, second.completion_ids)
    assert torch.equal(first.sampling_logp, second.sampling_logp)
    assert not torch.equal(first.completion_ids, other.completion_ids)
    # one generator used twice advances: two successive batches differ
    generator = torch.Generator().manual_seed(11)
    again = engine.generate(prompts, sampling, generator=generator)
    after = engine.generate(prompts, sampling, generator=generator)
    assert torch.equal(again.completion_ids, first.completion_ids)
    assert not torch.equal(after.completion_ids, first.completion_ids)


def test_greedy_is_deterministic_and_left_padding_changes_nothing():
    engine = _engine()
    prompts = _random_prompts(engine, [9, 2, 5, 1, 13], seed=7)
    sampling = SamplingConfig(max_new_tokens=10, greedy=True)
    batch = engine.generate(prompts, sampling)
    assert torch.equal(batch.completion_ids, engine.generate(prompts, sampling).completion_ids)
    for row, prompt in enumerate(prompts):
        alone = engine.generate([prompt], sampling)
        active = int(alone.completion_mask[0].sum())
        assert batch.completion_ids[row, :active].tolist() == alone.completion_ids[0, :active].tolist()
        torch.testing.assert_close(
            batch.sampling_logp[row, :active], alone.sampling_logp[0, :active], rtol=1e-4, atol=1e-4
        )


def test_training_mode_and_checkpointing_restored_with_peft():
    import peft

    engine = _engine()
    model = peft.get_peft_model(engine.model, LoraConfig(r=4).to_peft())
    enable_activation_checkpointing(model.base_model.model)
    model.config.use_cache = False
    model.train()
    peft_engine = BuiltinEngine(model, engine.tokenizer)
    prompts = _random_prompts(engine, [3, 6], seed=8)
    out = peft_engine.generate(prompts, SamplingConfig(max_new_tokens=6))
    assert model.training and all(module.training for module in model.modules())
    assert out.completion_ids.shape[0] == 2 and not out.completion_ids.requires_grad
    assert isinstance(peft_engine, RolloutEngine)
    peft_engine.sleep()
    peft_engine.wake()


@pytest.mark.parametrize(
    ("prompts", "match"),
    [
        ([], "prompt_ids"),
        ([[]], r"prompt_ids\[0\]"),
        ([[1, 2], [10_000]], r"prompt_ids\[1\]"),
        ([[1, -1]], r"prompt_ids\[0\]"),
    ],
)
def test_bad_prompts(prompts, match):
    with pytest.raises(ValueError, match=match):
        _engine().generate(prompts, SamplingConfig(max_new_tokens=4))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.2}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"greedy": 1}, "greedy"),
    ],
)
def test_sampling_config_validation(kwargs, field):
    arguments = {"max_new_tokens": 4, **kwargs}
    with pytest.raises((ValueError, TypeError), match=rf"SamplingConfig\.{field}"):
        SamplingConfig(**arguments)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_generation_reproducible_and_logp_matches():
    engine = _engine(eos_boost=4.0)
    engine.model.to("cuda")
    prompts = _random_prompts(engine, [5, 2, 8, 3], seed=9)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.8, top_p=0.95)
    cuda_state = torch.cuda.get_rng_state()
    first = engine.generate(prompts, sampling, generator=torch.Generator(device="cuda").manual_seed(5))
    second = engine.generate(prompts, sampling, generator=torch.Generator(device="cuda").manual_seed(5))
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    assert first.completion_ids.is_cuda and torch.equal(first.completion_ids, second.completion_ids)
    expected = _recomputed_logp(engine, prompts, first, sampling.temperature)
    torch.testing.assert_close(first.sampling_logp, expected, rtol=1e-3, atol=1e-3)
