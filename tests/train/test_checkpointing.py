"""The trainer's checkpointing modes: "offload" (a no-op copy on CPU, same recompute) and chunked MLPs give the
same training step as plain checkpointing; the memory plan is attached to the trainer."""

from __future__ import annotations

import pytest
import torch

from fusedrl.model.tiny import tiny_model_from_tokenizer, tiny_word_tokenizer
from fusedrl.train.config import GRPOConfig
from fusedrl.train.trainer import GRPOTrainer

ROWS = [{"prompt": [{"role": "user", "content": f"what is {i}"}]} for i in range(4)]


def reward(prompts, completions, **kwargs):
    return [float(len(str(c))) for c in completions]


def one_step(gradient_checkpointing, mlp_chunk_tokens, dtype: torch.dtype) -> tuple[GRPOTrainer, dict]:
    tokenizer = tiny_word_tokenizer()
    model = tiny_model_from_tokenizer(tokenizer, hidden=32, layers=3, seed=0).to(dtype)
    args = GRPOConfig(per_device_train_batch_size=4, num_generations=4, max_completion_length=6, learning_rate=1e-2,
                      dtype="float32", gradient_checkpointing=gradient_checkpointing, mlp_chunk_tokens=mlp_chunk_tokens,
                      seed=3, max_steps=1, shuffle_dataset=False)
    trainer = GRPOTrainer(model, reward, args, ROWS, tokenizer)
    trainer.train()
    return trainer, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_offload_mode_gives_the_same_step_as_plain_checkpointing_bitwise_on_cpu():
    plain_trainer, plain = one_step(True, 0, torch.float32)
    offload_trainer, offloaded = one_step("unsloth", 0, torch.float32)
    assert offload_trainer.memory_plan.offload and not plain_trainer.memory_plan.offload
    assert getattr(offload_trainer.model, "fusedrl_checkpointing", None) is not None
    for name in plain:
        assert torch.equal(plain[name], offloaded[name]), name


def test_chunked_mlp_step_matches_unchunked_in_float64():
    _, plain = one_step(True, 0, torch.float64)
    trainer, chunked = one_step("offload", 5, torch.float64)
    assert trainer.memory_plan.mlp_chunk_tokens == 5
    for name in plain:
        torch.testing.assert_close(chunked[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)


def test_checkpointing_off_leaves_no_plan():
    trainer, _ = one_step(False, None, torch.float32)
    assert trainer.memory_plan is None


def test_host_budget_counts_the_arena_a_new_runner_takes_over():
    """A second trainer on the same model reuses the pinned arena of the first: the plan's host budget must add it
    back (it is no longer in MemAvailable), else a step that fitted is refused the second time."""
    from fusedrl.nn.offload import OffloadedCheckpointing
    from fusedrl.train.checkpointing import pinnable_host_bytes

    model = tiny_model_from_tokenizer(tiny_word_tokenizer(), hidden=32, layers=3, seed=0)
    runner = OffloadedCheckpointing.install(model, offload=True)
    assert pinnable_host_bytes(None, runner) is None  # unknown host memory: no host limit
    assert pinnable_host_bytes(8 << 30, None) == 6 << 30
    assert pinnable_host_bytes(8 << 30, runner) == 6 << 30  # nothing pinned yet (CPU: no arena)
    runner.pinned_bytes = lambda: 62 << 30  # as after a CUDA run that pinned a 62 GiB arena
    assert pinnable_host_bytes(8 << 30, runner) == (6 << 30) + (62 << 30)
    assert pinnable_host_bytes(8 << 30, object()) == 6 << 30  # not our runner: nothing to take over
