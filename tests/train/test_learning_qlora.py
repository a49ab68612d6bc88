"""GRPO learns through 4-bit NF4 base weights (QLoRA, fusedrl's own NF4 layers, no bitsandbytes).

Fast: a tiny random-init Llama saved to disk, loaded with load_in_4bit=True, learns the "sevens" task of
test_learning.py through its LoRA adapters. Slow: SmolLM2-135M-Instruct in 4-bit learns the one-digit sums of
test_learning_smollm.py. CUDA: the fast run on the GPU in bf16.
"""

from __future__ import annotations

import pytest
import torch
from fusedrl.model import LoraConfig, load_model
from fusedrl.model.tiny import tiny_model_from_tokenizer, tiny_word_tokenizer
from fusedrl.nn.nf4_lora import NF4LoraLinear
from fusedrl.train.config import GRPOConfig
from fusedrl.train.trainer import GRPOTrainer

from reward_curve import train_and_measure
from test_learning import COMPLETION_TOKENS, sevens_reward
from test_learning_smollm import smollm2_folder, sum_reward


def _qlora_sevens(tmp_path, device: str, dtype: str) -> None:
    tokenizer = tiny_word_tokenizer(words=list("0123456789") + ["what", "is", "user", "assistant"])
    folder = tmp_path / "tiny"
    model = tiny_model_from_tokenizer(tokenizer, hidden=32, layers=1, seed=0)
    with torch.no_grad():
        # The lm-head stays frozen under LoRA: at the init scale (std 0.02) it cannot give any token more than
        # about 10% probability from a unit-RMS hidden state, so no adapter could learn the task. Scale it up.
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model, tokenizer = load_model(folder, dtype=dtype, load_in_4bit=True, lora=LoraConfig(r=16, lora_alpha=32),
                                  device=device, gradient_checkpointing=False)
    assert any(isinstance(m, NF4LoraLinear) for m in model.modules())
    rows = [{"prompt": [{"role": "user", "content": f"what is {d}"}]} for d in range(10)]
    args = GRPOConfig(learning_rate=1e-2, per_device_train_batch_size=16, num_generations=8,
                      max_completion_length=COMPLETION_TOKENS, max_steps=10, dtype=dtype,
                      gradient_checkpointing=False, seed=0, loss_type="dapo")
    trainer = GRPOTrainer(model, sevens_reward, args, rows, tokenizer)

    curve = train_and_measure(trainer)
    assert curve.rewards[0] < 0.2, f"the untrained policy already solves the task: {curve.rewards}"
    assert curve.last > curve.first + 0.3, f"reward did not rise: {[round(r, 3) for r in curve.rewards]}"
    print(f"\nQLoRA {device} {dtype}: {curve.summary()}")


def test_qlora_grpo_raises_the_reward_of_a_tiny_model(tmp_path):
    _qlora_sevens(tmp_path, "cpu", "float32")


@pytest.mark.cuda
def test_qlora_grpo_raises_the_reward_on_cuda(tmp_path):
    _qlora_sevens(tmp_path, "cuda", "bfloat16")


@pytest.mark.slow
def test_qlora_grpo_teaches_smollm2_in_4bit_to_answer_sums():
    model, tokenizer = load_model(smollm2_folder(), dtype=torch.float32, load_in_4bit=True,
                                  lora=LoraConfig(r=8, lora_alpha=16), gradient_checkpointing=False, device="cpu")
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}? Reply with only the number."}],
             "answer": str(a + b)} for a in range(1, 6) for b in range(1, 6)]
    args = GRPOConfig(learning_rate=1e-3, per_device_train_batch_size=16, num_generations=8, max_completion_length=12,
                      max_steps=10, dtype="float32", gradient_checkpointing=False, seed=0)
    trainer = GRPOTrainer(model, sum_reward, args, rows, tokenizer)

    curve = train_and_measure(trainer)
    assert curve.last > curve.first + 0.25, f"reward did not rise: {[round(r, 3) for r in curve.rewards]}"
    print(f"\nSmolLM2 4-bit: {curve.summary()}")
