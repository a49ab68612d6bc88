"""GRPO through VLLMEngine learns: SmolLM2-135M-Instruct + LoRA on one-digit sums, rollouts sampled by vLLM (slow).

Same task and settings as tests/train/test_learning_smollm.py (the built-in engine's learning test): the reward is 1
when the correct sum appears as a number in the completion; the untrained model rambles. Every step must log the
LoRA handoff time and the trainer-vs-sampler log-probability gap.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from vllm_helpers import restore_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "train"))
from reward_curve import train_and_measure  # noqa: E402

pytestmark = pytest.mark.slow


def sum_reward(prompts, completions, answer, **kwargs):
    return [1.0 if expected in re.findall(r"\d+", c[0]["content"]) else 0.0 for c, expected in zip(completions, answer)]


def test_grpo_through_vllm_teaches_smollm2_to_answer_sums(shared_model, tmp_path):
    from fusedrl.train.config import GRPOConfig
    from fusedrl.train.trainer import GRPOTrainer

    model, tokenizer = shared_model
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}? Reply with only the number."}],
             "answer": str(a + b)} for a in range(1, 6) for b in range(1, 6)]
    args = GRPOConfig(learning_rate=1e-3, per_device_train_batch_size=16, num_generations=8, max_completion_length=12,
                      max_steps=10, dtype="float32", gradient_checkpointing=False, seed=0, use_vllm=True,
                      vllm_mode="colocate", vllm_enable_sleep_mode=True, output_dir=str(tmp_path))
    with restore_adapter(model):
        trainer = GRPOTrainer(model, sum_reward, args, rows, tokenizer)
        assert trainer.engine is model.vllm_engine and trainer.corrects_sampler_mismatch
        curve = train_and_measure(trainer)
        model.vllm_engine.shared.check_unchanged()
    handoff_ms = [h["vllm/handoff_ms"] for h in curve.history]
    gaps = [h["sampling/sampling_logp_difference/mean"] for h in curve.history]
    print(f"\nvLLM GRPO: {curve.summary()}; handoff {min(handoff_ms):.1f}-{max(handoff_ms):.1f} ms/step; "
          f"trainer-vs-sampler |logp gap| mean {max(gaps):.2e} at most")
    assert len(handoff_ms) == len(gaps) == 10
    assert max(gaps) < 1e-3  # float32 on both sides: the same weights and adapter, different kernels
    assert curve.last > curve.first + 0.25, f"reward did not rise: {[round(r, 3) for r in curve.rewards]}"
