"""Gradient accumulation: k micro-batches accumulate to the gradient of one batch k times as large.

Which loss types have that property (see fusedrl/train/loss_step.py):
  dapo, cispo: exactly, because the trainer passes num_items_in_batch = active tokens of the generation round
      (x gradient_accumulation_steps / steps_per_generation, TRL's count): here the round is the step;
  grpo, sapo, dr_grpo, luspo: exactly, because each micro-batch loss is a mean over its (equally many) sequences and
      the trainer divides by gradient_accumulation_steps;
  bnpo: only when every micro-batch has the same number of active tokens (it normalises by each micro-batch's own
      token count, as TRL does); with unequal counts the accumulated gradient differs, and a test shows it.
"""

from __future__ import annotations

import pytest
import torch
from fusedrl.model.tiny import tiny_model_from_tokenizer, tiny_word_tokenizer
from fusedrl.train.batching import TrainingBatch
from fusedrl.train.config import GRPOConfig
from fusedrl.train.trainer import GRPOTrainer

EXACT_LOSS_TYPES = ["dapo", "cispo", "grpo", "sapo", "dr_grpo", "luspo"]
pytestmark = pytest.mark.filterwarnings("ignore:loss_type='luspo' is meant to be used")


def zero_reward(prompts, completions, **kwargs):
    return [0.0] * len(prompts)


def make_trainer(gas: int, micro: int, loss_type: str, seed: int = 0, **overrides) -> GRPOTrainer:
    tokenizer = tiny_word_tokenizer()
    model = tiny_model_from_tokenizer(tokenizer, hidden=16, layers=1, seed=seed)
    values = dict(per_device_train_batch_size=micro, gradient_accumulation_steps=gas, num_generations=2,
                  max_completion_length=7, loss_type=loss_type, dtype="float32", gradient_checkpointing=False,
                  epsilon=0.1, epsilon_high=0.15, beta=0.02, vllm_importance_sampling_correction=False, max_steps=1)
    values.update(overrides)
    rows = [{"prompt": f"what is {i}"} for i in range(8)]
    return GRPOTrainer(model, zero_reward, GRPOConfig(**values), rows, tokenizer)


