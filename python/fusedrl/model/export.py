"""Exporting a trained model: LoRA adapter (PEFT format), merged 16-bit HF folder, and GGUF (f16 / q8_0).

save_lora / load_lora      adapter_model.safetensors + adapter_config.json, loadable by peft and vLLM's LoRA path
save_merged                merge_and_unload on a deep copy (the training model keeps its adapter), cast to
                           bf16/fp16, written as a plain transformers folder (safetensors + config + tokenizer);
                           4-bit NF4 layers are dequantized first (the merge happens in float32, rounded once)
export_gguf                llama.cpp's GGUF for the Llama architecture: HF tensor names mapped with gguf's
                           TensorNameMap, q/k projections permuted to GGUF's rotary layout (as llama.cpp's
                           convert_hf_to_gguf does), byte-level BPE tokenizer metadata, weights in f16 or q8_0
                           (gguf.quants.quantize); 1-D tensors (norms) stay f32 as llama.cpp expects.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

GGUF_OUTTYPES = ("f16", "q8_0")
_GGUF_ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA"}


def _is_peft_model(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapter
# ---------------------------------------------------------------------------------------------------------------


def save_lora(
    model: torch.nn.Module,
    directory: str | os.PathLike[str],
    tokenizer: Any | None = None,
) -> Path:
    """Write the LoRA adapter of a peft.PeftModel (and the tokenizer, if given) to `directory`."""
    if not _is_peft_model(model):
        raise TypeError(
            f"model: expected a peft.PeftModel carrying a LoRA adapter, got {type(model).__name__}; "
            f"use save_merged for a model without adapter"
        )
    directory = Path(directory)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_lora(
    base_model: torch.nn.Module,
    directory: str | os.PathLike[str],
    *,
    is_trainable: bool = False,
):
    """Attach the adapter saved in `directory` to `base_model` (a transformers model); returns a peft.PeftModel."""
    from peft import PeftConfig, PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"directory: {directory} holds no adapter_config.json (expected a save_lora folder)")
    config = PeftConfig.from_pretrained(str(directory))
    if _holds_nf4(base_model):
        from fusedrl.nn.nf4_lora import nf4_lora_config

        config = nf4_lora_config(config, base_model)  # peft must be told how to wrap NF4Linear layers
    return PeftModel.from_pretrained(base_model, str(directory), is_trainable=is_trainable, config=config)


# ---------------------------------------------------------------------------------------------------------------
# merged HF folder
# ---------------------------------------------------------------------------------------------------------------


def _holds_nf4(model: torch.nn.Module) -> bool:
    from fusedrl.nn.nf4_linear import NF4Linear

    return any(isinstance(module, NF4Linear) for module in model.modules())


def merged_copy(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A plain transformers model with the LoRA weights folded in; `model` itself is left untouched.

    The merge is done in the model's own precision (fp32 stays fp32) before casting to `dtype`. NF4 layers are
    dequantized: adapted ones by their LoRA layer's merge (float32, rounded once to the compute dtype), the others
    (not targeted by LoRA) to the compute dtype, so the copy is a plain dense model.
    """
    clone = copy.deepcopy(model)
    if _is_peft_model(clone):
        clone = clone.merge_and_unload()
    if _holds_nf4(clone):
        from fusedrl.model.quantize import dequantize_nf4_layers

        dequantize_nf4_layers(clone)
    if dtype is not None:
        clone = clone.to(dtype)
    clone.eval()
    return clone


