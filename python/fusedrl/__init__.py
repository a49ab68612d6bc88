"""fusedrl: GRPO-family RL training for LLMs with fused CUDA kernels on the hot paths.

The public API is imported lazily so that `import fusedrl` (and `python -m fusedrl.doctor`) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "GRPOConfig": "fusedrl.train.config",
    "GRPOTrainer": "fusedrl.train.trainer",
    "load_model": "fusedrl.model.load",
    "LoraConfig": "fusedrl.model.lora",
    "save_lora": "fusedrl.model.export",
    "load_lora": "fusedrl.model.export",
    "save_merged": "fusedrl.model.export",
    "export_gguf": "fusedrl.model.export",
    "grpo_loss": "fusedrl.ops",
    "selective_logp": "fusedrl.ops",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fusedrl' has no attribute {name!r}")
