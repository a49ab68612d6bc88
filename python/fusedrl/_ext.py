"""Loads the compiled op library (`torch.ops.fusedrl.*`) that ships inside the package."""

from __future__ import annotations

from pathlib import Path

import torch

LIBRARY_NAME = "_fusedrl_ops"
_loaded = False


def library_path() -> Path:
    """The library inside the package; an editable install keeps it in site-packages while the Python sources
    stay in the checkout, so every folder of the package's __path__ is searched."""
    import fusedrl

    folders = [Path(p) for p in getattr(fusedrl, "__path__", [])] or [Path(__file__).resolve().parent]
    for folder in folders:
        candidate = folder / f"{LIBRARY_NAME}.so"
        if candidate.exists():
            return candidate
    return folders[0] / f"{LIBRARY_NAME}.so"


def load() -> None:
    """Registers torch.ops.fusedrl.* once. Raises with the fix when the library was not built."""
    global _loaded
    if _loaded:
        return
    path = library_path()
    if not path.exists():
        raise ImportError(
            f"fusedrl's compiled ops are missing ({path} not found). Install the package with "
            "`pip install --no-build-isolation .` from the repository root, or run `scripts/dev_build.sh` "
            "when working from the source tree with PYTHONPATH=python."
        )
    torch.ops.load_library(str(path))
    _loaded = True


def build_info() -> dict[str, str]:
    """{"cuda": "<architectures>" | "none"} as compiled into the library."""
    load()
    return dict(item.split("=", 1) for item in torch.ops.fusedrl.build_info().split(";"))
