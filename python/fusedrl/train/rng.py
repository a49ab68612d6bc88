"""Capture and restore every random number generator a run draws from, so a resumed run continues bit for bit.

The global states (python `random`, numpy if installed, torch CPU, every CUDA device) plus named torch.Generators
(the trainer's own sampling and shuffling generators). Tensors and plain containers only, so the result loads with
`torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """All global RNG states plus the states of the named generators."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss], "torch_cpu": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        np = None  # type: ignore[assignment]
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = {name: generator.get_state() for name, generator in (generators or {}).items()}
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of capture_rng_state. CUDA states are restored only when CUDA is available now.

    Raises KeyError naming a generator the state has no entry for.
    """
    saved_generators = state.get("generators", {})
    missing = sorted(set(generators or {}) - set(saved_generators))
    if missing:
        raise KeyError(f"generators: no saved state for {missing}; the state has {sorted(saved_generators)}")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch_cpu"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in (generators or {}).items():
        generator.set_state(saved_generators[name])