def save_merged(
    model: torch.nn.Module,
    directory: str | os.PathLike[str],
    dtype: torch.dtype = torch.bfloat16,
    tokenizer: Any | None = None,
) -> Path:
    """Write a merged, standalone HF model folder (model.safetensors, config.json, tokenizer files)."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype: expected torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
    directory = Path(directory)
    merged = merged_copy(model, dtype)
    merged.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------------------------


def _permute_for_gguf_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF rotates halves of each head; GGUF/llama.cpp rotates interleaved pairs: reorder q/k output rows."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise NotImplementedError(
            f"export_gguf: rope_type {rope_type!r} (rope scaling) is not supported yet; "
            f"only the default rotary embedding"
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("export_gguf: the model config has no rope_theta")
    return float(theta)


def _write_llama_hparams(writer: Any, config: Any, name: str, file_type: int) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _llama_cpp_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer: "gpt-2" (plain byte-level regex), "smollm" (digits split one by one,
    then byte-level), else "default" with a warning (llama.cpp may then split text differently from transformers)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex")) for p in parts]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    warnings.warn(
        f"export_gguf: unrecognised pre-tokenizer {kinds}; writing tokenizer.ggml.pre='default'",
        stacklevel=3,
    )
    return "default"


def _write_bpe_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Byte-level BPE (GPT-2 style) vocabulary, merges, special ids and chat template."""
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        try:
            gguf.vocab.BpeVocab(Path(folder))  # validates: byte-level BPE without byte fallback
        except FileNotFoundError as error:
            raise NotImplementedError(
                "export_gguf: only byte-level BPE tokenizers (GPT-2 style, as Llama-3 / SmolLM2 / Qwen use) are "
                f"supported; this tokenizer is {type(tokenizer).__name__}"
            ) from error
        special_vocab = gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=vocab_size)
        pre = _llama_cpp_pre_tokenizer(json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8")))
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    added = {token_id: added for token_id, added in tokenizer.added_tokens_decoder.items()}
    tokens: list[str] = []
    types: list[int] = []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab.add_to_gguf(writer, quiet=True)


def _gguf_tensor(data: torch.Tensor, outtype: str) -> tuple[np.ndarray, Any]:
    """numpy payload and raw GGML type for one tensor; None type lets the writer infer f16/f32."""
    import gguf

    array = data.detach().to(torch.float32).cpu().numpy()
    if array.ndim <= 1:
        return array, None
    if outtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def _load_for_export(model_or_dir: Any, tokenizer: Any | None) -> tuple[torch.nn.Module, Any]:
    if isinstance(model_or_dir, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(model_or_dir)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model_or_dir: {folder} holds no config.json (expected a save_merged folder)")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return (
            model,
            tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(folder),
        )
    if tokenizer is None:
        raise ValueError("tokenizer: required when model_or_dir is a model object (GGUF stores the vocabulary)")
    model = merged_copy(model_or_dir) if _is_peft_model(model_or_dir) or _holds_nf4(model_or_dir) else model_or_dir
    return model, tokenizer


def export_gguf(
    model_or_dir: torch.nn.Module | str | os.PathLike[str],
    path: str | os.PathLike[str],
    outtype: str = "f16",
    tokenizer: Any | None = None,
) -> Path:
    """Write a llama.cpp GGUF file of a (merged) Llama-architecture model; returns the file path.

    model_or_dir: a peft.PeftModel (merged on a copy), a transformers model, or a save_merged folder.
    outtype: "f16" or "q8_0" for 2-D weights; norms stay f32. Rows not divisible by 32 fall back to f16 in q8_0.
    """
    import gguf

    if outtype not in GGUF_OUTTYPES:
        raise ValueError(f"outtype: expected one of {GGUF_OUTTYPES}, got {outtype!r}")
    model, tokenizer = _load_for_export(model_or_dir, tokenizer)
    config = model.config
    if config.model_type not in _GGUF_ARCHITECTURES:
        raise NotImplementedError(
            f"export_gguf: architecture {config.model_type!r} is not supported; "
            f"supported: {sorted(_GGUF_ARCHITECTURES)}"
        )
    arch = getattr(gguf.MODEL_ARCH, _GGUF_ARCHITECTURES[config.model_type])
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    num_heads = config.num_attention_heads
    num_kv_heads = config.num_key_value_heads or num_heads

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    _write_llama_hparams(
        writer,
        config,
        getattr(config, "_name_or_path", "") or "fusedrl-export",
        int(file_type),
    )
    _write_bpe_tokenizer(writer, tokenizer, config.vocab_size)

    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise NotImplementedError(f"export_gguf: no GGUF name for tensor {hf_name!r}")
        if hf_name.endswith("q_proj.weight"):
            tensor = _permute_for_gguf_rope(tensor, num_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = _permute_for_gguf_rope(tensor, num_kv_heads)
        data, raw_type = _gguf_tensor(tensor, outtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def read_gguf_tensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized to float32, in GGUF's (numpy, row-major) shape."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        out[tensor.name] = np.asarray(values, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
    return out
