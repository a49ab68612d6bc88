"""QLoRA models without bitsandbytes: load_model(load_in_4bit=True) on tiny models of several families.

Checked: layout (NF4 linears, 16-bit embeddings / lm-head / norms, LoRA only trains), logits against the dense model
holding the dequantized weights, against bitsandbytes + peft when installed, bitsandbytes-written checkpoints read
without bitsandbytes, save_lora / load_lora / save_merged round trips, gradient checkpointing, the built-in engine,
the memory arithmetic of a Llama-3.1-8B-shaped QLoRA model, refusals, and a CUDA run.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers

from fusedrl.model import LoraConfig, forward_hidden, load_model
from fusedrl.model.export import load_lora, save_lora, save_merged
from fusedrl.nn.nf4_linear import NF4Linear
from fusedrl.nn.nf4_lora import NF4LoraLinear, nf4_lora_config
from fusedrl.ops.nf4 import nf4_dequantize
from fusedrl.rollout.base import SamplingConfig
from fusedrl.rollout.builtin import BuiltinEngine

PROMPTS = ["what is 2 + 3 ?", "a b c"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randomize_lora_B(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def _adapter_state(model):
    return {name: value for name, value in model.state_dict().items() if "lora_" in name}


def _logits(model, tokenizer, device="cpu"):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        return model(**batch).logits.float()


def _not_from_bitsandbytes(model):
    return not any(type(module).__module__.startswith("bitsandbytes") for module in model.modules())


def _dense_reference(folder, qlora_model, dtype=torch.float32):
    """The dense transformers model whose linear weights are the NF4 layers' dequantized weights, with the same
    LoRA adapters through peft's own (dense) LoRA layer."""
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    for name, module in qlora_model.get_base_model().named_modules():
        if isinstance(module, NF4LoraLinear):
            nf4 = module.get_base_layer()
            with torch.no_grad():
                dense.get_submodule(name).weight.copy_(nf4_dequantize(nf4.weight, nf4.quant_state, dtype))
    config = qlora_model.peft_config["default"]
    reference = peft.get_peft_model(dense, peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha,
                                                           target_modules=list(PROJECTIONS)))
    reference.load_state_dict(_adapter_state(qlora_model), strict=False)
    return reference


# ---------------------------------------------------------------------------------------------------------------
# layout and values
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_4bit_layout_keeps_embeddings_head_and_norms_in_the_compute_dtype(save_tiny_model, family):
    model, tokenizer = load_model(save_tiny_model(family), dtype="bf16", load_in_4bit=True,
                                  lora=LoraConfig(r=4), device="cpu")
    base = model.get_base_model()
    wrapped = [m for m in base.modules() if isinstance(m, NF4LoraLinear)]
    assert len(wrapped) == 7 * base.config.num_hidden_layers
    assert all(isinstance(m.base_layer, NF4Linear) for m in wrapped)
    assert not any(type(m) is torch.nn.Linear and m is not base.get_output_embeddings()
                   for m in base.modules() if not any(m is w.lora_A["default"] or m is w.lora_B["default"]
                                                       for w in wrapped))
    frozen_floats = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert frozen_floats == {torch.bfloat16}, "embeddings, lm-head and norms must stay bf16 (no float32 upcast)"
    assert all(("lora_A" in n or "lora_B" in n) for n, p in model.named_parameters() if p.requires_grad)
    assert _not_from_bitsandbytes(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    assert not hasattr(base.config, "quantization_config")
    hidden = forward_hidden(model, *tokenizer(PROMPTS, return_tensors="pt", padding=True).values(), 2)
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(hidden.float()).all()


def test_logits_equal_the_dense_model_with_dequantized_weights(save_tiny_model):
    folder = save_tiny_model("llama")
    model, tokenizer = load_model(folder, dtype="float32", load_in_4bit=True, lora=LoraConfig(r=4, lora_alpha=8),
                                  device="cpu", gradient_checkpointing=False)
    _randomize_lora_B(model)
    reference = _dense_reference(folder, model)
    # fp32 throughout: the only difference is the order of the fp32 sums inside the GEMMs
    torch.testing.assert_close(_logits(model, tokenizer), _logits(reference, tokenizer), rtol=1e-5, atol=1e-5)


def test_matches_bitsandbytes_and_peft(save_tiny_model):
    bnb = pytest.importorskip("bitsandbytes")
    folder = save_tiny_model("llama")
    model, tokenizer = load_model(folder, dtype="float32", load_in_4bit=True, lora=LoraConfig(r=4, lora_alpha=8),
                                  device="cpu", gradient_checkpointing=False)
    _randomize_lora_B(model)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                               quantization_config=quantization,
                                                               device_map={"": "cpu"})
    theirs = peft.get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8).to_peft())
    theirs.load_state_dict(_adapter_state(model), strict=False)
    for name, module in theirs.get_base_model().named_modules():
        if isinstance(module, bnb.nn.Linear4bit):  # the same bytes: our quantizer is theirs
            ours = model.get_base_model().get_submodule(name)  # the NF4Linear under the LoRA layer
            assert torch.equal(ours.weight, module.weight.data), name
    torch.testing.assert_close(_logits(model, tokenizer), _logits(theirs, tokenizer), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_loads_a_checkpoint_written_by_bitsandbytes(save_tiny_model, tmp_path, family):
    pytest.importorskip("bitsandbytes")
    folder = save_tiny_model(family)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                               quantization_config=quantization,
                                                               device_map={"": "cpu"})
    prequantized = tmp_path / "bnb-4bit"
    theirs.save_pretrained(prequantized)
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(prequantized)
    assert json.loads((prequantized / "config.json").read_text())["quantization_config"]["load_in_4bit"]

    model, tokenizer = load_model(prequantized, dtype="float32", load_in_4bit=True, lora=LoraConfig(r=4),
                                  device="cpu", gradient_checkpointing=False)
    base = model.get_base_model()
    assert _not_from_bitsandbytes(model) and getattr(base, "hf_quantizer", None) is None
    saved = theirs.state_dict()
    for name, module in base.named_modules():
        if isinstance(module, NF4Linear):
            key = name.replace(".base_layer", "")
            assert torch.equal(module.weight, saved[f"{key}.weight"]), key
            for suffix, value in module.quant_state.state_dict().items():
                assert torch.equal(value, saved[f"{key}.weight.{suffix}"]), f"{key}.weight.{suffix}"
    # LoRA B starts at zero: the adapted model computes what bitsandbytes' model computes
    torch.testing.assert_close(_logits(model, tokenizer), _logits(theirs, tokenizer), rtol=1e-5, atol=1e-5)


