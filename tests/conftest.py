"""Shared test setup: the `cuda` marker skips with a reason where no GPU or no CUDA kernels exist."""

from __future__ import annotations

import random

import pytest
import torch


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none visible); these run on the GPU machine via scripts/gpu_check.sh"
    try:
        from fusedrl import _ext
        if _ext.build_info().get("cuda", "none") == "none":
            return "fusedrl was built without CUDA kernels (nvcc or a CUDA torch was missing at build time)"
    except ImportError as err:  # the compiled ops are missing altogether
        return str(err)
    return None


def pytest_collection_modifyitems(config, items):
    reason = _cuda_skip_reason()
    if reason is None:
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh seed per test run; failure messages print `generator.initial_seed()` to reproduce."""
    return torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
