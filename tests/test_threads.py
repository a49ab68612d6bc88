"""Thread count from free cores: the choice rule, the load measurement, and the trainer callback."""

from __future__ import annotations

import pytest
import torch
from fusedrl import threads


@pytest.mark.parametrize(
    ("other_busy", "cores", "expected"),
    [(0.0, 2, 2), (0.4, 2, 2), (0.6, 2, 1), (1.0, 2, 1), (5.0, 2, 1), (None, 2, 2), (1.0, 8, 7), (0.0, 1, 1)],
)
def test_one_thread_per_free_core(other_busy, cores, expected):
    assert threads.threads_for(other_busy, cores) == expected


def test_load_sampler_measures_a_non_negative_load():
    sampler = threads.LoadSampler()
    sum(i * i for i in range(200_000))  # our own work is not counted as another process's
    busy = sampler.other_busy_cores()
    if busy is None:
        pytest.skip("/proc/stat is not readable here")
    assert 0.0 <= busy <= (torch.get_num_threads() + 64)


def test_free_cores_is_within_the_usable_cores():
    assert 1 <= threads.free_cores(sample_seconds=0.05) <= threads.usable_cores()


def test_tuner_sets_torch_threads_and_records_them(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "usable_cores", lambda: 3)
    monkeypatch.setattr(threads.LoadSampler, "other_busy_cores", lambda self: 2.0)
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: None)
    try:
        torch.set_num_threads(2)
        tuner = threads.ThreadTuner()
        tuner.on_train_begin(None)
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(threads.LoadSampler, "other_busy_cores", lambda self: 0.0)
        tuner.on_step_end(None)
        assert torch.get_num_threads() == 3 and tuner.history == [1, 3]
        assert "1 CPU thread(s) for torch (other processes keep 2.0 of 3 cores busy)" in capsys.readouterr().out
        tuner.on_train_end(None)
        assert torch.get_num_threads() == 2  # the count found at the start
    finally:
        torch.set_num_threads(before)
