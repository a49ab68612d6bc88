"""4-bit NF4 causal LMs without bitsandbytes: quantize a loaded model, or load a bitsandbytes-quantized checkpoint.

quantize_linear_layers   replaces every torch.nn.Linear except the output layer by an `NF4Linear` (fusedrl's own
                         quantizer, bitsandbytes' bytes), one layer at a time on the target device, so the 16-bit
                         copy of a layer lives on the GPU only while it is quantized.
dequantize_nf4_layers    the way back: every NF4Linear becomes a dense nn.Linear (merged exports).
bnb_4bit_settings        reads `quantization_config` from a checkpoint's config: None for a dense checkpoint,
                         the NF4 settings for a bitsandbytes 4-bit one, a clear error for anything we cannot read.
load_prequantized        builds the model skeleton on the meta device, swaps in empty NF4Linear layers where the
                         checkpoint holds packed weights (`*.weight.quant_state.bitsandbytes__nf4` keys), and loads
                         the safetensors (bitsandbytes' serialized keys) into it: no bitsandbytes, no transformers
                         quantizer. Embeddings, lm-head and norms stay in the compute dtype.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers

from fusedrl.nn.nf4_linear import NF4Linear

_QUANT_STATE_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"


def _output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    get_output = getattr(model, "get_output_embeddings", None)
    return get_output() if callable(get_output) else None


def _set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, module)


@torch.no_grad()
def quantize_linear_layers(
    model: torch.nn.Module,
    *,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
    compress_statistics: bool = True,
) -> list[str]:
    """Replace every nn.Linear of `model` except its output layer by an NF4Linear quantized on `device`.

    Returns the names of the replaced modules. The original 16-bit weights are released layer by layer.
    """
    output_layer = _output_layer(model)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output_layer
    ]
    for name in names:
        linear = model.get_submodule(name)
        quantized = NF4Linear.from_linear(
            linear,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            device=device,
            compute_dtype=compute_dtype,
        )
        _set_submodule(model, name, quantized)
        del linear
    return names


@torch.no_grad()
def dequantize_nf4_layers(model: torch.nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every NF4Linear of `model` by a dense nn.Linear in `dtype` (default its compute dtype); names."""
    names = [name for name, module in model.named_modules() if isinstance(module, NF4Linear)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).to_linear(dtype))
    return names


def bnb_4bit_settings(config: transformers.PretrainedConfig) -> dict[str, Any] | None:
    """The NF4 settings of a bitsandbytes 4-bit checkpoint's config, None for a dense checkpoint.

    Raises for quantized checkpoints fusedrl cannot read (8-bit, FP4, other quantization methods).
    """
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    if not isinstance(quantization, dict):
        to_dict = getattr(quantization, "to_dict", None)
        quantization = to_dict() if callable(to_dict) else dict(vars(quantization))
    method = quantization.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ValueError(
            f"the checkpoint is quantized with {method!r}; fusedrl reads dense checkpoints and bitsandbytes NF4 ones"
        )
    if quantization.get("load_in_8bit") or quantization.get("_load_in_8bit"):
        raise ValueError("the checkpoint is bitsandbytes 8-bit; fusedrl reads dense checkpoints and 4-bit NF4 ones")
    if not (quantization.get("load_in_4bit") or quantization.get("_load_in_4bit")):
        raise ValueError(f"quantization_config has neither load_in_4bit nor load_in_8bit: {quantization}")
    quant_type = quantization.get("bnb_4bit_quant_type", "fp4")
    if quant_type != "nf4":
        raise ValueError(f"bnb_4bit_quant_type={quant_type!r} is not supported: fusedrl reads NF4 checkpoints only")
    storage = quantization.get("bnb_4bit_quant_storage", "uint8")
    if storage not in ("uint8", None):
        raise ValueError(f"bnb_4bit_quant_storage={storage!r} is not supported: fusedrl reads uint8 storage only")
    return quantization


def _checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"{folder} holds neither model.safetensors nor model.safetensors.index.json: "
        "pre-quantized checkpoints must be in safetensors"
    )


def _checkpoint_folder(name_or_path: str | os.PathLike[str]) -> Path:
    folder = Path(name_or_path)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors"]))


def _read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file), device="cpu"))
    return state


def _nf4_module_names(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(key[: -len(_QUANT_STATE_SUFFIX)] for key in state if key.endswith(_QUANT_STATE_SUFFIX))


def _tied_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that share storage with another parameter (tied embeddings): never in a checkpoint."""
    by_identity: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        by_identity.setdefault(id(parameter), []).append(name)
    return {name for names in by_identity.values() if len(names) > 1 for name in names}


@torch.no_grad()
def load_prequantized(
    name_or_path: str | os.PathLike[str],
    config: transformers.PretrainedConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
) -> transformers.PreTrainedModel:
    """A causal LM from a bitsandbytes NF4 checkpoint, its quantized linears as NF4Linear, on `device`.

    `config` is the checkpoint's config; its `quantization_config` is dropped from the returned model's config
    (the model carries the NF4 layers themselves, and a merged export must not claim to be quantized).
    """
    bnb_4bit_settings(config)  # validates
    folder = _checkpoint_folder(name_or_path)
    state = _read_state_dict(_checkpoint_files(folder))
    nf4_names = _nf4_module_names(state)
    if not nf4_names:
        raise ValueError(f"{folder}: quantization_config says 4-bit but no tensor has a bitsandbytes NF4 quant state")

    config = copy_config_without_quantization(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    for name in nf4_names:
        try:
            linear = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"{folder}: the checkpoint quantizes {name!r}, which the model does not have") from error
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(f"{folder}: {name!r} is quantized in the checkpoint but is a {type(linear).__name__}")
        empty = NF4Linear.empty_like(
            linear,
            compute_dtype=dtype,
            blocksize=_blocksize_of(state, name),
            compress_statistics=f"{name}.weight.nested_absmax" in state,
        )
        _set_submodule(model, name, empty)
    model.to_empty(device=device)
    # Non-persistent buffers (rotary inverse frequencies) are not in the checkpoint: transformers computes them
    # in its weight init; the parameters it initialises here are overwritten by the checkpoint below.
    model.init_weights()
    for key in [k for k in state if k.endswith("rotary_emb.inv_freq")]:
        del state[key]  # older checkpoints stored it; the model computes it
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - _tied_parameter_names(model)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{folder}: the checkpoint does not match the model: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(result.unexpected_keys)[:8]}"
        )
    model.tie_weights()
    return model


def _blocksize_of(state: dict[str, torch.Tensor], name: str) -> int:
    header = bytes(state[f"{name}{_QUANT_STATE_SUFFIX}"].tolist())
    return int(json.loads(header.decode("utf-8"))["blocksize"])


def copy_config_without_quantization(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """A copy of `config` with no quantization_config (the model carries NF4Linear layers instead)."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config
