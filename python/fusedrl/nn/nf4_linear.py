"""A frozen linear layer whose weight is stored in bitsandbytes' NF4 format: `NF4Linear`.

y = x @ dequant(W).T (+ bias), W (out_features, in_features) packed two 4-bit codes per byte (first element in the
high nibble), one float32 absmax per block of `blocksize` elements, optionally double-quantized (uint8 absmax codes
through the 256-entry dynamic map, one float32 scale per 256 blocks, plus an offset). The bytes are bitsandbytes'
own, and so is the state dict: `weight` (uint8 (numel/2, 1)), `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`, `bias` — a module
saved here loads into bitsandbytes' `Linear4bit` and a `*-bnb-4bit` checkpoint loads here, with no conversion.

The weight never trains. LoRA attaches through peft (see `fusedrl.nn.nf4_lora`), whose forward runs the fused
`fusedrl.ops.nf4_lora_linear`; this module's own forward (adapters disabled or absent) dequantizes once per call in
forward and again in backward, so the 16-bit matrix lives only as long as one GEMM needs it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fusedrl.ops.nf4 import NF4QuantState, nf4_dequantize, nf4_quantize

# Names of the quantization statistics inside the state dict, after "<prefix>weight." (bitsandbytes' keys).
_STATE_DICT_SUFFIXES = (
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state.bitsandbytes__nf4",
)
_NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the double-quantized absmax
_BLOCKSIZES = (64, 128, 256)


def _as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 with the same bits. The statistics are kept as int32 buffers so that `model.to(bf16)`,
    `.half()` and friends (which cast every floating buffer) can never round them; device moves still apply."""
    return tensor.detach().to(torch.float32).contiguous().view(torch.int32)


