"""The loss benchmark's --cpu-smoke path runs every peer it can import and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fusedrl

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 20 s: CI's full run covers it
def test_bench_cpu_smoke_writes_rows_for_every_mode(tmp_path):
    # the fusedrl this test imported (the source tree with a dev build, or the installed package in CI)
    env = {**os.environ, "PYTHONPATH": str(Path(fusedrl.__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, str(ROOT / "bench/bench_grpo_loss.py"), "--cpu-smoke", "--json",
                             str(tmp_path / "out.json")], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["meta"]["timer"].startswith("torch.utils.benchmark")
    fused = [row for row in report["rows"] if row.get("impl") == "fusedrl"]
    assert {row["mode"] for row in fused} == {"frozen_token", "frozen_sequence", "trainable_token", "logprob"}
    assert all(row["status"] == "ok" and row["ms"] > 0 for row in fused)
