"""VLLMEngine obeys the RolloutEngine contract: ids, mask, logps, truncation, EOS, padding, max_new_tokens."""

from __future__ import annotations

import pytest
import torch

from vllm_helpers import LOGP_TOLERANCE, MAX_SEQ_LENGTH, chat_prompt, trainer_logp



def test_engine_is_a_rollout_engine_with_a_different_sampler(shared_model):
    from fusedrl.rollout import RolloutEngine

    model, _ = shared_model
    assert isinstance(model.vllm_engine, RolloutEngine)
    assert model.vllm_engine.sampler_differs_from_trainer is True


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_tensors_follow_the_contract(shared_model, temperature):
    from fusedrl.rollout import SamplingConfig

    model, tokenizer = shared_model
    engine = model.vllm_engine
    prompts = [chat_prompt(tokenizer, "What is 2 + 3?"), chat_prompt(tokenizer, "Write a long story about a cat."),
               [1, 504, 2000]]
    max_new_tokens = 10
    out = engine.generate(prompts, SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature),
                          torch.Generator().manual_seed(3))
    count, width = out.completion_ids.shape
    assert count == 3 and 1 <= width <= max_new_tokens
    assert out.completion_ids.dtype == torch.long and out.completion_mask.dtype == torch.long
    assert out.sampling_logp.dtype == torch.float32 and out.truncated.dtype == torch.bool
    eos = set(engine.eos_token_ids)
    for row in range(count):
        ids = out.completion_ids[row].tolist()
        length = int(out.completion_mask[row].sum())
        assert out.completion_mask[row].tolist() == [1] * length + [0] * (width - length)
        assert ids[length:] == [engine.pad_token_id] * (width - length)
        assert torch.all(out.sampling_logp[row, length:] == 0)
        eos_positions = [i for i, t in enumerate(ids[:length]) if t in eos]
        if out.truncated[row]:
            assert not eos_positions and length == max_new_tokens
        else:
            assert eos_positions == [length - 1]
        logp = trainer_logp(model, prompts[row], ids[:length], temperature)
        assert torch.all(out.sampling_logp[row, :length] <= 0)
        torch.testing.assert_close(out.sampling_logp[row, :length], logp, atol=LOGP_TOLERANCE, rtol=0)


def test_eos_and_truncation_flags(shared_model):
    """A short answer ends with EOS inside the budget; one token of budget truncates everything."""
    from fusedrl.rollout import SamplingConfig

    model, tokenizer = shared_model
    engine = model.vllm_engine
    prompt = chat_prompt(tokenizer, "What is 2 + 3? Reply with only the number.")
    done = engine.generate([prompt], SamplingConfig(max_new_tokens=16, greedy=True))
    assert not done.truncated[0] and done.completion_ids[0, int(done.completion_mask[0].sum()) - 1] in engine.eos_token_ids
    cut = engine.generate([prompt, [1, 2, 3]], SamplingConfig(max_new_tokens=1, greedy=True))
    assert cut.completion_ids.shape == (2, 1) and cut.completion_mask.tolist() == [[1], [1]]


def test_same_generator_state_same_completions(shared_model):
    from fusedrl.rollout import SamplingConfig

    model, tokenizer = shared_model
    prompts = [chat_prompt(tokenizer, "Tell me a word.")] * 2
    sampling = SamplingConfig(max_new_tokens=6)
    first = model.vllm_engine.generate(prompts, sampling, torch.Generator().manual_seed(11))
    second = model.vllm_engine.generate(prompts, sampling, torch.Generator().manual_seed(11))
    assert torch.equal(first.completion_ids, second.completion_ids)
    torch.testing.assert_close(first.sampling_logp, second.sampling_logp, atol=0, rtol=0)


def test_bad_inputs_raise_clear_errors(shared_model):
    from fusedrl.rollout import SamplingConfig

    model, _ = shared_model
    engine = model.vllm_engine
    sampling = SamplingConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match="non-empty list"):
        engine.generate([], sampling)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        engine.generate([[1], []], sampling)
    with pytest.raises(ValueError, match=r"ints in \[0, 49152\)"):
        engine.generate([[1, 49152]], sampling)
    with pytest.raises(ValueError, match="max_model_len=256"):
        engine.generate([[1] * (MAX_SEQ_LENGTH - 2)], sampling)
    with pytest.raises(ValueError, match="temperature=1"):
        engine.generate([[1, 2]], SamplingConfig(max_new_tokens=2, greedy=True, temperature=0.5))
    with pytest.raises(TypeError, match="SamplingConfig"):
        engine.generate([[1, 2]], {"max_new_tokens": 2})
