"""Optimizer, learning-rate schedule and mixed-precision setup from a GRPOConfig.

- `create_optimizer`: AdamW over the trainable parameters only; weight decay on matrices, none on vectors (biases,
  norm scales). `optim`: "adamw_torch" (torch.optim.AdamW, fused kernel on CUDA) or "adamw_8bit" (bitsandbytes
  AdamW8bit, which needs CUDA and the bitsandbytes package).
- `create_scheduler`: `transformers.get_scheduler` with `args.get_warmup_steps(total)` warmup steps.
- `Precision`: from `args.dtype`. "bfloat16" autocasts the forward to bf16 (CPU and CUDA); "float16" autocasts to
  fp16 with a `torch.amp.GradScaler` (dynamic loss scaling) and is refused on CPU (CPU fp16 kernels are slow and
  incomplete: use bfloat16 or float32 there); "float32" runs the model in its own dtype with no autocast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch
import transformers

TORCH_ADAMW = "adamw_torch"
BNB_ADAMW_8BIT = "adamw_8bit"


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def create_optimizer(model: torch.nn.Module, args: Any) -> torch.optim.Optimizer:
    """AdamW over `model`'s trainable parameters with the config's lr, betas, eps and weight decay."""
    named = trainable_parameters(model)
    if not named:
        raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
    decay = [parameter for _, parameter in named if parameter.ndim >= 2]
    no_decay = [parameter for _, parameter in named if parameter.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": float(args.weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    hyper = dict(lr=float(args.learning_rate), betas=(args.adam_beta1, args.adam_beta2), eps=float(args.adam_epsilon))
    device = named[0][1].device
    optim_name = args.optim
    if optim_name == TORCH_ADAMW:
        return torch.optim.AdamW(groups, fused=True if device.type == "cuda" else None, **hyper)
    if optim_name == BNB_ADAMW_8BIT:
        if device.type != "cuda":
            raise ValueError(
                f"optim={optim_name!r} (bitsandbytes 8-bit AdamW) needs the model on CUDA, but its trainable "
                f"parameters are on {device}; use optim='adamw_torch' here"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError(f"optim={optim_name!r} needs the bitsandbytes package: pip install bitsandbytes")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **hyper)
    raise ValueError(f"optim={optim_name!r} is not supported; expected {TORCH_ADAMW!r} or {BNB_ADAMW_8BIT!r}")


def create_scheduler(
    optimizer: torch.optim.Optimizer, args: Any, num_training_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return transformers.get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
    )


@dataclasses.dataclass
class Precision:
    """How the forward runs: autocast dtype (None = model's own dtype) and the fp16 gradient scaler."""

    device_type: str
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.autocast_dtype is None:
            yield
        else:
            with torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype):
                yield

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), through the fp16 loss scaler when there is one."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()


def create_precision(args: Any, model: torch.nn.Module) -> Precision:
    """args.dtype ("bfloat16" / "float16" / "float32"), checked against the device of the trainable parameters."""
    named = trainable_parameters(model)
    device = named[0][1].device if named else next(model.parameters()).device
    if args.dtype == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("dtype='bfloat16' but this GPU does not support bfloat16; use dtype='float16'")
        return Precision(device.type, torch.bfloat16, None)
    if args.dtype == "float16":
        if device.type != "cuda":
            raise ValueError(
                f"dtype='float16' needs a CUDA device (dynamic loss scaling with torch.amp.GradScaler), but the model "
                f"is on {device}; use dtype='bfloat16' or dtype='float32'"
            )
        half = [name for name, parameter in named if parameter.dtype == torch.float16]
        if half:
            raise ValueError(
                f"dtype='float16' keeps trainable parameters in float32 and autocasts the forward, but {len(half)} "
                f"trainable parameters are float16 (e.g. {half[0]}); load the model with dtype=torch.float32 or "
                "keep LoRA adapters in float32"
            )
        return Precision(device.type, torch.float16, torch.amp.GradScaler(device.type))
    return Precision(device.type, None, None)
