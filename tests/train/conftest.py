"""Trainer tests run in a fresh working directory: a GRPOTrainer writes what its GRPOConfig asks (output_dir,
"trainer_output" by default, as in TRL) even when a test passes no callbacks."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
