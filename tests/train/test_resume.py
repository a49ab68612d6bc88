"""Kill-and-resume: a run restored from its checkpoint continues exactly like the run that was never stopped."""

from __future__ import annotations

import peft
import pytest
import torch
from fusedrl.model.tiny import tiny_model_from_tokenizer, tiny_word_tokenizer
from fusedrl.train.checkpoint import CheckpointCallback, find_latest_checkpoint
from fusedrl.train.config import GRPOConfig
from fusedrl.train.trainer import GRPOTrainer

WORDS = ["1", "2", "3", "4", "5", "+", "=", "?", "what", "is"]


def digit_count_reward(prompts, completions, **kwargs):
    return [float(sum(ch.isdigit() for ch in c)) / 4.0 for c in completions]


def make_trainer(run_dir, max_steps: int, callbacks, **overrides) -> GRPOTrainer:
    tokenizer = tiny_word_tokenizer()
    base = tiny_model_from_tokenizer(tokenizer, hidden=16, layers=1, seed=0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = peft.get_peft_model(base, lora)
    values = {
        "output_dir": str(run_dir),
        "max_steps": max_steps,
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 6,
        "learning_rate": 5e-2,
        "dtype": "float32",
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "seed": 7,
        "temperature": 1.0,
    }
    values.update(overrides)
    args = GRPOConfig(**values)
    dataset = [{"prompt": f"what is {a} + {b} ?"} for a in range(1, 5) for b in range(1, 4)]
    return GRPOTrainer(
        model,
        [digit_count_reward],
        args,
        dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


class Killed(Exception):
    """Stands in for the process dying right after a step (and its checkpoint) finished."""


class KillAfterStep:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer) -> None:
        if trainer.state.global_step == self.step:
            raise Killed


def losses(history):
    return [(int(m["step"]), m["loss"], m.get("reward")) for m in history]


@pytest.mark.parametrize(
    "kill_step, overrides",
    [(2, {}), (1, {"gradient_accumulation_steps": 2, "steps_per_generation": 4})],
    ids=[
        "round-per-step",
        "killed-mid-round",
    ],  # 2nd: step 1 ends half-way through a 4-micro-batch round; step 3 needs a new round
)
def test_resumed_run_matches_uninterrupted_run(tmp_path, kill_step, overrides):
    full = make_trainer(tmp_path / "full", 3, [], **overrides)
    full.train()

    interrupted_dir = tmp_path / "run"
    callbacks = [
        CheckpointCallback(interrupted_dir, save_steps=1),
        KillAfterStep(kill_step),
    ]
    with pytest.raises(Killed):
        make_trainer(interrupted_dir, 3, callbacks, **overrides).train()
    latest = find_latest_checkpoint(interrupted_dir)
    assert latest.name == f"checkpoint-{kill_step}"
    saved_round = torch.load(latest / "state.pt", weights_only=True)["buffer"]["stored_round"]
    assert (saved_round is not None) == (kill_step == 1)  # the half-used round travels along

    callback = CheckpointCallback(interrupted_dir, save_steps=1, resume_from=interrupted_dir)
    resumed = make_trainer(interrupted_dir, 3, [callback], **overrides)
    resumed.train()
    assert callback.resumed_from == latest
    assert losses(resumed.state.history) == losses(full.state.history)
    assert find_latest_checkpoint(interrupted_dir).name == "checkpoint-3"
