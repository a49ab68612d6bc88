"""MetricsLogger: metrics.jsonl content, console table rows every logging_steps, samples, resume-safe reading."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from fusedrl.train.metrics_log import MetricsLogger, read_metrics, to_float, window_statistic


def step_metrics(step: int, reward: float) -> dict:
    return {
        "step": float(step),
        "loss": torch.tensor(0.25 * step),
        "reward": reward,
        "reward_std": 0.5,
        "rewards/correctness_reward/mean": reward / 2,
        "rewards/correctness_reward/std": 0.1,
        "completions/mean_length": 10.0 + step,
        "completions/max_length": 20.0 + step,
        "learning_rate": 1e-5,
        "memory/peak_gb": float(step),
        "entropy": float("nan"),
    }


def test_jsonl_every_step_table_every_logging_steps(tmp_path):
    out = io.StringIO()
    logger = MetricsLogger(
        tmp_path,
        logging_steps=2,
        max_steps=4,
        progress_bar=False,
        tensorboard=False,
        stream=out,
    )
    for step, reward in [(1, 1.0), (2, 3.0), (3, 5.0)]:
        logger.on_log(step_metrics(step, reward))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "reward" in lines[0] and "correctness" in lines[0] and "len_max" in lines[0]
    row = dict(
        zip(
            [c.strip() for c in lines[0].split("|")],
            [c.strip() for c in lines[1].split("|")],
        )
    )
    assert row["step"] == "2" and row["reward"] == "2.000±0.500"  # mean over steps 1-2
    assert row["len_max"] == "22" and row["mem_GB"] == "2.00"  # max over the window
    assert row["loss"] == "0.3750" and "entropy" not in row  # NaN entropy never reaches the table
    logger.close()
    lines = out.getvalue().splitlines()
    assert lines[-1].split("|")[0].strip() == "3"  # close() flushes the partial window
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["loss"] == 0.25 and records[0]["entropy"] is None


def test_reward_names_containing_min_or_max_are_averaged(tmp_path):
    # "terminal_answer_reward" contains "min": its column must still be the window's mean, not its minimum
    out = io.StringIO()
    logger = MetricsLogger(tmp_path, logging_steps=2, progress_bar=False, tensorboard=False, stream=out)
    for step, value in [(1, 0.2), (2, 0.6)]:
        logger.log({"step": step, "reward": value, "rewards/terminal_answer_reward/mean": value,
                    "rewards/maximal_reward/mean": 1 - value, "clip_ratio/low_min": value})
    titles, cells = ([c.strip() for c in line.split("|")] for line in out.getvalue().splitlines())
    row = dict(zip(titles, cells))
    assert row["terminal_answer"] == "0.400" and row["maximal"] == "0.600"
    logger.close()
    assert [window_statistic(k) for k in ("rewards/terminal_answer_reward/mean", "completions/max_length",
                                          "clip_ratio/low_min", "clip_ratio/high_max", "sampling/x/max",
                                          "memory/peak_gb", "rewards/max_reward/std")] == [
        "mean", "max", "min", "max", "max", "max", "mean"]


def test_resumed_run_later_records_win_and_torn_lines_are_skipped(tmp_path):
    with MetricsLogger(tmp_path, progress_bar=False, tensorboard=False, stream=io.StringIO()) as logger:
        for step in (1, 2, 3):
            logger.log(step_metrics(step, 0.0))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss"')  # killed mid-write
    with MetricsLogger(
        tmp_path,
        initial_step=2,
        progress_bar=False,
        tensorboard=False,
        stream=io.StringIO(),
    ) as l2:
        l2.log(step_metrics(3, 7.0))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["reward"] == 7.0


def test_samples_are_written_and_printed(tmp_path):
    out = io.StringIO()
    logger = MetricsLogger(
        tmp_path,
        log_completions=True,
        num_completions_to_print=1,
        progress_bar=False,
        tensorboard=False,
        stream=out,
    )
    prompts = [[{"role": "user", "content": "What is 2+2?"}]] * 2
    completions = [[{"role": "assistant", "content": "<answer>4</answer>"}], "five"]
    logger.log_samples(5, prompts, completions, {"correctness_reward": [2.0, 0.0]})
    assert "What is 2+2?" in out.getvalue() and "<answer>4</answer>" in out.getvalue() and "five" not in out.getvalue()
    rows = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [r["rewards"]["correctness_reward"] for r in rows] == [2.0, 0.0]
    with pytest.raises(ValueError, match="rewards"):
        logger.log_samples(5, prompts, completions, {"r": [1.0]})
    logger.close()


def test_progress_bar_and_argument_checks(tmp_path):
    out = io.StringIO()
    with MetricsLogger(tmp_path, max_steps=3, tensorboard=False, stream=out) as logger:
        logger.log(step_metrics(1, 0.5))
    assert "1/3" in out.getvalue()
    with pytest.raises(ValueError, match="logging_steps"):
        MetricsLogger(tmp_path, logging_steps=0)
    with pytest.raises(ValueError, match="tensorboard"):
        MetricsLogger(tmp_path, tensorboard="yes")
    assert to_float(torch.tensor(float("inf"))) is None and to_float(3) == 3.0 and to_float("x") is None
    assert math.isclose(to_float(torch.tensor(0.1)), 0.1, rel_tol=1e-6)


def test_resumed_trainer_sets_the_progress_bar(tmp_path):
    from types import SimpleNamespace

    out = io.StringIO()
    logger = MetricsLogger(tmp_path, max_steps=None, tensorboard=False, stream=out)
    logger.on_train_begin(SimpleNamespace(state=SimpleNamespace(global_step=2, max_steps=5)))
    logger.on_log(step_metrics(3, 0.5))
    logger.on_train_end(None)
    assert "2/5" in out.getvalue() and "3/5" in out.getvalue()
    assert [r["step"] for r in read_metrics(tmp_path)] == [3]
