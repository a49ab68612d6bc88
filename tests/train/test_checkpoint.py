"""Checkpoint round trip, atomicity under failed writes, clear disk-full / permission errors, rotation."""

from __future__ import annotations

import errno
import json
import random

import numpy as np
import pytest
import torch
from fusedrl.train.rng import capture_rng_state, restore_rng_state
from fusedrl.train.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_peft_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(config)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
    )
    return get_peft_model(base, lora)


def make_training_objects(seed: int):
    model = tiny_peft_model(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    return model, optimizer, scheduler, scaler


def train_one_step(model, optimizer, scheduler) -> float:
    ids = torch.randint(0, 97, (3, 11))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.item()


def objects_state(optimizer, scheduler, scaler=None, generators=None) -> dict:
    """What a trainer's state_dict holds besides its JSON part: the state dicts of its objects and its RNGs."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "rng": capture_rng_state(generators)}


def test_round_trip_restores_weights_state_and_json(tmp_path):
    model, optimizer, scheduler, scaler = make_training_objects(seed=3)
    train_one_step(model, optimizer, scheduler)
    gen = torch.Generator().manual_seed(11)
    torch.randn(5, generator=gen)
    progress = {"global_step": 1, "data_position": 7, "history": [{"step": 1, "loss": 0.5}]}
    path = save_checkpoint(tmp_path, 1, model=model, trainer_state=progress,
                           state=objects_state(optimizer, scheduler, scaler, {"rollout": gen}))
    assert path.name == "checkpoint-1"
    assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-1"
    saved_lora = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}

    expected_py, expected_np, expected_torch = random.random(), np.random.rand(), torch.rand(3)
    expected_gen = torch.randn(4, generator=gen)
    train_one_step(model, optimizer, scheduler)  # the RNG draws of a step must not disturb what was saved

    model2, optimizer2, scheduler2, scaler2 = make_training_objects(seed=99)  # different init
    gen2 = torch.Generator()
    random.seed(0)
    loaded, state = load_checkpoint(tmp_path, model=model2)
    optimizer2.load_state_dict(state["optimizer"])
    scheduler2.load_state_dict(state["scheduler"])
    scaler2.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"], {"rollout": gen2})
    assert loaded == progress
    assert random.random() == expected_py and np.random.rand() == expected_np
    assert torch.equal(torch.rand(3), expected_torch)
    assert torch.equal(torch.randn(4, generator=gen2), expected_gen)
    loaded_lora = {k: v for k, v in model2.state_dict().items() if "lora_" in k}
    assert loaded_lora.keys() == saved_lora.keys() and len(saved_lora) == 12
    assert all(torch.equal(loaded_lora[k], saved_lora[k]) for k in saved_lora)
    assert scaler2.get_scale() == 512.0
    assert optimizer2.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert scheduler2.last_epoch == 1


def test_resumed_training_matches_uninterrupted(tmp_path):
    model, optimizer, scheduler, _ = make_training_objects(seed=5)
    train_one_step(model, optimizer, scheduler)
    save_checkpoint(tmp_path, 1, model=model, trainer_state={"global_step": 1},
                    state=objects_state(optimizer, scheduler))
    uninterrupted = [train_one_step(model, optimizer, scheduler) for _ in range(2)]

    model2, optimizer2, scheduler2, _ = make_training_objects(seed=5)  # same base, fresh LoRA/optimizer
    for p in model2.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    _, state = load_checkpoint(tmp_path / "checkpoint-1", model=model2)
    optimizer2.load_state_dict(state["optimizer"])
    scheduler2.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    resumed = [train_one_step(model2, optimizer2, scheduler2) for _ in range(2)]
    assert resumed == uninterrupted


class FailingModel(torch.nn.Module):
    """Stands in for a model whose weights cannot be written: raises the given error mid-save."""

    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def save_pretrained(self, directory):
        (directory / "adapter_model.safetensors").write_bytes(b"half")
        raise self.error


@pytest.mark.parametrize(
    "error, words",
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/x/adapter_model.safetensors"),
            "disk full",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/x/adapter_model.safetensors"),
            "permission denied",
        ),
    ],
)
def test_failed_write_raises_clear_error_and_keeps_latest_loadable(tmp_path, error, words):
    model, optimizer, _, _ = make_training_objects(seed=1)
    save_checkpoint(tmp_path, 2, model=model, trainer_state={"global_step": 2}, state={"x": torch.ones(2)})
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path, 4, model=FailingModel(error), trainer_state={"global_step": 4})
    message = str(info.value)
    assert words in message and "checkpoint-4" in message and "checkpoint-2" in message
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("checkpoint-2")] == ["latest"]
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-2"
    progress, state = load_checkpoint(tmp_path, model=tiny_peft_model(1))
    assert progress["global_step"] == 2 and torch.equal(state["x"], torch.ones(2))


def test_crash_mid_write_leaves_latest_loadable_and_is_cleaned_up(tmp_path):
    model = tiny_peft_model(seed=2)
    save_checkpoint(tmp_path, 1, model=model, trainer_state={"global_step": 1})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model=FailingModel(KeyboardInterrupt()), trainer_state={"global_step": 2})
    # a process killed outright leaves a temporary dir and an incomplete checkpoint dir behind
    (tmp_path / ".tmp-checkpoint-3-deadbeef").mkdir()
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-9" / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-1"
    (tmp_path / "latest").unlink()  # even without the pointer the incomplete dir is never chosen
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-1"
    save_checkpoint(tmp_path, 3, model=model, trainer_state={"global_step": 3})
    assert not (tmp_path / ".tmp-checkpoint-3-deadbeef").exists()
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-3"


def test_rotation_keeps_newest_and_resave_replaces(tmp_path):
    model, *_ = make_training_objects(seed=4)
    for step in (1, 2, 3, 4):
        save_checkpoint(
            tmp_path,
            step,
            model=model,
            trainer_state={"global_step": step},
            save_total_limit=2,
        )
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-3",
        "checkpoint-4",
    ]
    save_checkpoint(
        tmp_path,
        4,
        model=model,
        trainer_state={"global_step": 4, "again": True},
        save_total_limit=2,
    )
    assert json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["again"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-3",
        "checkpoint-4",
        "latest",
    ]


def test_argument_errors(tmp_path):
    model, *_ = make_training_objects(seed=0)
    with pytest.raises(CheckpointError, match="step"):
        save_checkpoint(tmp_path, -1, model=model, trainer_state={})
    with pytest.raises(CheckpointError, match="save_total_limit"):
        save_checkpoint(tmp_path, 1, model=model, trainer_state={}, save_total_limit=0)
    with pytest.raises(CheckpointError, match="trainer_state"):
        save_checkpoint(tmp_path, 1, model=model, trainer_state={"x": object()})
    assert find_latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(tmp_path, model=model)