def random_batch(rows: int, vocab: int, seed: int, *, equal_tokens: bool = False) -> TrainingBatch:
    """Left-padded prompts and right-padded completions of random lengths, old/ref logp off the current policy."""
    generator = torch.Generator().manual_seed(seed)
    prompt_width, completion_width = 6, 7
    prompt_lengths = torch.randint(2, prompt_width + 1, (rows,), generator=generator)
    if equal_tokens:
        completion_lengths = torch.tensor([3, 5] * (rows // 2))  # every pair of rows holds 8 tokens
    else:
        completion_lengths = torch.randint(1, completion_width + 1, (rows,), generator=generator)
    prompt_mask = (torch.arange(prompt_width) >= prompt_width - prompt_lengths.unsqueeze(1)).long()
    completion_mask = (torch.arange(completion_width) < completion_lengths.unsqueeze(1)).long()
    noise = lambda: 0.3 * torch.randn(rows, completion_width, generator=generator)
    return TrainingBatch(
        prompt_ids=torch.randint(6, vocab, (rows, prompt_width), generator=generator) * prompt_mask,
        prompt_mask=prompt_mask,
        completion_ids=torch.randint(6, vocab, (rows, completion_width), generator=generator) * completion_mask,
        completion_mask=completion_mask,
        advantages=torch.randn(rows, generator=generator),
        old_logp=noise(),  # placeholders, replaced below by the policy's own logp plus noise
        ref_logp=noise(),
        round_tokens=float(completion_mask.sum()),
    )


def with_policy_logps(trainer: GRPOTrainer, batch: TrainingBatch, seed: int) -> TrainingBatch:
    """old/ref logp = the current policy's logp + noise, so ratios straddle the clip range and KL is non-zero."""
    generator = torch.Generator().manual_seed(seed)
    logp = trainer.per_token_logp(trainer.model, batch)
    noisy = lambda: logp + 0.3 * torch.randn(logp.shape, generator=generator)
    return batch.replace(old_logp=noisy(), ref_logp=noisy())


def accumulated_gradients(trainer: GRPOTrainer, micro_batches: list[TrainingBatch]) -> dict[str, torch.Tensor]:
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.accumulate_gradients(micro_batches)
    return {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters()}


def assert_same_gradients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name, gradient in a.items():
        torch.testing.assert_close(gradient, b[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert any(g.abs().max() > 1e-4 for g in a.values()), "gradients vanished: the comparison proves nothing"


@pytest.mark.parametrize("importance_sampling_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", EXACT_LOSS_TYPES)
@pytest.mark.parametrize("k", [2, 4])
def test_k_micro_batches_equal_one_big_batch(loss_type, importance_sampling_level, k):
    big = make_trainer(1, 8, loss_type, importance_sampling_level=importance_sampling_level)
    small = make_trainer(k, 8 // k, loss_type, importance_sampling_level=importance_sampling_level)
    batch = with_policy_logps(big, random_batch(8, len(big.tokenizer), seed=k), seed=1)
    one = accumulated_gradients(big, big.rounds.split_micro_batches(batch, 1))
    many = accumulated_gradients(small, small.rounds.split_micro_batches(batch, k))
    assert_same_gradients(one, many)


def test_bnpo_accumulates_exactly_only_with_equal_token_counts():
    big, small = make_trainer(1, 8, "bnpo"), make_trainer(4, 2, "bnpo")
    equal = with_policy_logps(big, random_batch(8, len(big.tokenizer), seed=5, equal_tokens=True), seed=2)
    assert len({b.num_active_tokens for b in equal.split(4)}) == 1
    assert_same_gradients(accumulated_gradients(big, [equal]), accumulated_gradients(small, equal.split(4)))

    unequal = with_policy_logps(big, random_batch(8, len(big.tokenizer), seed=6), seed=3)
    assert len({b.num_active_tokens for b in unequal.split(4)}) > 1
    one = accumulated_gradients(big, [unequal])
    many = accumulated_gradients(small, unequal.split(4))
    assert not torch.allclose(one["lm_head.weight"], many["lm_head.weight"], rtol=1e-3, atol=1e-6)


def test_dapo_uses_the_token_count_of_the_whole_step():
    """Dividing each micro-batch by its own token count (the mistake) would weight short micro-batches more."""
    trainer = make_trainer(2, 4, "dapo")
    batch = with_policy_logps(trainer, random_batch(8, len(trainer.tokenizer), seed=9), seed=4)
    halves = batch.split(2)
    total = batch.num_active_tokens
    trainer.optimizer.zero_grad(set_to_none=True)
    per_half = [trainer.micro_batch_loss(half.replace(round_tokens=total))[0] for half in halves]
    own = [trainer.micro_batch_loss(half.replace(round_tokens=half.num_active_tokens))[0] for half in halves]
    whole = make_trainer(1, 8, "dapo").micro_batch_loss(batch.replace(round_tokens=total))[0]
    torch.testing.assert_close(sum(per_half), whole, rtol=1e-5, atol=1e-7)
    for half, loss_total, loss_own in zip(halves, per_half, own):
        torch.testing.assert_close(loss_total * total, loss_own * half.num_active_tokens, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_trainer_step_with_accumulation_matches_one_big_micro_batch(loss_type):
    """End to end: same prompts, same samples (same seed and generation batch), one optimizer step each.

    adam_epsilon is huge so AdamW's first update is lr * g / (|g| + eps) ~ g * lr / eps, linear in the gradient.
    """
    common = dict(learning_rate=1e3, adam_epsilon=1e3, max_grad_norm=0.0, beta=0.0, num_generations=4)
    big = make_trainer(1, 8, loss_type, **common)
    small = make_trainer(4, 2, loss_type, **common)
    before = {name: p.detach().clone() for name, p in big.model.named_parameters()}
    big_metrics = big.train().history[0]
    small_metrics = small.train().history[0]
    assert big_metrics["reward"] == small_metrics["reward"]
    assert big_metrics["completions/mean_length"] == small_metrics["completions/mean_length"]
    assert big_metrics["loss"] == pytest.approx(small_metrics["loss"], rel=1e-4, abs=1e-7)
    assert big_metrics["grad_norm"] == pytest.approx(small_metrics["grad_norm"], rel=1e-4)
    big_params, small_params = dict(big.model.named_parameters()), dict(small.model.named_parameters())
    for name, start in before.items():
        torch.testing.assert_close(big_params[name] - start, small_params[name] - start, rtol=1e-3, atol=1e-7)
