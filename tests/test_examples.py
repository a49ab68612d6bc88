"""Every examples/*.toml is a valid config; the demos of `fusedrl train` are exactly their example files; the sums
example runs one training step end to end on a tiny random model (its real model swapped for the tiny one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fusedrl.cli import build_rewards, main
from fusedrl.run_config import load_run_config, run_config_from_mapping
from fusedrl.demo import DEMOS, demo_mapping
from fusedrl.model.tiny import tiny_model_from_tokenizer, tiny_word_tokenizer
from fusedrl.train.config import GRPOConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.toml"))


def test_examples_exist():
    assert {path.stem for path in EXAMPLE_FILES} >= {"sums", "gsm8k", "gsm8k_gspo"}


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda path: path.name)
def test_example_parses_and_validates(path):
    run = load_run_config(path)
    rewards, weights = build_rewards(run.rewards)
    config = GRPOConfig.from_dict({**run.train, "reward_weights": weights})
    assert config.max_steps > 0 and len(rewards) == len(weights)
    assert run.model.get("name_or_path") and run.dataset.get("name")


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_each_demo_is_its_example_file(name):
    assert load_run_config(EXAMPLES / f"{name}.toml") == run_config_from_mapping(demo_mapping(name))


def test_gspo_example_is_sequence_level_and_reuses_rollouts():
    config = GRPOConfig.from_dict(load_run_config(EXAMPLES / "gsm8k_gspo.toml").train)
    assert config.importance_sampling_level == "sequence" and config.loss_type == "dapo"
    assert config.steps_per_generation > config.gradient_accumulation_steps  # ratios differ from 1


def test_sums_example_trains_a_step_on_a_tiny_model(tmp_path, capsys):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    tokenizer = tiny_word_tokenizer()
    tiny_model_from_tokenizer(tokenizer, hidden=32, layers=2, seed=0).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    values = tomllib.loads((EXAMPLES / "sums.toml").read_text())
    values["train"].update(max_steps=1, output_dir=str(tmp_path / "run"))
    values["model"]["name_or_path"] = str(tmp_path / "model")
    config = tmp_path / "sums_tiny.json"
    config.write_text(json.dumps(values))

    assert main(["train", str(config)]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1] and 0.0 <= metrics[0]["reward"] <= 1.0
    assert (tmp_path / "run" / "final_adapter" / "adapter_model.safetensors").is_file()
    out = capsys.readouterr().out
    assert f"reward curve: {tmp_path / 'run' / 'metrics.png'}" in out
    eval_line = next(line.strip() for line in out.splitlines() if line.strip().startswith("fusedrl eval"))
    assert eval_line.endswith("--dataset sums --limit 20 --max-new-tokens 8 --temperature 1 --samples 4")
    # the printed eval command runs (here on the tiny model: 20 held-out sums, 8 tokens each)
    assert main(eval_line.split()[1:]) == 0
    assert "accuracy: " in capsys.readouterr().out