def _write_prequantized_without_bnb(folder, tmp_path):
    """A bitsandbytes-format checkpoint written from our own NF4 model (for machines without bitsandbytes)."""
    model, tokenizer = load_model(folder, dtype="float32", load_in_4bit=True, lora=LoraConfig(r=4), device="cpu",
                                  gradient_checkpointing=False)
    base = model.unload()
    prequantized = tmp_path / "ours-4bit"
    base.save_pretrained(prequantized)
    tokenizer.save_pretrained(prequantized)
    config = json.loads((prequantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                     "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8"}
    (prequantized / "config.json").write_text(json.dumps(config))
    return base, tokenizer, prequantized


def test_prequantized_round_trip_without_bitsandbytes(save_tiny_model, tmp_path):
    base, tokenizer, prequantized = _write_prequantized_without_bnb(save_tiny_model("qwen2"), tmp_path)
    model, _ = load_model(prequantized, dtype="float32", load_in_4bit=True, lora=LoraConfig(r=4), device="cpu",
                          gradient_checkpointing=False)
    assert torch.equal(_logits(model, tokenizer), _logits(base, tokenizer))
    with pytest.raises(ValueError, match="load_in_4bit=True"):
        load_model(prequantized, dtype="float32", device="cpu")


@pytest.mark.parametrize(
    ("quantization", "match"),
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "fp4"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit"),
        ({"quant_method": "gptq", "bits": 4}, "gptq"),
    ],
)
def test_unreadable_quantized_checkpoints_are_refused(save_tiny_model, quantization, match):
    folder = save_tiny_model("llama")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        load_model(folder, dtype="float32", load_in_4bit=True, device="cpu")


def test_4bit_needs_a_lora_config(save_tiny_model):
    with pytest.raises(ValueError, match="lora"):
        load_model(save_tiny_model("llama"), load_in_4bit=True, lora=None, device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# training, export, generation
# ---------------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients(save_tiny_model):
    folder = save_tiny_model("llama")
    grads, adapters = [], None
    for checkpointing in (False, True):
        model, tokenizer = load_model(folder, dtype="float32", load_in_4bit=True, lora=LoraConfig(r=4),
                                      device="cpu", gradient_checkpointing=checkpointing)
        _randomize_lora_B(model)
        if adapters is None:
            adapters = _adapter_state(model)
        model.load_state_dict(adapters, strict=False)  # same adapter values in both runs
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        forward_hidden(model, batch["input_ids"], batch["attention_mask"], 3).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_save_merged_is_a_dense_16bit_model_with_the_same_outputs(save_tiny_model, tmp_path):
    model, tokenizer = load_model(save_tiny_model("llama"), dtype="float32", load_in_4bit=True,
                                  lora=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), device="cpu")
    _randomize_lora_B(model)
    expected = _logits(model, tokenizer)
    for dtype in (torch.float32, torch.bfloat16):
        folder = save_merged(model, tmp_path / str(dtype), dtype=dtype, tokenizer=tokenizer)
        assert "quantization_config" not in json.loads((folder / "config.json").read_text())
        merged = transformers.AutoModelForCausalLM.from_pretrained(folder)
        assert {p.dtype for p in merged.parameters()} == {dtype}
        assert not any(isinstance(m, NF4Linear) for m in merged.modules())
        tolerance = 1e-5 if dtype == torch.float32 else 5e-2  # bf16: the merged weights are rounded once
        torch.testing.assert_close(_logits(merged.float(), tokenizer), expected, rtol=tolerance, atol=tolerance)
    # the training model keeps its NF4 layers and adapters
    assert sum(isinstance(m, NF4LoraLinear) for m in model.modules()) == 2 * 2
    assert torch.equal(_logits(model, tokenizer), expected)