def _as_float(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(torch.float32)


class _NF4Matmul(torch.autograd.Function):
    """x @ dequant(W).T + bias with dX = dY @ dequant(W): the weight is dequantized again in backward, not saved."""

    @staticmethod
    def forward(ctx, x, packed, state, bias):
        ctx.state = state
        ctx.save_for_backward(packed)
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        return F.linear(x, nf4_dequantize(packed, state, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        (packed,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output @ nf4_dequantize(packed, ctx.state, grad_output.dtype)
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0) if ctx.bias_needs_grad else None
        return grad_x, None, None, grad_bias


class NF4Linear(torch.nn.Module):
    """A frozen NF4-quantized linear layer (bitsandbytes' bytes and state-dict keys).

    Build one with `NF4Linear.from_linear(linear)` (quantizes on the linear's device, or on `device`), or
    `NF4Linear(in_features, out_features, ...)` for an empty layer to fill with `load_state_dict` (also on the meta
    device). `compute_dtype` is the dtype of the activations it is meant to see (LoRA adapters are created in it);
    the forward computes in the dtype of its input.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        blocksize: int = 64,
        compress_statistics: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if blocksize not in _BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {_BLOCKSIZES}, got {blocksize!r}")
        if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
            raise ValueError(f"compute_dtype must be a floating torch dtype, got {compute_dtype!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.blocksize = blocksize
        self.quant_dtype = compute_dtype  # the dtype bitsandbytes records for the original weight
        numel = in_features * out_features
        blocks = math.ceil(numel / blocksize)
        self.register_buffer("weight", torch.zeros(((numel + 1) // 2, 1), dtype=torch.uint8, device=device))
        self.bias = (
            torch.nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        # Statistics: non-persistent (the state dict carries them under bitsandbytes' keys, see below).
        self.register_buffer("code_bits", torch.zeros(16, dtype=torch.int32, device=device), persistent=False)
        if compress_statistics:
            nested_blocks = math.ceil(blocks / _NESTED_BLOCKSIZE)
            self.register_buffer("absmax_q", torch.zeros(blocks, dtype=torch.uint8, device=device), persistent=False)
            self.register_buffer(
                "nested_absmax_bits", torch.zeros(nested_blocks, dtype=torch.int32, device=device), persistent=False
            )
            self.register_buffer(
                "nested_code_bits", torch.zeros(256, dtype=torch.int32, device=device), persistent=False
            )
            self.absmax_bits = None
        else:
            self.register_buffer("absmax_bits", torch.zeros(blocks, dtype=torch.int32, device=device), persistent=False)
            self.absmax_q = self.nested_absmax_bits = self.nested_code_bits = None
        # The double-quantization offset is one float: a Python attribute, so building the quant state never reads
        # a device tensor back (no sync inside a captured CUDA graph).
        self.quant_offset: float | None = 0.0 if compress_statistics else None

    # -----------------------------------------------------------------------------------------------------------
    # construction and the quantization state
    # -----------------------------------------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: torch.nn.Linear,
        *,
        blocksize: int = 64,
        compress_statistics: bool = True,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        """Quantize `linear.weight` (on `device`, default the weight's own) into a new NF4Linear; bias is kept."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if device is not None:
            weight = weight.to(device)
        compute_dtype = compute_dtype or weight.dtype
        packed, state = nf4_quantize(weight, blocksize=blocksize, compress_statistics=compress_statistics)
        bias = None if linear.bias is None else linear.bias.detach().to(device=weight.device, dtype=compute_dtype)
        return cls.from_quantized(packed, state, bias=bias, compute_dtype=compute_dtype)

    @classmethod
    def empty_like(
        cls,
        linear: torch.nn.Linear,
        *,
        compute_dtype: torch.dtype | None = None,
        blocksize: int = 64,
        compress_statistics: bool = True,
        device: torch.device | str | None = "meta",
    ) -> NF4Linear:
        """An unfilled NF4Linear of `linear`'s shape (default on the meta device), to load a state dict into."""
        return cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype or linear.weight.dtype,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            device=device,
        )

    @classmethod
    def from_quantized(
        cls,
        packed: torch.Tensor,
        state: NF4QuantState,
        *,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        """Wrap an already quantized weight (packed uint8 + its NF4QuantState) without copying it."""
        out_features, in_features = (int(n) for n in state.shape)
        layer = cls(
            in_features,
            out_features,
            bias=bias is not None,
            compute_dtype=compute_dtype or state.dtype,
            blocksize=state.blocksize,
            compress_statistics=state.absmax_q is not None,
            device="meta",
        )
        layer._assign(packed, state)
        if bias is not None:
            if bias.shape != (out_features,):
                raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
            layer.bias = torch.nn.Parameter(bias.detach().to(layer.compute_dtype), requires_grad=False)
        return layer

    @property
    def compress_statistics(self) -> bool:
        return self.absmax_q is not None

    @property
    def quant_state(self) -> NF4QuantState:
        """The NF4QuantState viewing this layer's buffers (no copy). Built once and reused while the buffers are
        the same tensors (a device move or a load that replaces them builds a new one): the fused op caches its
        argument lists on it."""
        buffers = self._buffers
        key = (
            buffers["weight"],
            buffers["code_bits"],
            buffers.get("absmax_q"),
            buffers.get("nested_absmax_bits"),
            buffers.get("nested_code_bits"),
            buffers.get("absmax_bits"),
        )
        cached = self.__dict__.get("_quant_state_cache")
        if (
            cached is not None
            and all(a is b for a, b in zip(cached[0], key))
            and cached[1] == (self.quant_offset, self.quant_dtype)
        ):
            return cached[2]
        state = self._build_quant_state()
        self.__dict__["_quant_state_cache"] = (key, (self.quant_offset, self.quant_dtype), state)
        return state

    def _build_quant_state(self) -> NF4QuantState:
        common = dict(
            shape=(self.out_features, self.in_features),
            dtype=self.quant_dtype,
            blocksize=self.blocksize,
            code=_as_float(self.code_bits),
        )
        if self.compress_statistics:
            return NF4QuantState(
                **common,
                absmax_q=self.absmax_q,
                nested_absmax=_as_float(self.nested_absmax_bits),
                nested_code=_as_float(self.nested_code_bits),
                offset=self.quant_offset,
            )
        return NF4QuantState(**common, absmax=_as_float(self.absmax_bits))

    def _assign(self, packed: torch.Tensor, state: NF4QuantState) -> None:
        """Replace the buffers by `packed` and `state`'s tensors (placed on packed's device)."""
        expected_shape = (self.out_features, self.in_features)
        if tuple(int(n) for n in state.shape) != expected_shape:
            raise ValueError(f"quant state shape must be {expected_shape}, got {tuple(state.shape)}")
        if state.blocksize != self.blocksize:
            raise ValueError(f"quant state blocksize must be {self.blocksize}, got {state.blocksize}")
        if (state.absmax_q is not None) != self.compress_statistics:
            raise ValueError(
                f"quant state is {'double' if state.absmax_q is not None else 'plainly'} quantized but this layer "
                f"was built with compress_statistics={self.compress_statistics}"
            )
        numel = self.in_features * self.out_features
        if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
            raise ValueError(
                f"packed weight must be uint8 with {(numel + 1) // 2} elements, got {packed.dtype} {tuple(packed.shape)}"
            )
        device = packed.device
        self.weight = packed.reshape(-1, 1)
        self.code_bits = _as_bits(state.code.to(device))
        self.quant_dtype = state.dtype
        if self.compress_statistics:
            self.absmax_q = state.absmax_q.to(device)
            self.nested_absmax_bits = _as_bits(state.nested_absmax.to(device))
            self.nested_code_bits = _as_bits(state.nested_code.to(device))
            self.quant_offset = float(state.offset)
        else:
            self.absmax_bits = _as_bits(state.absmax.to(device))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out_features, in_features) in `dtype` (default compute_dtype)."""
        return nf4_dequantize(self.weight, self.quant_state, dtype or self.compute_dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> torch.nn.Linear:
        """A plain frozen torch.nn.Linear holding the dequantized weight (and bias) in `dtype`."""
        dtype = dtype or self.compute_dtype
        linear = torch.nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=dtype
        )
        linear.weight = torch.nn.Parameter(self.dequantize(dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = torch.nn.Parameter(self.bias.detach().to(dtype).clone(), requires_grad=False)
        return linear

    # -----------------------------------------------------------------------------------------------------------
    # forward
    # -----------------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in in_features={self.in_features}, got shape {tuple(x.shape)}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _NF4Matmul.apply(x, self.weight, self.quant_state, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, compress_statistics={self.compress_statistics}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # -----------------------------------------------------------------------------------------------------------
    # state dict: bitsandbytes' keys
    # -----------------------------------------------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (packed) and bias
        for suffix, tensor in self.quant_state.state_dict().items():
            destination[f"{prefix}weight.{suffix}"] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        stats = {
            suffix: state_dict.pop(f"{prefix}weight.{suffix}")
            for suffix in _STATE_DICT_SUFFIXES
            if f"{prefix}weight.{suffix}" in state_dict
        }
        packed = state_dict.get(f"{prefix}weight")
        if not stats or packed is None:
            missing_keys.extend(
                f"{prefix}weight.{suffix}" for suffix in ("absmax", "quant_map", "quant_state.bitsandbytes__nf4")
            )
            if packed is None:
                missing_keys.append(f"{prefix}weight")
            return super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        try:
            state = NF4QuantState.from_state_dict(stats)
            device = self.weight.device if self.weight.device.type != "meta" else packed.device
            self._assign(packed.to(device), state.to(device))
        except (ValueError, KeyError, RuntimeError) as error:
            error_msgs.append(f"{prefix}weight: cannot load the NF4 weight and its quant state: {error}")
            return
        state_dict.pop(f"{prefix}weight")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # super() finds no "weight" entry any more (it was assigned above): it is not missing.
        if f"{prefix}weight" in missing_keys:
            missing_keys.remove(f"{prefix}weight")
