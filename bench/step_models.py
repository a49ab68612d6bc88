"""Random-init models of real shapes for bench_step.py: bf16 + LoRA, fusedrl's NF4 QLoRA, bitsandbytes 4-bit + peft.

  bf16   transformers model in bf16, peft LoRA r16 / alpha 32 on every linear layer
  nf4    the same weights quantized by fusedrl.model.quantize (what `fusedrl.load_model(load_in_4bit=True)` does:
         NF4Linear layers with bitsandbytes' bytes, blocksize 64, nested statistics), LoRA through nf4_lora_config
  bnb    the same weights as bitsandbytes Linear4bit (nf4, double quant, bf16 compute) + peft's bnb LoRA layers
         (peft's own dispatch, no prepare_model_for_kbit_training upcast); needs bitsandbytes with CUDA
"""

from __future__ import annotations

import torch
import transformers

SHAPES = {
    "llama3.1-8b": dict(cls="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                        tie_word_embeddings=False),
    "qwen3-4b": dict(cls="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     rope_theta=1000000.0, tie_word_embeddings=True),
    "tiny": dict(cls="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}
QUANTIZATIONS = ("bf16", "nf4", "bnb")


def _base_model(shape: str, device: torch.device) -> torch.nn.Module:
    spec = dict(SHAPES[shape])
    family = spec.pop("cls")
    config_cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen3Config
    config = config_cls(max_position_embeddings=131072, **spec)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def _lora_config():
    import peft

    return peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def build_model(shape: str, device: torch.device, quantization: str = "bf16") -> torch.nn.Module:
    """The model of `shape` on `device` with LoRA, its linear layers in `quantization` (see module doc)."""
    import peft

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    model = _base_model(shape, device)
    if quantization == "bf16":
        return peft.get_peft_model(model, _lora_config())
    if quantization == "nf4":
        from fusedrl.model.quantize import quantize_linear_layers
        from fusedrl.nn.nf4_lora import nf4_lora_config

        quantize_linear_layers(model, device=device, compute_dtype=torch.bfloat16)
        return peft.get_peft_model(model, nf4_lora_config(_lora_config(), model))
    _to_bitsandbytes(model, device)
    return peft.get_peft_model(model, _lora_config())


@torch.no_grad()
def _to_bitsandbytes(model: torch.nn.Module, device: torch.device) -> None:
    import bitsandbytes as bnb

    output = model.get_output_embeddings()
    names = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not output]
    for name in names:
        linear = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64, module=layer).to(device)  # quantizes
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        del linear
    model.is_loaded_in_4bit = True  # what peft and transformers look for on a bitsandbytes 4-bit model
