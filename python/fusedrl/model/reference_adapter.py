"""The KL reference of a peft model, as TRL 1.16 chooses it.

- Fresh adapters (every LoRA B matrix still zero, every modules_to_save copy still equal to the original): the model
  with adapters disabled *is* the starting model, so the reference is the cheap `disable_adapter()` forward.
- Adapters that were already trained: TRL copies the starting adapter into a frozen "ref" adapter. Here the copy is a
  frozen snapshot of the trainable adapter tensors, swapped into the model (in place, under no_grad) for the
  reference forward and swapped back after it: no second peft adapter, so checkpoints and the optimizer only ever
  see the trained one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def adapters_are_fresh(model: torch.nn.Module) -> bool:
    """Whether disabling the adapters gives exactly the model the adapters compute (peft's zero-B initialisation)."""
    for name, parameter in model.named_parameters():
        if ("lora_B" in name or "lora_embedding_B" in name) and bool(parameter.detach().ne(0).any()):
            return False
    for module in model.modules():
        copies, original = getattr(module, "modules_to_save", None), getattr(module, "original_module", None)
        if copies is None or original is None:
            continue
        reference = dict(original.named_parameters())
        for copy in copies.values():
            for name, parameter in copy.named_parameters():
                if not torch.equal(parameter.detach(), reference[name].detach()):
                    return False
    return True


class StartingAdapter:
    """A frozen copy of a peft model's trainable adapter tensors at construction: the KL reference."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not self._parameters:
            raise ValueError("the model has no trainable adapter parameters to snapshot")
        self._snapshot = {name: p.detach().clone() for name, p in self._parameters.items()}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside: the model computes with the starting adapter (no gradient). Restored on exit, also on errors."""
        with torch.no_grad():
            current = {name: p.detach().clone() for name, p in self._parameters.items()}
            for name, parameter in self._parameters.items():
                parameter.copy_(self._snapshot[name])
            try:
                yield
            finally:
                for name, parameter in self._parameters.items():
                    parameter.copy_(current[name])


def reference_context(model: torch.nn.Module):
    """-> a zero-argument callable giving the context manager under which `model` computes the reference:
    `model.disable_adapter()` for fresh adapters, the starting adapter's snapshot otherwise."""
    if adapters_are_fresh(model):
        return model.disable_adapter
    return StartingAdapter(model).active
