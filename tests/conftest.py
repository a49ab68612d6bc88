"""Shared test setup: the `cuda` marker skips with a reason where no GPU or no CUDA kernels exist; every test's
random numbers are seeded from its node id, so a failure repeats when the test is run again (the seed is printed
in the failure report)."""

from __future__ import annotations

import random
import zlib

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


def seed_of_test(nodeid: str) -> int:
    """The seed of a test: a hash of its node id (stable across runs and machines, different between tests)."""
    return zlib.crc32(nodeid.encode("utf-8"))


@pytest.fixture(autouse=True)
def _seed_global_rngs(request):
    """Seeds python, numpy and torch from the test's node id and reports the seed with a failure."""
    seed = seed_of_test(request.node.nodeid)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        np.random.seed(seed)
    request.node.add_report_section("setup", "seed", f"global RNGs and `generator` seeded with {seed} (node id hash)")
    return seed


@pytest.fixture
def generator(request) -> torch.Generator:
    """A torch.Generator seeded from the test's node id (the seed is printed with a failure)."""
    return torch.Generator().manual_seed(seed_of_test(request.node.nodeid))
