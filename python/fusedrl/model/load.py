"""Load a Hugging Face causal LM and its tokenizer ready for GRPO training.

`load_model` loads any transformers causal LM (Llama, Qwen2/3, Mistral, Gemma families), in 16/32-bit or 4-bit
NF4 (QLoRA, on CPU and CUDA, fusedrl's own NF4 layers: no bitsandbytes needed, see `fusedrl.model.quantize`);
makes the tokenizer generation-ready (pad token, left padding); attaches LoRA adapters with peft so only the
adapters train (base weights, embeddings and lm-head frozen); and turns on non-reentrant gradient checkpointing.
"""

from __future__ import annotations

import os
import re
import warnings

import peft
import torch
import transformers

from fusedrl.model.checkpointing import enable_activation_checkpointing
from fusedrl.model.lora import LoraConfig
from fusedrl.model.quantize import bnb_4bit_settings, load_prequantized, quantize_linear_layers
from fusedrl.nn.nf4_lora import nf4_lora_config

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}

DEFAULT_LORA = LoraConfig()  # r=16, lora_alpha=32, all linear layers


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch floating dtype from a torch dtype or a name such as "bfloat16", "bf16", "float16", "float32"."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be a torch dtype or one of {sorted(_DTYPE_NAMES)}, got {dtype!r}")
        resolved = _DTYPE_NAMES[key]
    else:
        raise TypeError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}")
    if resolved not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {resolved}")
    return resolved


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The given device, or cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch device or a name like 'cuda:0' or 'cpu', got {device!r}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asks for CUDA but torch sees no CUDA device")
    return resolved


def _prepare_tokenizer(
    tokenizer: transformers.PreTrainedTokenizerBase, max_seq_length: int
) -> transformers.PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to use as pad token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = max_seq_length
    return tokenizer