def test_save_lora_and_load_lora_onto_a_4bit_base(save_tiny_model, tmp_path):
    folder = save_tiny_model("llama")
    model, tokenizer = load_model(folder, dtype="float32", load_in_4bit=True, lora=LoraConfig(r=4), device="cpu")
    _randomize_lora_B(model)
    save_lora(model, tmp_path / "adapter")
    fresh, _ = load_model(folder, dtype="float32", load_in_4bit=True, lora=LoraConfig(r=4), device="cpu")
    loaded = load_lora(fresh.unload(), tmp_path / "adapter")
    assert sum(isinstance(m, NF4LoraLinear) for m in loaded.modules()) == 7 * 2
    assert torch.equal(_logits(loaded, tokenizer), _logits(model, tokenizer))


@pytest.mark.parametrize("static_decode", [False, True], ids=["generate", "static-loop"])
def test_builtin_engine_generates_what_the_merged_dense_model_generates(save_tiny_model, tmp_path, static_decode):
    model, tokenizer = load_model(save_tiny_model("llama"), dtype="float32", load_in_4bit=True,
                                  lora=LoraConfig(r=4), device="cpu")
    _randomize_lora_B(model)
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        save_merged(model, tmp_path / "merged", dtype=torch.float32))
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    sampling = SamplingConfig(max_new_tokens=6, greedy=True)
    engine = BuiltinEngine(model, tokenizer, static_decode=static_decode)
    assert not static_decode or engine.static_loop.unsupported_reason(32) is None
    ours = engine.generate(prompts, sampling)
    dense = BuiltinEngine(merged, tokenizer, static_decode=False).generate(prompts, sampling)
    assert model.training, "the engine restores training mode"
    assert torch.equal(ours.completion_ids, dense.completion_ids)
    torch.testing.assert_close(ours.sampling_logp, dense.sampling_logp, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# memory of an 8B QLoRA model (arithmetic on the meta device)
# ---------------------------------------------------------------------------------------------------------------


def llama_3_1_8b_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    max_position_embeddings=131072, tie_word_embeddings=False)


def qlora_bytes_on_meta(config: transformers.PretrainedConfig, lora: LoraConfig) -> int:
    """Bytes of every parameter and buffer of the QLoRA model load_model builds, built on the meta device."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and module is not head:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NF4Linear.empty_like(module, compute_dtype=torch.bfloat16))
    model = peft.get_peft_model(model, nf4_lora_config(lora.to_peft(), model))
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied tensors once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_llama_3_1_8b_qlora_fits_in_6_gib():
    total = qlora_bytes_on_meta(llama_3_1_8b_config(), LoraConfig())
    # 7.0e9 linear weights at 4 bits + 1 byte of absmax code per 64: 3.6 GB; embeddings and lm-head bf16: 2.1 GB;
    # r=16 adapters on every linear in fp32: 0.17 GB
    assert 5.0 * 2**30 < total <= 6.0 * 2**30, f"{total / 2**30:.3f} GiB"


# ---------------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_qlora_on_cuda_matches_the_dense_dequantized_model(save_tiny_model):
    folder = save_tiny_model("llama")
    model, tokenizer = load_model(folder, dtype="bf16", load_in_4bit=True, lora=LoraConfig(r=4, lora_alpha=8),
                                  device="cuda")
    base = model.get_base_model()
    assert all(m.weight.is_cuda for m in base.modules() if isinstance(m, NF4Linear))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    _randomize_lora_B(model)
    reference = _dense_reference(folder, model.cpu(), dtype=torch.float32)
    model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = _logits(model, tokenizer, "cuda").cpu()
    torch.testing.assert_close(logits, _logits(reference, tokenizer), rtol=5e-2, atol=5e-2)  # bf16 activations
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True).to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = forward_hidden(model, batch["input_ids"], batch["attention_mask"], 2)
    hidden.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
