"""CPU thread count for torch's intra-op pool, chosen from the cores other processes leave free.

Why: torch runs each op over `torch.get_num_threads()` OpenMP threads (default: every core) and waits for all of them
at the end of the op. A decoding step of a 135M model is hundreds of small ops; when another process holds one of
two cores, every op waits for the thread that is not scheduled, and generation measured 7-18x slower with 2 threads
than with 1 on this 2-core machine (scripts in the firstrun report). One thread per *free* core avoids it.

free_cores(): the cores of this process's CPU set minus the work of other processes, from /proc/stat over a short
window (our own CPU time, from os.times, is subtracted, so a busy trainer does not count itself).
ThreadTuner: a trainer callback that re-chooses the count after every step from the load seen during that step, so
a process that starts or stops beside the run is followed within a step.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity set; os.cpu_count where affinity is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _busy_and_total_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot from /proc/stat's first line; None where unreadable."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is counted inside user)
    return total - idle, total


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class LoadSampler:
    """Measures how many cores other processes kept busy between two calls of `other_busy_cores`."""

    def __init__(self) -> None:
        self._start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[tuple[int, int] | None, float]:
        return _busy_and_total_ticks(), _own_cpu_seconds()

    def other_busy_cores(self) -> float | None:
        """Cores' worth of CPU used by other processes since the last call (None where /proc/stat is unreadable)."""
        (ticks_before, own_before), (ticks_after, own_after) = self._start, self._snapshot()
        self._start = (ticks_after, own_after)
        if ticks_before is None or ticks_after is None:
            return None
        busy, total = ticks_after[0] - ticks_before[0], ticks_after[1] - ticks_before[1]
        if total <= 0:
            return None
        machine_cores = os.cpu_count() or 1
        ticks_per_second = os.sysconf("SC_CLK_TCK")
        window_seconds = total / machine_cores / ticks_per_second
        own_cores = (own_after - own_before) / max(window_seconds, 1e-9)
        return max(0.0, busy / total * machine_cores - own_cores)


def threads_for(other_busy: float | None, cores: int | None = None) -> int:
    """One thread per core that other processes leave free (at least 1); all usable cores when load is unknown."""
    cores = usable_cores() if cores is None else cores
    if other_busy is None:
        return cores
    # a core counts as taken from 0.5 of its time on: a half-used core already stalls every op at its barrier
    return max(1, min(cores, cores - int(other_busy + 0.5)))


def free_cores(sample_seconds: float = 0.5) -> int:
    """threads_for() the load measured over `sample_seconds` now."""
    sampler = LoadSampler()
    time.sleep(sample_seconds)
    return threads_for(sampler.other_busy_cores())


def use_free_cores() -> int:
    """Set torch's intra-op threads to free_cores() (on a machine without a CUDA GPU); returns the count."""
    if not torch.cuda.is_available():
        torch.set_num_threads(free_cores())
    return torch.get_num_threads()


class ThreadTuner:
    """Trainer callback: sets torch's intra-op thread count at the start and after every step from the free cores,
    and puts the count it found back when training ends.

    verbose: print a line whenever the count changes (with the load that caused it).
    """

    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose
        self._sampler: LoadSampler | None = None
        self._threads_before: int | None = None
        self.history: list[int] = []

    def _apply(self, threads: int, other_busy: float | None) -> None:
        if threads != torch.get_num_threads():
            if self.verbose:
                load = "unknown" if other_busy is None else f"{other_busy:.1f}"
                print(f"fusedrl: {threads} CPU thread(s) for torch (other processes keep {load} of "
                      f"{usable_cores()} cores busy)", flush=True)
            torch.set_num_threads(threads)
        self.history.append(threads)

    def on_train_begin(self, trainer: Any) -> None:
        self._threads_before = torch.get_num_threads()
        sampler = LoadSampler()
        time.sleep(0.5)
        other_busy = sampler.other_busy_cores()
        self._apply(threads_for(other_busy), other_busy)
        self._sampler = sampler

    def on_step_end(self, trainer: Any) -> None:
        if self._sampler is None:
            self._sampler = LoadSampler()
            return
        other_busy = self._sampler.other_busy_cores()
        self._apply(threads_for(other_busy), other_busy)

    def on_train_end(self, trainer: Any) -> None:
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