def _sync_pad_token(model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_location(name_or_path: str | os.PathLike[str]) -> None:
    """FileNotFoundError for a path that does not exist and cannot be a Hub id ("org/name")."""
    text = str(name_or_path)
    if os.path.exists(text):
        if not os.path.isdir(text):
            raise FileNotFoundError(f"name_or_path: {text} is a file; expected a model folder or a Hub id")
        return
    looks_like_path = isinstance(name_or_path, os.PathLike) or text.startswith(("/", ".", "~")) or "\\" in text
    if looks_like_path or not _HUB_ID.match(text) or ".." in text or "--" in text:
        raise FileNotFoundError(f"name_or_path: {text} does not exist; expected a model folder, a Hub id such as "
                                "'HuggingFaceTB/SmolLM2-135M-Instruct', or 'smollm2-offline' (the CLI's demo model)")


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    load_in_4bit: bool = False,
    max_seq_length: int = 2048,
    lora: LoraConfig | None = DEFAULT_LORA,
    gradient_checkpointing: bool = True,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    fast_inference: bool = False,
    gpu_memory_utilization: float | None = None,
) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer for GRPO training.

    Returns (model, tokenizer). The model is a `peft.PeftModel` with trainable LoRA adapters when `lora` is given
    (everything else frozen; adapter weights are float32 over a 16-bit base, peft's default), else the plain
    transformers model with all parameters trainable. The tokenizer pads on the left and has a pad token (eos when
    it had none). `max_seq_length` becomes the tokenizer's `model_max_length`; a warning is given when it exceeds
    the model's `max_position_embeddings`. `device` defaults to cuda when available, else cpu.

    With `load_in_4bit` every linear layer but the lm-head becomes an `NF4Linear` (NF4, blocksize 64,
    double-quantized statistics: bitsandbytes' bytes), quantized on `device` one layer at a time, on CPU or CUDA,
    without bitsandbytes; embeddings, lm-head and norms stay in `dtype` (no float32 upcast). A checkpoint saved by
    bitsandbytes in 4-bit NF4 (`quantization_config` with `load_in_4bit`, `bnb_4bit_quant_type="nf4"`) is read as
    it is, without bitsandbytes, and needs `load_in_4bit=True`. LoRA over NF4 layers runs the fused NF4 LoRA op.

    `fast_inference=True` (Unsloth's name; needs vLLM, LoRA, no 4-bit) first starts an in-process vLLM engine with
    `max_seq_length` as its max_model_len, then builds the training model from views of vLLM's weights (one copy)
    and attaches the engine as `model.vllm_engine` for `GRPOConfig(use_vllm=True)`. `gpu_memory_utilization` is
    vLLM's share of the GPU (None: chosen from the model size, the LoRA state and the card; unused on CPU).
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"name_or_path must be a Hub model id or a local folder, got {name_or_path!r}")
    torch_dtype = resolve_dtype(dtype)
    if not isinstance(load_in_4bit, bool):
        raise TypeError(f"load_in_4bit must be a bool, got {load_in_4bit!r}")
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length <= 0:
        raise ValueError(f"max_seq_length must be a positive int, got {max_seq_length!r}")
    if lora is not None and not isinstance(lora, LoraConfig):
        raise TypeError(f"lora must be a fusedrl.LoraConfig or None, got {type(lora).__name__}")
    if not isinstance(gradient_checkpointing, bool):
        raise TypeError(f"gradient_checkpointing must be a bool, got {gradient_checkpointing!r}")
    target_device = resolve_device(device)
    if not isinstance(fast_inference, bool):
        raise TypeError(f"fast_inference must be a bool, got {fast_inference!r}")
    if fast_inference and load_in_4bit:
        raise ValueError("fast_inference=True with load_in_4bit=True is not supported yet: load 16-bit weights")
    if load_in_4bit:
        if lora is None:
            raise ValueError("load_in_4bit=True needs lora=LoraConfig(...): 4-bit base weights cannot be trained")

    check_model_location(name_or_path)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as error:  # neither a folder here nor a model the Hub (or its offline cache) has
        raise FileNotFoundError(
            f"name_or_path: {str(name_or_path)!r} is neither a local model folder nor a Hub model available here "
            f"({' '.join(str(error).split())[:160]})") from error
    tokenizer = _prepare_tokenizer(tokenizer, max_seq_length)
    if fast_inference:
        from fusedrl.model.fast_inference import load_fast_inference_model

        model = load_fast_inference_model(
            name_or_path, tokenizer, dtype=torch_dtype, max_seq_length=max_seq_length, lora=lora,
            gradient_checkpointing=gradient_checkpointing, device=target_device,
            trust_remote_code=trust_remote_code, gpu_memory_utilization=gpu_memory_utilization,
        )
        return model, tokenizer

    config = transformers.AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    prequantized = bnb_4bit_settings(config) is not None
    if prequantized and not load_in_4bit:
        raise ValueError(
            f"{name_or_path} is a bitsandbytes 4-bit NF4 checkpoint: pass load_in_4bit=True (with a LoRA config)"
        )
    if prequantized:
        model = load_prequantized(
            name_or_path, config, dtype=torch_dtype, device=target_device, trust_remote_code=trust_remote_code
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        if load_in_4bit:
            # Quantized on the target device one layer at a time; the rest follows in `dtype`.
            quantize_linear_layers(model, device=target_device, compute_dtype=torch_dtype)
        model.to(target_device)
    if gradient_checkpointing:
        enable_activation_checkpointing(model)

    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_positions is not None and max_seq_length > max_positions:
        warnings.warn(
            f"max_seq_length={max_seq_length} exceeds the model's max_position_embeddings={max_positions}",
            stacklevel=2,
        )
    _sync_pad_token(model, tokenizer)
    if gradient_checkpointing:
        # The KV cache is useless in a checkpointed training forward; generation turns it back on explicitly.
        model.config.use_cache = False

    if lora is not None:
        peft_config = lora.to_peft()
        if load_in_4bit:
            peft_config = nf4_lora_config(peft_config, model)
        model = peft.get_peft_model(model, peft_config)
    model.train()
    return model, tokenizer
