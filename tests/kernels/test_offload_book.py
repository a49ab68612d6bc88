"""The torch-free slot book of the activation offload, compiled with the system C++ compiler and run: exact entry
sizes at aligned offsets, refusal when full, prefetch into free slots, taking back an unfetched prefetch, the
own-buffer path when both slots are fetched, release, reset and stale handles."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_offload_book(tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path / "offload_book_test"
    subprocess.run([compiler, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{ROOT / 'csrc/kernels'}",
                    str(ROOT / "tests/kernels/offload_book_test.cpp"), str(ROOT / "csrc/kernels/offload_arena_cpu.cpp"),
                    "-o", str(exe)], check=True, capture_output=True, text=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
