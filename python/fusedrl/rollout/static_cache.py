"""A preallocated key/value cache for the static decode loop: fixed shapes and addresses, so CUDA graphs can read it.

Per layer one key and one value tensor of shape (batch, kv_heads, length, head_dim) in the model's dtype, plus
`valid` (batch, length) bool marking the slots that hold a real token (left padding stays False) and `start`
(batch,) int32, each row's first real slot (its padding is one left block). Slot s of a row is column s of the
left-padded prompt + completion layout, so a decode step writes the same slot in every row.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Keys, values and the valid-slot mask for `batch` rows of up to `length` tokens."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if min(num_layers, batch, length, num_kv_heads, head_dim) <= 0:
            raise ValueError(
                f"StaticKVCache sizes must be positive, got layers={num_layers} batch={batch} length={length} "
                f"kv_heads={num_kv_heads} head_dim={head_dim}"
            )
        shape = (batch, num_kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.start = torch.zeros(batch, dtype=torch.int32, device=device)
        self.batch, self.length = batch, length
        self.dtype, self.device = dtype, torch.device(device)

    @staticmethod
    def bytes_needed(num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int, dtype) -> int:
        return 2 * num_layers * batch * num_kv_heads * length * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values) + self.valid.numel() + 4 * self.batch

    def fits(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> bool:
        return batch <= self.batch and length <= self.length and dtype == self.dtype and device == self.device
