"""GRPOTrainer owns its run state: state_dict() / load_state_dict() continue a run exactly, without any files."""

from __future__ import annotations

import copy
import json

import peft
import torch
from fusedrl.model.tiny import tiny_model_from_tokenizer, tiny_word_tokenizer
from fusedrl.train.config import GRPOConfig
from fusedrl.train.trainer import GRPOTrainer


def digit_reward(prompts, completions, **kwargs):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def make_trainer(tmp_path, max_steps: int) -> GRPOTrainer:
    tokenizer = tiny_word_tokenizer()
    base = tiny_model_from_tokenizer(tokenizer, hidden=16, layers=1, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    # gradient accumulation 2 over a round of 4 micro-batches: step 1 ends mid-round
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2,
                      gradient_accumulation_steps=2, steps_per_generation=4, num_generations=2,
                      max_completion_length=3, learning_rate=5e-2, dtype="float32", gradient_checkpointing=False,
                      seed=5)
    dataset = [{"prompt": f"what is {a} + 1 ?"} for a in range(1, 5)]
    return GRPOTrainer(model, [digit_reward], args, dataset, processing_class=tokenizer)


def test_state_dict_continues_a_run_exactly(tmp_path):
    first = make_trainer(tmp_path, max_steps=1)
    first.train()
    state = copy.deepcopy(first.state_dict())
    weights = {k: v.clone() for k, v in first.model.state_dict().items() if "lora_" in k}
    json.dumps({"progress": state["progress"], "model": state["model"]})  # the JSON part is JSON
    assert state["buffer"]["stored_round"] is not None  # mid-round: the round travels with the state
    first.state.max_steps = 3
    first.train()

    resumed = make_trainer(tmp_path, max_steps=3)
    resumed.load_state_dict(state)
    resumed.model.load_state_dict(weights, strict=False)
    assert resumed.state.global_step == 1 and resumed.state.max_steps == 3
    resumed.train()
    assert [(h["step"], h["loss"]) for h in resumed.state.history] == [(h["step"], h["loss"])
                                                                      for h in first.state.history]
