"""Generation buffering and batching: TRL's generate-every / slice order, prompt sampling, padding, truncation,
micro-batch slicing, and the old-logp rule as the trainer applies it."""

from __future__ import annotations

import pytest
import torch
from fusedrl.model.tiny import tiny_model_from_tokenizer, tiny_word_tokenizer
from fusedrl.rollout import BuiltinEngine
from fusedrl.train.batching import (
    PromptSampler,
    TrainingBatch,
    pad_sequences,
    repeat_rows,
    tokenize_prompts,
)
from fusedrl.train.buffer import GenerationBuffer
from fusedrl.train.config import GRPOConfig
from fusedrl.train.trainer import GRPOTrainer

# ---------------------------------------------------------------------------------------------------------------
# GenerationBuffer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps_per_generation,num_iterations", [(1, 1), (3, 1), (3, 2), (2, 3)])
def test_buffer_generates_every_round_and_walks_slices_in_order(steps_per_generation, num_iterations):
    rounds: list[list[str]] = []

    def produce():
        batch = [f"r{len(rounds)}s{i}" for i in range(steps_per_generation)]
        rounds.append(batch)
        return batch

    buffer = GenerationBuffer(produce, steps_per_generation=steps_per_generation, num_iterations=num_iterations)
    period = steps_per_generation * num_iterations
    seen = [buffer.next() for _ in range(3 * period + 1)]
    assert len(rounds) == 4  # rounds start at micro-steps 0, period, 2 * period, 3 * period
    for step, item in enumerate(seen):
        assert item == f"r{step // period}s{step % steps_per_generation}"
    assert buffer.micro_step == 3 * period + 1 and buffer.rounds_generated == 4


def test_buffer_rejects_a_round_of_the_wrong_size_and_bad_settings():
    buffer = GenerationBuffer(lambda: ["only one"], steps_per_generation=2, num_iterations=1)
    with pytest.raises(RuntimeError, match="steps_per_generation=2"):
        buffer.next()
    with pytest.raises(ValueError, match="steps_per_generation"):
        GenerationBuffer(list, steps_per_generation=0, num_iterations=1)
    with pytest.raises(ValueError, match="num_iterations"):
        GenerationBuffer(list, steps_per_generation=1, num_iterations=0)


def test_buffer_restore_resumes_mid_round_without_generating():
    calls = []
    buffer = GenerationBuffer(lambda: calls.append(1) or ["a", "b", "c"], steps_per_generation=3, num_iterations=2)
    buffer.restore(micro_step=4, rounds_generated=5, stored_round=["x", "y", "z"])
    assert [buffer.next(), buffer.next(), buffer.next()] == ["y", "z", "a"]
    assert len(calls) == 1 and buffer.rounds_generated == 6
    with pytest.raises(ValueError, match="middle of a generation round"):
        buffer.restore(micro_step=1, rounds_generated=0, stored_round=None)


# ---------------------------------------------------------------------------------------------------------------
# prompt sampling and tokenization
# ---------------------------------------------------------------------------------------------------------------


def test_prompt_sampler_covers_each_prompt_once_per_epoch_and_is_seeded():
    sampler = PromptSampler(11, 3, shuffle=True, seed=5)
    epoch0, epoch1 = sampler.epoch_rounds(0), sampler.epoch_rounds(1)
    assert len(epoch0) == 3 and all(len(r) == 3 for r in epoch0)  # 11 // 3 rounds, the 2 left over are dropped
    flat = [i for r in epoch0 for i in r]
    assert len(set(flat)) == 9 and set(flat) <= set(range(11))
    assert epoch0 != epoch1
    assert PromptSampler(11, 3, shuffle=True, seed=5).epoch_rounds(0) == epoch0
    assert PromptSampler(6, 2, shuffle=False).epoch_rounds(3) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="train_dataset has 2 rows"):
        PromptSampler(2, 3)


