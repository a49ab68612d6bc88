"""Load a Hugging Face causal LM and its tokenizer ready for GRPO training.

`load_model` loads any transformers causal LM (Llama, Qwen2/3, Mistral, Gemma families), in 16/32-bit or, on CUDA,
4-bit NF4 through bitsandbytes (QLoRA); makes the tokenizer generation-ready (pad token, left padding); attaches
LoRA adapters with peft so only the adapters train (base weights, embeddings and lm-head frozen); and turns on
non-reentrant gradient checkpointing.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import peft
import torch
import transformers

from fusedrl.model.lora import LoraConfig

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

_QLORA_INSTALL_HINT = (
    "load_in_4bit=True needs a CUDA GPU and the bitsandbytes package (`pip install bitsandbytes`); "
    "fusedrl's own NF4 op will replace bitsandbytes here once it lands"
)


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


def _check_4bit_available(device: torch.device) -> None:
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"{_QLORA_INSTALL_HINT} (device is {device})")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(f"{_QLORA_INSTALL_HINT} (bitsandbytes is not installed)")


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


def enable_activation_checkpointing(model: transformers.PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (newer transformers renamed the method)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
    the model's `max_position_embeddings`. `device` defaults to cuda when available, else cpu. With
    `load_in_4bit` (CUDA + bitsandbytes only) the linear weights are NF4 with double quantization, computing in
    `dtype`, and peft's `prepare_model_for_kbit_training` upcasts the remaining weights to float32.

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
        _check_4bit_available(target_device)
        if lora is None:
            raise ValueError("load_in_4bit=True needs lora=LoraConfig(...): 4-bit base weights cannot be trained")

    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    tokenizer = _prepare_tokenizer(tokenizer, max_seq_length)
    if fast_inference:
        from fusedrl.model.fast_inference import load_fast_inference_model

        model = load_fast_inference_model(
            name_or_path, tokenizer, dtype=torch_dtype, max_seq_length=max_seq_length, lora=lora,
            gradient_checkpointing=gradient_checkpointing, device=target_device,
            trust_remote_code=trust_remote_code, gpu_memory_utilization=gpu_memory_utilization,
        )
        return model, tokenizer

    if load_in_4bit:
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=torch_dtype,
            quantization_config=quantization,
            device_map={"": str(target_device)},
            trust_remote_code=trust_remote_code,
        )
        # peft upcasts every non-4-bit parameter (norms, embeddings, lm-head) to float32 here.
        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
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
        model = peft.get_peft_model(model, lora.to_peft())
    model.train()
    return model, tokenizer
