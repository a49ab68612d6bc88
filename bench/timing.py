"""Timers from libraries: triton.testing.do_bench on a GPU (L2 flushed between runs, CUDA events) when triton is
importable, torch.utils.benchmark otherwise (it synchronises CUDA and picks the clock). Times are in ms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.benchmark


def timer_name(device: torch.device) -> str:
    if device.type == "cuda" and _do_bench() is not None:
        return "triton.testing.do_bench"
    return "torch.utils.benchmark.Timer.blocked_autorange"


def time_runs_ms(run: Callable[[], Any], device: torch.device, seconds: float) -> list[float]:
    """Per-run times of `run` (already warmed up) over about `seconds` of measuring; at least one run."""
    do_bench = _do_bench() if device.type == "cuda" else None
    if do_bench is not None:
        return [float(t) for t in do_bench(run, warmup=1, rep=max(1, int(seconds * 1e3)), return_mode="all")]
    timer = torch.utils.benchmark.Timer(stmt="run()", globals={"run": run})
    measurement = timer.blocked_autorange(min_run_time=seconds)
    return [t * 1e3 for t in measurement.times]


def _do_bench() -> Any:
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench
