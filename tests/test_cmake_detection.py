"""The build's CPU/CUDA decision (cmake/CudaSupport.cmake): one log line saying which extension and why, FUSEDRL_CUDA=ON
failing clearly where CUDA cannot be built, and a failed configure not poisoning the next one (--fresh)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ninja") is None,
                                reason="needs cmake and ninja on the PATH (pip install cmake ninja)")


def configure(build_dir: Path, *defines: str) -> subprocess.CompletedProcess:
    return subprocess.run(["cmake", "--fresh", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
                           f"-DPython3_EXECUTABLE={sys.executable}", *defines],
                          capture_output=True, text=True, timeout=600)


def decision_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("-- fusedrl: building")]


def test_cuda_off_builds_the_cpu_extension_and_says_why(tmp_path):
    result = configure(tmp_path, "-DFUSEDRL_CUDA=OFF")
    assert result.returncode == 0, result.stderr
    assert decision_lines(result) == ["-- fusedrl: building the CPU-only extension: FUSEDRL_CUDA=OFF"]


@pytest.mark.slow  # two configures: about 15 s on a quiet 2-core CPU
@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch reason")
def test_cpu_torch_is_named_as_the_reason_and_on_fails_then_a_retry_succeeds(tmp_path):
    forced = configure(tmp_path, "-DFUSEDRL_CUDA=ON")
    assert forced.returncode != 0
    assert "FUSEDRL_CUDA=ON but the CUDA kernels cannot be built: torch" in " ".join(forced.stderr.split())
    retry = configure(tmp_path)  # same build folder, after the failure
    assert retry.returncode == 0, retry.stderr
    [line] = decision_lines(retry)
    assert line.startswith("-- fusedrl: building the CPU-only extension: torch ") and "is a CPU build" in line
