"""transformers' activation-checkpointing switch, under its old and new names (one place for the loaders)."""

from __future__ import annotations

import transformers


def enable_activation_checkpointing(model: transformers.PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (newer transformers renamed the method)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
