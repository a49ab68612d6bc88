"""Python face of the activation-offload ops (csrc/torch/offload_arena.cpp, schemas in csrc/torch/bindings.cpp).

`new_arena(device)` returns a `torch.classes.fusedrl.OffloadArena`: one pinned host arena (sized by `reserve`,
exactly, no power-of-two rounding), a device-to-host and a host-to-device stream, two device slots. The copies:

    handle = offload_to_host(arena, x)   # D2H queued after the compute stream's work on x; -1: x stays put
    prefetch_to_device(arena, handle)    # H2D queued into a free device slot (no wait on the compute stream)
    y = fetch_to_device(arena, handle)   # the compute stream waits for that slot's copy only; y views the slot
    release_offloaded(arena, handle)     # y's slot may be overwritten by the next prefetch

On CPU `offload_to_host` is a no-op that returns -1. These ops move bytes behind autograd's back and are used
eagerly by `fusedrl.nn.offload`; they are not meant for torch.compile graphs (no fakes: the arena is an opaque
object with side effects).
"""

from __future__ import annotations

import torch

from fusedrl import _ext

NOT_OFFLOADED = -1  # offload_to_host's answer when the tensor stays where it is
ENTRY_ALIGNMENT = 256  # bytes each arena entry is rounded up to (kOffloadAlignment, csrc/kernels/offload_arena.h)


def arena_bytes(nbytes: int) -> int:
    """The arena bytes one offloaded tensor of `nbytes` takes."""
    return (nbytes + ENTRY_ALIGNMENT - 1) // ENTRY_ALIGNMENT * ENTRY_ALIGNMENT


def new_arena(device: torch.device | str) -> torch.ScriptObject:
    """An OffloadArena for tensors on `device` (a CPU arena offloads nothing)."""
    _ext.load()
    device = torch.device(device)
    index = -1
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    elif device.type != "cpu":
        raise ValueError(f"device must be a CUDA device or cpu, got {device}")
    return torch.classes.fusedrl.OffloadArena(index)


def offload_to_host(arena: torch.ScriptObject, tensor: torch.Tensor) -> int:
    return int(torch.ops.fusedrl.offload_to_host(arena, tensor))


def prefetch_to_device(arena: torch.ScriptObject, handle: int) -> None:
    torch.ops.fusedrl.prefetch_to_device(arena, handle)


def fetch_to_device(arena: torch.ScriptObject, handle: int) -> torch.Tensor:
    return torch.ops.fusedrl.fetch_to_device(arena, handle)


def release_offloaded(arena: torch.ScriptObject, handle: int) -> None:
    torch.ops.fusedrl.release_offloaded(arena, handle)
