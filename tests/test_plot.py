"""plot_run draws a PNG from metrics.jsonl, including runs with missing metrics."""

from __future__ import annotations

import json
import random

import pytest
from fusedrl.plot import plot_run


def write_metrics(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def test_plot_run_writes_a_png(tmp_path):
    rng = random.Random()
    records = [
        {
            "step": s,
            "loss": rng.uniform(-1, 1),
            "reward": rng.random(),
            "reward_std": 0.1,
            "rewards/correctness_reward/mean": rng.random(),
            "rewards/xmlcount_reward/mean": rng.random(),
            "completions/mean_length": rng.uniform(5, 50),
            "completions/max_length": 64,
            "entropy": None,
        }
        for s in range(1, rng.randint(3, 17))
    ]
    write_metrics(tmp_path / "run", records)
    path = plot_run(tmp_path / "run")
    assert path == tmp_path / "run" / "metrics.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_run_with_missing_metrics_and_errors(tmp_path):
    write_metrics(tmp_path / "run", [{"step": 1, "loss": 0.5}])
    out = plot_run(tmp_path / "run", tmp_path / "elsewhere" / "p.png")
    assert out.is_file()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path / "nothing")
    write_metrics(tmp_path / "empty", [])
    with pytest.raises(ValueError, match="no metrics"):
        plot_run(tmp_path / "empty")
