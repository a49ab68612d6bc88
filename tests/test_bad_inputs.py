"""The catalogue of bad inputs: each gives a one-line error naming the field and the expected value, and leaves
nothing written or lost. The CLI prints that line (no traceback) and exits 2; the Python API raises a plain
exception type (ValueError, TypeError, FileNotFoundError, CheckpointError) with the same message."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import peft
import pytest
import torch
from fusedrl.cli import main
from fusedrl.model.load import load_model
from fusedrl.model.lora import LoraConfig
from fusedrl.model.tiny import tiny_model_from_tokenizer, tiny_word_tokenizer
from fusedrl.train.checkpoint import CheckpointCallback, CheckpointError, find_latest_checkpoint, \
    restore_trainer_checkpoint, save_trainer_checkpoint
from fusedrl.train.config import GRPOConfig
from fusedrl.train.trainer import GRPOTrainer


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: compared before and after a failed command."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit 2, one error line last on stderr (progress bars of datasets may come before it)
    and no traceback; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert errors[0].startswith("fusedrl: error: ")
    return errors[0]


@pytest.fixture
def run_files(tmp_path):
    """A tiny model folder, a chat .jsonl dataset and a config writing to tmp_path/run."""
    tokenizer = tiny_word_tokenizer()
    tiny_model_from_tokenizer(tokenizer, hidden=16, layers=1, seed=0).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"prompt": [{"role": "user", "content": f"what is {a} + 1 ?"}], "answer": str(a + 1)} for a in range(4)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def write_config(tmp_path: Path, *, train: dict | None = None, model: str | None = None, lora: str = "r = 2",
                 dataset: str | None = None) -> Path:
    """A TOML config of a one-step run; `train` entries replace the defaults."""
    values = {"max_steps": 1, "num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 2,
              "dtype": "float32", "gradient_checkpointing": False, "output_dir": str(tmp_path / "run"),
              **(train or {})}
    model = model if model is not None else f'name_or_path = "{tmp_path / "model"}"\ndtype = "float32"'
    dataset = dataset if dataset is not None else f'name = "{tmp_path / "data.jsonl"}"'
    config = tmp_path / "run.toml"
    config.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
                      + f'[model]\n{model}\n[lora]\n{lora}\ntarget_modules = ["q_proj"]\n[dataset]\n{dataset}\n'
                      '[rewards]\ncorrectness_reward = 1.0\n')
    return config


# ---------------------------------------------------------------------------------------------------------------
# the command line: one line, exit 2, the run directory untouched
# ---------------------------------------------------------------------------------------------------------------

CLI_CASES = {
    "model path does not exist": (dict(model='name_or_path = "/no/such/model"'), ["name_or_path", "/no/such/model",
                                                                                  "does not exist"]),
    "empty jsonl dataset": (dict(dataset="EMPTY"), ["[dataset]", "is empty", "'prompt'"]),
    "dataset without prompt column": (dict(dataset="NOPROMPT"), ["[dataset]", "'prompt'", "found columns"]),
    "wrong-typed value": (dict(train={"learning_rate": "fast"}), ["learning_rate", "expected a float", "'fast'"]),
    "max_steps not an integer": (dict(train={"max_steps": 2.5}), ["max_steps", "expected an int", "2.5"]),
    "lora key typo": (dict(lora="rank = 2"), ["[lora]", "'rank'", "expected some of ['bias', 'lora_alpha', 'lora_dropout', 'r',"]),
    "num_generations does not divide the generation batch": (
        dict(train={"num_generations": 3}), ["generation_batch_size", "divisible by num_generations"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_is_one_line_and_writes_nothing(run_files, capsys, case):
    overrides, words = CLI_CASES[case]
    if overrides.get("dataset") == "EMPTY":
        (run_files / "empty.jsonl").write_text("\n")
        overrides = dict(dataset=f'name = "{run_files / "empty.jsonl"}"')
    if overrides.get("dataset") == "NOPROMPT":
        (run_files / "q.jsonl").write_text(json.dumps({"question": "1 + 1?"}) + "\n")
        overrides = dict(dataset=f'name = "{run_files / "q.jsonl"}"')
    config = write_config(run_files, **overrides)
    before = snapshot(run_files)
    err = cli_error(capsys, ["train", str(config)])
    for word in words:
        assert word in err, (word, err)
    assert snapshot(run_files) == before and not (run_files / "run").exists()


def test_cli_output_dir_that_is_a_file(run_files, capsys):
    (run_files / "run").write_text("notes")
    err = cli_error(capsys, ["train", str(write_config(run_files))])
    assert "output_dir" in err and "is a file" in err and "expected a directory" in err
    assert (run_files / "run").read_text() == "notes"


def test_cli_eval_of_a_missing_model(capsys):
    err = cli_error(capsys, ["eval", "--model", "/no/such/model", "--limit", "1"])
    assert "name_or_path" in err and "does not exist" in err


def test_cli_resume_from_another_model_and_from_a_corrupted_checkpoint(run_files, capsys):
    assert main(["train", str(write_config(run_files))]) == 0
    run = run_files / "run"
    capsys.readouterr()
    # another model: a wider tiny model under the same config
    tokenizer = tiny_word_tokenizer()
    tiny_model_from_tokenizer(tokenizer, hidden=32, layers=1, seed=0).save_pretrained(run_files / "other")
    tokenizer.save_pretrained(run_files / "other")
    config = write_config(run_files, model=f'name_or_path = "{run_files / "other"}"\ndtype = "float32"')
    before = snapshot(run)
    err = cli_error(capsys, ["train", str(config), "--resume", str(run), "--max-steps", "2"])
    assert "another model" in err and "hidden_size 16 vs 32" in err
    assert snapshot(run) == before
    # a corrupted state file
    (find_latest_checkpoint(run) / "state.pt").write_bytes(b"not a torch file")
    before = snapshot(run)
    err = cli_error(capsys, ["train", "--resume", str(run), "--max-steps", "2"])
    assert "state.pt is corrupted" in err
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------------------------
# the Python API: clear exception types with the same messages
# ---------------------------------------------------------------------------------------------------------------


def test_config_values_are_type_checked():
    with pytest.raises(TypeError, match=r"learning_rate: expected a float, got 'fast' \(str\)"):
        GRPOConfig(learning_rate="fast")
    with pytest.raises(TypeError, match=r"max_steps: expected an int, got 2.5 \(float\)"):
        GRPOConfig(max_steps=2.5)
    with pytest.raises(ValueError, match=r"gradient_checkpointing must be True, False, 'offload' .* got 'yes'"):
        GRPOConfig(gradient_checkpointing="yes")
    with pytest.raises(ValueError, match=r"generation_batch_size \(6 .*divisible by num_generations \(4\)"):
        GRPOConfig(per_device_train_batch_size=6, num_generations=4)
    with pytest.raises(ValueError, match=r"unknown LoraConfig field\(s\): 'lora_alpa' \(did you mean 'lora_alpha'\?\)"):
        LoraConfig.from_dict({"lora_alpa": 4})


def test_load_model_of_a_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="name_or_path: .*nowhere does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        load_model(str(tmp_path / "file"))


def one_reward(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def make_trainer(tmp_path, *, reward=one_reward, dataset=None, tokenizer=None, hidden=16, **overrides):
    tokenizer = tokenizer if tokenizer is not None else tiny_word_tokenizer()
    base = tiny_model_from_tokenizer(tokenizer, hidden=hidden, layers=1, seed=0)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    values = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=3, dtype="float32", gradient_checkpointing=False, seed=3)
    values.update(overrides)
    dataset = dataset if dataset is not None else [{"prompt": [{"role": "user", "content": "what is 1 + 1 ?"}]}] * 4
    return GRPOTrainer(model, [reward], GRPOConfig(**values), dataset, processing_class=tokenizer)


def test_dataset_and_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset rows must have a 'prompt' column .*\['question'\]"):
        make_trainer(tmp_path, dataset=[{"question": "1 + 1"}])
    with pytest.raises(ValueError, match="train_dataset is empty"):
        make_trainer(tmp_path, dataset=[])
    tokenizer = tiny_word_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="processing_class has no chat_template but the prompts are chat messages"):
        make_trainer(tmp_path, tokenizer=tokenizer)


@pytest.mark.parametrize("reward, error, words", [
    (lambda prompts, completions, **kw: [1.0], ValueError, r"returned 1 rewards; expected one per completion \(4\)"),
    (lambda prompts, completions, **kw: ["good"] * len(completions), TypeError,
     r"returned 'good' at position 0; expected a float \(or None"),
], ids=["wrong-length", "not-a-number"])
def test_reward_function_errors(tmp_path, reward, error, words):
    trainer = make_trainer(tmp_path, reward=reward)
    with pytest.raises(error, match=words):
        trainer.train()
    assert trainer.state.global_step == 0


def test_checkpoint_of_another_model_is_refused_before_anything_changes(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    path = save_trainer_checkpoint(trainer, tmp_path / "run")
    other = make_trainer(tmp_path, hidden=32)
    weights = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(CheckpointError, match="another model .*hidden_size 16 vs 32"):
        restore_trainer_checkpoint(other, path)
    assert other.state.global_step == 0
    assert all(torch.equal(weights[k], v) for k, v in other.model.state_dict().items())


def test_corrupted_checkpoint_files_are_named(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    path = save_trainer_checkpoint(trainer, tmp_path / "run")
    (path / "state.pt").write_bytes((path / "state.pt").read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=r"state.pt is corrupted"):
        restore_trainer_checkpoint(make_trainer(tmp_path), path)
    path = save_trainer_checkpoint(trainer, tmp_path / "run2")
    (path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model weights cannot be loaded"):
        restore_trainer_checkpoint(make_trainer(tmp_path), path)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.add_callback(CheckpointCallback(run, save_steps=1))
    real_save = torch.save

    def full_disk_at_step_2(obj, f, *args, **kwargs):
        if trainer.state.global_step == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_at_step_2)
    with pytest.raises(CheckpointError, match=r"could not save checkpoint .*checkpoint-2: no space left on device "
                                              r"\(disk full\).*latest: .*checkpoint-1"):
        trainer.train()
    monkeypatch.undo()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1", "latest"]
    resumed = make_trainer(tmp_path, max_steps=2)
    restore_trainer_checkpoint(resumed, run)
    assert resumed.state.global_step == 1
    resumed.train()
    assert resumed.state.global_step == 2
