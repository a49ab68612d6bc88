"""The `fusedrl` command: argument parsing, TOML configs, and train -> resume -> plot -> eval end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fusedrl.cli import (
    ConfigError,
    build_parser,
    demo_run_config,
    load_run_config,
    main,
    run_config_from_mapping,
)
from fusedrl.model.tiny import tiny_model_from_tokenizer, tiny_word_tokenizer


def test_argument_parsing():
    parser = build_parser()
    args = parser.parse_args(
        [
            "train",
            "cfg.toml",
            "--resume",
            "runs/a",
            "--max-steps",
            "5",
            "--output-dir",
            "o",
        ]
    )
    assert (
        args.command,
        args.config,
        args.resume,
        args.max_steps,
        args.output_dir,
    ) == ("train", Path("cfg.toml"), Path("runs/a"), 5, "o")
    assert parser.parse_args(["train"]).config is None
    args = parser.parse_args(["eval", "--model", "m", "--adapter", "a", "--limit", "7"])
    assert (args.model, args.adapter, args.limit) == ("m", Path("a"), 7)
    assert parser.parse_args(["plot", "runs/x"]).run_dir == Path("runs/x")
    with pytest.raises(SystemExit):
        parser.parse_args(["eval"])  # --model is required
    assert main(["train", "--max-steps", "0"]) == 2


def test_toml_config_sections(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'learning_rate = 1e-4\n[train]\nmax_steps = 3\n[model]\nname_or_path = "m"\ndtype = "float32"\n'
        '[lora]\nr = 8\n[dataset]\nname = "gsm8k-offline"\nlimit = 4\n'
        "[rewards]\ncorrectness_reward = 2.0\nxmlcount_reward = 0.5\n"
    )
    run = load_run_config(path)
    assert run.train == {"learning_rate": 1e-4, "max_steps": 3}
    assert run.model == {"name_or_path": "m", "dtype": "float32"} and run.lora == {"r": 8}
    assert run.rewards == [("correctness_reward", 2.0), ("xmlcount_reward", 0.5)]
    assert run_config_from_mapping({"rewards": {"names": ["a", "b"], "weights": [1, 3]}}).rewards == [
        ("a", 1.0),
        ("b", 3.0),
    ]
    assert run_config_from_mapping({"lora": {"enabled": False}}).lora is None
    with pytest.raises(ConfigError, match="both at top level"):
        run_config_from_mapping({"seed": 1, "train": {"seed": 2}})
    with pytest.raises(ConfigError, match=r"\[model\].*name_or_pth"):
        run_config_from_mapping({"model": {"name_or_pth": "x"}})
    with pytest.raises(ConfigError, match="weight"):
        run_config_from_mapping({"rewards": {"correctness_reward": "high"}})
    (tmp_path / "bad.toml").write_text("x = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(tmp_path / "bad.toml")
    demo = demo_run_config()
    assert demo.model["name_or_path"] == "smollm2-offline" and demo.dataset["name"] == "sums"
    assert demo_run_config("gsm8k").dataset["name"] == "gsm8k-offline"
    with pytest.raises(ConfigError, match="unknown demo 'gsm9k'"):
        demo_run_config("gsm9k")


def test_config_errors_are_one_line_messages(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text('[rewards]\nnames = ["correctness_rewrd"]\n')
    assert main(["train", str(path)]) == 2
    assert "correctness_reward" in capsys.readouterr().err  # the close match is suggested
    path.write_text("lerning_rate = 1.0\n")
    assert main(["train", str(path)]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


@pytest.fixture
def tiny_run_files(tmp_path):
    tokenizer = tiny_word_tokenizer()
    model = tiny_model_from_tokenizer(tokenizer, hidden=32, layers=2, seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with open(tmp_path / "data.jsonl", "w") as f:
        f.writelines(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": f"what is {a} + 1 ?"}],
                    "answer": str(a + 1),
                }
            )
            + "\n"
            for a in range(5)
        )
    config = tmp_path / "run.toml"
    config.write_text(f'''
max_steps = 3
learning_rate = 1e-3
num_generations = 2
per_device_train_batch_size = 4
max_completion_length = 6
dtype = "float32"
gradient_checkpointing = false
logging_steps = 1
save_steps = 1
log_completions = true
num_completions_to_print = 1
output_dir = "{tmp_path / "run"}"
[model]
name_or_path = "{tmp_path / "model"}"
dtype = "float32"
[lora]
r = 4
target_modules = ["q_proj", "v_proj"]
[dataset]
name = "{tmp_path / "data.jsonl"}"
[rewards]
correctness_reward = 1.0
int_reward = 0.5
''')
    return tmp_path, config


def test_train_resume_plot_eval_end_to_end(tiny_run_files, capsys):
    tmp_path, config = tiny_run_files
    run = tmp_path / "run"
    assert main(["train", str(config), "--max-steps", "2"]) == 0
    assert (run / "latest").read_text().strip() == "checkpoint-2"
    assert (run / "final_adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "run_config.json").read_text())["train"]["max_steps"] == 2
    # resume with the saved run_config.json, one more step
    assert main(["train", "--resume", str(run), "--max-steps", "3"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["progress"]["global_step"] == 3 and len(state["progress"]["history"]) == 3
    assert main(["plot", str(run)]) == 0 and (run / "metrics.png").is_file()
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "model"),
                "--adapter",
                str(run / "final_adapter"),
                "--dataset",
                str(tmp_path / "data.jsonl"),
                "--limit",
                "3",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert "accuracy: 0.000 (0/3 greedy" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "fusedrl", "--help"],
        check=False,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(Path(__file__).parents[1] / "python"), "PATH": ""},
    )
    assert result.returncode == 0 and "train" in result.stdout and "eval" in result.stdout


def test_sampled_eval_is_seeded_and_checks_its_arguments(tiny_run_files, capsys):
    tmp_path, _ = tiny_run_files
    base = ["eval", "--model", str(tmp_path / "model"), "--dataset", "sums", "--limit", "3", "--max-new-tokens", "4"]
    outputs = []
    for _ in range(2):
        assert main([*base, "--temperature", "1", "--samples", "2", "--show", "6"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and "/6 sampled at temperature 1," in outputs[0]
    for extra, message in [(["--samples", "2"], "--samples 2 needs --temperature"),
                           (["--temperature", "0"], "--temperature: expected a positive number"),
                           (["--temperature", "1", "--samples", "0"], "--samples: expected an integer >= 1")]:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
