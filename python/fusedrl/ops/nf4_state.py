"""The quantization state of an NF4 weight, in bitsandbytes' format (see csrc/kernels/nf4.h for the arithmetic).

`NF4QuantState` holds what `bitsandbytes.functional.QuantState` holds for quant_type="nf4", converts to and from it
(when bitsandbytes is installed), and reads and writes bitsandbytes' serialized keys, so pre-quantized `*-bnb-4bit`
checkpoints load without bitsandbytes:
    <prefix>absmax                         float32 (nblocks,) plain, or uint8 (nblocks,) nested
    <prefix>quant_map                      float32 (16,) the NF4 table
    <prefix>nested_absmax                  float32 (ceil(nblocks / 256),)            nested only
    <prefix>nested_quant_map               float32 (256,) the signed dynamic map     nested only
    <prefix>quant_state.bitsandbytes__nf4  uint8: JSON {quant_type, blocksize, dtype, shape,
                                           nested_blocksize, nested_dtype, nested_offset}
`NF4Shards` is a fused projection stored as independently quantized shards stacked along N.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import torch

from .. import _ext

_ext.load()

STATE_KEY = "quant_state.bitsandbytes__nf4"
NESTED_BLOCKSIZE = 256


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values (float32), from their one definition in csrc/kernels/nf4.h."""
    return torch.ops.fusedrl.nf4_code()


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`: 256 sorted float32 values), computed the same
    way: float32 linspace means scaled by powers of ten in float32."""
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


@dataclass
class NF4QuantState:
    """How to decode one packed NF4 weight of `shape` (N, K) into `dtype` (the original / compute dtype)."""

    shape: tuple[int, int]
    dtype: torch.dtype
    blocksize: int = 64
    absmax: torch.Tensor | None = None          # float32 (nblocks,) when not nested
    absmax_q: torch.Tensor | None = None        # uint8 (nblocks,) when nested
    nested_absmax: torch.Tensor | None = None   # float32 (ceil(nblocks / 256),)
    nested_code: torch.Tensor | None = None     # float32 (256,)
    offset: float | None = None
    code: torch.Tensor = field(default_factory=nf4_code)

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) != 2:
            raise ValueError(f"NF4QuantState: shape must be (N, K), got {self.shape}")
        if self.nested == (self.absmax is not None):
            raise ValueError("NF4QuantState: give either absmax (plain) or absmax_q, nested_absmax, nested_code and "
                             "offset (nested)")
        if self.nested and (self.nested_absmax is None or self.nested_code is None or self.offset is None):
            raise ValueError("NF4QuantState: a nested state needs absmax_q, nested_absmax, nested_code and offset")

    @property
    def nested(self) -> bool:
        return self.absmax_q is not None

    @property
    def nblocks(self) -> int:
        return -(-self.shape[0] * self.shape[1] // self.blocksize)

    @property
    def device(self) -> torch.device:
        return (self.absmax_q if self.nested else self.absmax).device

    def to(self, device) -> "NF4QuantState":
        """A copy with every tensor on `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, absmax=move(self.absmax), absmax_q=move(self.absmax_q),
                       nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code),
                       code=self.code.to(device))

    # ---- bitsandbytes' serialized keys ----------------------------------------------------------------------
    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes' Linear4bit saves next to `<prefix>weight` (prefix e.g. "weight.")."""
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                "shape": list(self.shape)}
        out = {prefix + "absmax": self.absmax_q if self.nested else self.absmax, prefix + "quant_map": self.code}
        if self.nested:
            out[prefix + "nested_absmax"] = self.nested_absmax
            out[prefix + "nested_quant_map"] = self.nested_code.clone()
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset)
        out[prefix + STATE_KEY] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "") -> "NF4QuantState":
        """From bitsandbytes' serialized keys (with or without `prefix`); the tensors keep their device."""
        get = lambda key: state.get(prefix + key)  # noqa: E731
        packed_meta = get(STATE_KEY)
        if packed_meta is None:
            raise KeyError(f"NF4QuantState.from_state_dict: no '{prefix}{STATE_KEY}' entry (is this an NF4 "
                           f"bitsandbytes checkpoint? keys: {sorted(state)[:8]})")
        meta = json.loads(bytes(packed_meta.cpu().tolist()).decode("utf-8"))
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"NF4QuantState.from_state_dict: quant_type must be 'nf4', got {meta.get('quant_type')}")
        dtype = getattr(torch, meta["dtype"])
        code = get("quant_map")
        common = dict(shape=tuple(meta["shape"]), dtype=dtype, blocksize=int(meta["blocksize"]),
                      code=nf4_code() if code is None else code.float())
        if get("nested_absmax") is None:
            return cls(absmax=get("absmax").float(), **common)
        if int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE:
            raise ValueError(f"NF4QuantState.from_state_dict: nested_blocksize must be {NESTED_BLOCKSIZE}, got "
                             f"{meta['nested_blocksize']}")
        return cls(absmax_q=get("absmax"), nested_absmax=get("nested_absmax").float(),
                   nested_code=get("nested_quant_map").float(), offset=float(meta["nested_offset"]), **common)

    # ---- bitsandbytes' QuantState ---------------------------------------------------------------------------
    @classmethod
    def from_bitsandbytes(cls, qs) -> "NF4QuantState":
        """From a bitsandbytes.functional.QuantState with quant_type "nf4" (a 2-D weight)."""
        if qs.quant_type != "nf4":
            raise ValueError(f"NF4QuantState.from_bitsandbytes: quant_type must be 'nf4', got {qs.quant_type!r}")
        common = dict(shape=tuple(qs.shape), dtype=qs.dtype, blocksize=int(qs.blocksize), code=qs.code.float())
        if not qs.nested:
            return cls(absmax=qs.absmax, **common)
        if int(qs.state2.blocksize) != NESTED_BLOCKSIZE:
            raise ValueError(f"NF4QuantState.from_bitsandbytes: nested blocksize must be {NESTED_BLOCKSIZE}")
        return cls(absmax_q=qs.absmax, nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                   offset=float(qs.offset), **common)

    def to_bitsandbytes(self):
        """The equivalent bitsandbytes.functional.QuantState (needs bitsandbytes)."""
        from bitsandbytes.functional import QuantState

        common = dict(shape=torch.Size(self.shape), code=self.code, blocksize=self.blocksize, quant_type="nf4",
                      dtype=self.dtype)
        if not self.nested:
            return QuantState(absmax=self.absmax, **common)
        state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCKSIZE,
                            dtype=torch.float32)
        offset = torch.tensor(self.offset, dtype=torch.float32, device=self.nested_absmax.device)
        return QuantState(absmax=self.absmax_q, offset=offset, state2=state2, **common)


@dataclass
class NF4Shards:
    """A weight stored as independently quantized shards stacked along N (vLLM's fused qkv / gate_up)."""

    shards: list[tuple[torch.Tensor, NF4QuantState]]

    def __post_init__(self):
        self.shards = [(p, s) for p, s in self.shards]
        if not self.shards:
            raise ValueError("NF4Shards: at least one (packed, state) shard is needed")
        cols = {s.shape[1] for _, s in self.shards}
        if len(cols) != 1:
            raise ValueError(f"NF4Shards: every shard must have the same K, got {sorted(cols)}")
        if len({s.blocksize for _, s in self.shards}) != 1 or len({s.nested for _, s in self.shards}) != 1:
            raise ValueError("NF4Shards: every shard must share the blocksize and the nesting of its absmax")

    @property
    def shape(self) -> tuple[int, int]:
        return sum(s.shape[0] for _, s in self.shards), self.shards[0][1].shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.shards[0][1].dtype

    def to(self, device) -> "NF4Shards":
        return NF4Shards([(p.to(device), s.to(device)) for p, s in self.shards])