def test_repeat_rows_keeps_groups_contiguous():
    rows = [{"prompt": "a"}, {"prompt": "b"}]
    assert [r["prompt"] for r in repeat_rows(rows, 3)] == ["a", "a", "a", "b", "b", "b"]


def test_tokenize_prompts_uses_the_chat_template_and_truncates_from_the_left():
    tokenizer = tiny_word_tokenizer()
    chat = [{"role": "user", "content": "what is 1 + 2 ?"}]
    full = tokenize_prompts(tokenizer, [chat])[0]
    expected = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert full == list(expected["input_ids"])
    assert tokenizer.decode(full[-2:]) .replace(" ", "").endswith("assistant")  # generation prompt is there
    truncated = tokenize_prompts(tokenizer, [chat], max_prompt_length=4)[0]
    assert truncated == full[-4:]
    plain = tokenize_prompts(tokenizer, ["what is 7"])[0]
    assert plain == tokenizer("what is 7")["input_ids"]
    with pytest.raises(TypeError, match="prompt 1 must be a string or a list of chat messages"):
        tokenize_prompts(tokenizer, ["ok", 3])
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_prompts(tokenizer, ["ok"], max_prompt_length=0)


def test_pad_sequences_left_and_right():
    ids, mask = pad_sequences([[5, 6, 7], [8]], 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_sequences([[5, 6, 7], [8]], 9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="side"):
        pad_sequences([[1]], 0, side="middle")


# ---------------------------------------------------------------------------------------------------------------
# TrainingBatch slicing
# ---------------------------------------------------------------------------------------------------------------


def _random_batch(rows: int, prompt_width: int, completion_width: int, seed: int) -> TrainingBatch:
    generator = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.randint(1, prompt_width + 1, (rows,), generator=generator)
    completion_lengths = torch.randint(0, completion_width + 1, (rows,), generator=generator)
    positions_p = torch.arange(prompt_width).expand(rows, -1)
    positions_c = torch.arange(completion_width).expand(rows, -1)
    prompt_mask = (positions_p >= prompt_width - prompt_lengths.unsqueeze(1)).long()
    completion_mask = (positions_c < completion_lengths.unsqueeze(1)).long()
    return TrainingBatch(
        prompt_ids=torch.randint(3, 50, (rows, prompt_width), generator=generator) * prompt_mask,
        prompt_mask=prompt_mask,
        completion_ids=torch.randint(3, 50, (rows, completion_width), generator=generator) * completion_mask,
        completion_mask=completion_mask,
        advantages=torch.randn(rows, generator=generator),
        old_logp=-torch.rand(rows, completion_width, generator=generator) * completion_mask,
    )


def test_split_keeps_rows_aligned_and_trims_only_padding():
    batch = _random_batch(12, 7, 9, seed=3)
    shuffled = batch.shuffled(torch.Generator().manual_seed(0))
    chunks = shuffled.split(4)
    assert [len(c) for c in chunks] == [3, 3, 3, 3]
    assert sum(c.num_active_tokens for c in chunks) == batch.num_active_tokens
    # every chunk row is some original row, with its prompt tokens, completion tokens, advantage and old logp
    original = {float(a): i for i, a in enumerate(batch.advantages)}
    for chunk in chunks:
        assert chunk.prompt_mask.any(0)[0] and chunk.completion_mask.shape[1] >= 1
        for row in range(len(chunk)):
            source = original[float(chunk.advantages[row])]
            p = chunk.prompt_ids.shape[1]
            assert torch.equal(chunk.prompt_ids[row], batch.prompt_ids[source, -p:])
            assert batch.prompt_mask[source, :-p].sum() == 0  # only padding was trimmed
            t = chunk.completion_ids.shape[1]
            assert torch.equal(chunk.completion_ids[row], batch.completion_ids[source, :t])
            assert torch.equal(chunk.old_logp[row], batch.old_logp[source, :t])
            assert batch.completion_mask[source, t:].sum() == 0
    with pytest.raises(ValueError, match="cannot split a batch of 12 rows into 5"):
        batch.split(5)


def test_training_batch_checks_shapes():
    batch = _random_batch(4, 3, 5, seed=0)
    with pytest.raises(ValueError, match="advantages must have shape"):
        batch.replace(advantages=torch.zeros(3))
    with pytest.raises(ValueError, match="old_logp must have shape"):
        batch.replace(old_logp=torch.zeros(4, 4))


# ---------------------------------------------------------------------------------------------------------------
# the trainer's buffering: generation count, reuse, old logp
# ---------------------------------------------------------------------------------------------------------------


class CountingEngine(BuiltinEngine):
    """The built-in engine, counting generate calls and the prompts it was given."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.calls: list[int] = []

    def generate(self, prompt_ids, sampling, generator=None):
        self.calls.append(len(prompt_ids))
        return super().generate(prompt_ids, sampling, generator)


def _trainer(**overrides) -> tuple[GRPOTrainer, CountingEngine]:
    tokenizer = tiny_word_tokenizer()
    model = tiny_model_from_tokenizer(tokenizer, hidden=32, layers=1, seed=0)
    values = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=3, learning_rate=1e-2,
                  dtype="float32", gradient_checkpointing=False, vllm_importance_sampling_correction=False, seed=1)
    values.update(overrides)
    engine = CountingEngine(model, tokenizer)
    # Stand in for an external sampler (vLLM) when the sampler correction is under test.
    engine.sampler_differs_from_trainer = values["vllm_importance_sampling_correction"]
    rows = [{"prompt": f"what is {d}"} for d in range(8)]

    def length_reward(prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]

    return GRPOTrainer(model, length_reward, GRPOConfig(**values), rows, tokenizer, rollout_engine=engine), engine


@pytest.mark.parametrize(
    "gas,spg,iterations,correction,expect_old",
    [
        (2, 2, 1, False, False),  # aligned: each round is used within one optimizer step
        (1, 2, 1, False, True),  # the second slice is used after an optimizer step
        (2, 2, 2, False, True),  # reused after the policy moved
        (4, 2, 2, False, False),  # 4 % (2 * 2) == 0: one step covers both passes
        (2, 2, 1, True, True),  # the sampler correction always needs old logp
    ],
)
def test_old_logp_follows_trls_rule(gas, spg, iterations, correction, expect_old):
    trainer, _ = _trainer(gradient_accumulation_steps=gas, steps_per_generation=spg, num_iterations=iterations,
                          vllm_importance_sampling_correction=correction, max_steps=1)
    assert trainer.needs_old_logp == expect_old
    trainer.train()
    stored = trainer.buffer.stored_round
    assert all((batch.old_logp is not None) == expect_old for batch in stored)
    assert all((batch.sampling_logp is not None) == correction for batch in stored)


def test_trainer_reuses_each_round_num_iterations_times():
    trainer, engine = _trainer(gradient_accumulation_steps=1, steps_per_generation=2, num_iterations=2, max_steps=8)
    used: list[TrainingBatch] = []
    original_next = trainer.buffer.next
    trainer.buffer.next = lambda: used.append(original_next()) or used[-1]
    state = trainer.train()
    # 8 micro-steps, a round every 2 * 2 micro-steps, each round of 4 prompts x ... = 8 completions
    assert engine.calls == [8, 8]
    assert state.rounds_generated == 2 and state.micro_step == 8
    assert used[0] is used[2] and used[1] is used[3] and used[0] is not used[1]
    assert used[4] is used[6] and used[4] is not used[0]
    # the reused slices were sampled before the policy moved: old logp differs from the current policy's
    assert "reward" in state.history[0] and "reward" not in state.history[1]
    assert state.history[0]["is_ratio/max"] == pytest.approx(1.0, abs=1e-5)
    assert max(abs(h["is_ratio/max"] - 1.0) for h in state.history[1:4]) > 1e-4
