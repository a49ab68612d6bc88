"""GRPO learns: a tiny random-init causal LM raises its reward on a toy verifiable task within seconds.

Task: every completion token should be the digit "7" (reward = fraction of the 4 completion tokens that are "7").
A random policy over the 20-token vocabulary scores about 0.05; GRPO must push the mean reward far above that.
"""

from __future__ import annotations

import pytest
import torch
from fusedrl.model.tiny import tiny_model_from_tokenizer, tiny_word_tokenizer
from fusedrl.train.config import GRPOConfig
from fusedrl.train.trainer import GRPOTrainer

from reward_curve import train_and_measure

COMPLETION_TOKENS = 4


def sevens_reward(prompts, completions, **kwargs):
    return [sum(word == "7" for word in c[0]["content"].split()) / COMPLETION_TOKENS for c in completions]


@pytest.mark.slow  # about 15 s of CPU: part of CI's full run, not of the inner loop
def test_grpo_raises_the_reward_of_a_tiny_model():
    learn_sevens("cpu", "float32")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_grpo_raises_the_reward_on_cuda(dtype):
    """The same run with the CUDA loss op, under bf16 autocast or fp16 autocast with dynamic loss scaling."""
    learn_sevens("cuda", dtype)


def learn_sevens(device: str, dtype: str) -> None:
    tokenizer = tiny_word_tokenizer(words=list("0123456789") + ["what", "is", "user", "assistant"])
    model = tiny_model_from_tokenizer(tokenizer, hidden=32, layers=1, seed=0).to(device)
    rows = [{"prompt": [{"role": "user", "content": f"what is {d}"}]} for d in range(10)]
    args = GRPOConfig(learning_rate=2e-2, per_device_train_batch_size=32, num_generations=8,
                      max_completion_length=COMPLETION_TOKENS, max_steps=16, dtype=dtype,
                      gradient_checkpointing=False, seed=0, loss_type="dapo")
    trainer = GRPOTrainer(model, sevens_reward, args, rows, tokenizer)

    curve = train_and_measure(trainer)
    assert curve.first < 0.2, f"the untrained policy already solves the task: {curve.rewards}"
    assert curve.last > curve.first + 0.3, f"reward did not rise: {[round(r, 3) for r in curve.rewards]}"
    assert all(torch.isfinite(torch.tensor([h["loss"], h["grad_norm"]])).all() for h in curve.history)
    print(f"\n{device} {dtype}: {curve.summary()}")
