"""`load_model(..., fast_inference=True)`: vLLM first, then a training model made of views of vLLM's weights.

Order: (1) the in-process vLLM engine loads the checkpoint (its CPU linear weights kept unpacked, see
`fusedrl.rollout.vllm_setup`); (2) the transformers model is built on the meta device and given views of vLLM's
parameters (`fusedrl.model.shared_weights`); (3) peft LoRA adapters are attached on top (base frozen); (4) a check
proves every base parameter shares storage with vLLM and records vLLM's data pointers; (5) the adapter is
registered in vLLM's LoRA slot and a `VLLMEngine` is attached to the model as `model.vllm_engine`, where
`GRPOTrainer(use_vllm=True)` finds it.
"""

from __future__ import annotations

import os

import peft
import torch
import transformers

from fusedrl.model.lora import LoraConfig


def _eos_ids(tokenizer: transformers.PreTrainedTokenizerBase, model: transformers.PreTrainedModel) -> list[int]:
    ids: list[int] = []
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for value in [source] if isinstance(source, int) else list(source or []):
            if int(value) not in ids:
                ids.append(int(value))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config defines an eos token id")
    return ids


def auto_gpu_memory_utilization(config: transformers.PretrainedConfig, dtype: torch.dtype, lora: LoraConfig,
                                device: torch.device) -> float:
    """vLLM's share of the card from the model size, the LoRA state the trainer keeps, and the card's memory."""
    from fusedrl.rollout.vllm_standby import (
        RESIDENT_BYTES_PER_LORA_PARAMETER,
        lora_parameter_count,
        plan_gpu_memory_utilization,
    )

    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in meta.parameters())
    resident = lora_parameter_count(config, lora.r, lora.target_modules) * RESIDENT_BYTES_PER_LORA_PARAMETER
    total = torch.cuda.get_device_properties(device).total_memory
    return plan_gpu_memory_utilization(weight_bytes, total, resident)


def load_fast_inference_model(
    name_or_path: str | os.PathLike[str],
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    dtype: torch.dtype,
    max_seq_length: int,
    lora: LoraConfig | None,
    gradient_checkpointing: bool,
    device: torch.device,
    trust_remote_code: bool,
    gpu_memory_utilization: float | None,
    enable_sleep_mode: bool = True,
    seed: int = 0,
) -> torch.nn.Module:
    """The peft training model sharing vLLM's weights, with `model.vllm_engine` attached."""
    from fusedrl.model.checkpointing import enable_activation_checkpointing
    from fusedrl.model.shared_weights import SharedWeights, build_shared_model
    from fusedrl.rollout.vllm_engine import VLLMEngine
    from fusedrl.rollout.vllm_lora import vllm_max_lora_rank
    from fusedrl.rollout.vllm_setup import create_llm, live_model, require_vllm
    from fusedrl.rollout.vllm_standby import check_sleep_mode_allowed

    require_vllm()
    if lora is None:
        raise ValueError(
            "fast_inference=True needs lora=LoraConfig(...): the base weights are vLLM's and stay frozen; only "
            "LoRA adapters are trained and handed to vLLM"
        )
    if lora.bias != "none":
        raise ValueError("fast_inference=True needs LoraConfig(bias='none'): trainable biases would change vLLM's base")
    if device.type == "cuda" and device.index not in (None, 0) and device.index != torch.cuda.current_device():
        raise ValueError(f"fast_inference runs vLLM on the current CUDA device; got device={device}")
    if gpu_memory_utilization is not None and not (0 < gpu_memory_utilization <= 1):
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    config = transformers.AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if device.type == "cuda":
        if enable_sleep_mode:
            check_sleep_mode_allowed(device)
        if gpu_memory_utilization is None:
            gpu_memory_utilization = auto_gpu_memory_utilization(config, dtype, lora, device)

    llm = create_llm(
        str(name_or_path),
        dtype=dtype,
        device=device,
        max_model_len=max_seq_length,
        max_lora_rank=vllm_max_lora_rank(lora.r),
        gpu_memory_utilization=gpu_memory_utilization,
        enable_sleep_mode=enable_sleep_mode,
        seed=seed,
        trust_remote_code=trust_remote_code,
    )
    vllm_model = live_model(llm)
    model = build_shared_model(config, vllm_model, dtype)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    model = peft.get_peft_model(model, lora.to_peft())
    model.train()

    shared = SharedWeights(vllm_model)
    shared_bytes = shared.check_shares_storage(model)
    model.vllm_engine = VLLMEngine(
        llm,
        model,
        shared,
        eos_token_ids=_eos_ids(tokenizer, model.get_base_model()),
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=model.get_input_embeddings().num_embeddings,
        max_model_len=max_seq_length,
        device=device,
        enable_sleep_mode=enable_sleep_mode,
        gpu_memory_utilization=gpu_memory_utilization,
        shared_bytes=shared_bytes,
    )
    return model
