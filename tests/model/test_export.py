"""Adapter save/load, merged HF folders and GGUF export (f16, q8_0) read back by gguf and by transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fusedrl.model.export import (
    export_gguf,
    load_lora,
    merged_copy,
    read_gguf_tensors,
    save_lora,
    save_merged,
)
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

VOCAB = 320


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer (SmolLM2 / Llama-3 style) trained on the spot, with ChatML specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["Natalia sold clips to 48 of her friends in April, and then half as many clips in May. #### 72"] * 8
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )


def tiny_lora_model(tokenizer, seed: int, tie: bool = True) -> PeftModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, lora).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_saved_adapter_reloads_to_the_same_outputs(tmp_path, tokenizer):
    model = tiny_lora_model(tokenizer, seed=1)
    ids = torch.randint(0, VOCAB, (3, 13))
    save_lora(model, tmp_path / "adapter", tokenizer=tokenizer)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    torch.manual_seed(1)  # the same base weights as tiny_lora_model(seed=1), without adapter
    base = LlamaForCausalLM(model.get_base_model().config).eval()
    base_logits = logits(base, ids)
    assert not torch.allclose(base_logits, logits(model, ids), atol=1e-3)  # the adapter matters
    reloaded = load_lora(base, tmp_path / "adapter").eval()
    assert torch.allclose(logits(reloaded, ids), logits(model, ids), atol=1e-6)


def test_save_lora_rejects_a_plain_model(tmp_path, tokenizer):
    with pytest.raises(TypeError, match="PeftModel"):
        save_lora(tiny_lora_model(tokenizer, seed=0).get_base_model(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(torch.nn.Linear(2, 2), tmp_path)


def test_merged_model_equals_adapter_model_and_leaves_it_intact(tmp_path, tokenizer):
    model = tiny_lora_model(tokenizer, seed=2, tie=False)
    ids = torch.randint(0, VOCAB, (2, 17))
    before = logits(model, ids)
    merged = merged_copy(model)
    assert not isinstance(merged, PeftModel)
    assert torch.allclose(logits(merged, ids), before, atol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        folder = save_merged(model, tmp_path / str(dtype), dtype=dtype, tokenizer=tokenizer)
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        assert loaded.dtype == dtype
        reference = merged_copy(model, dtype).state_dict()
        assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
        same_dtype_error = (logits(merged_copy(model, dtype), ids) - before).abs().max()
        assert (logits(loaded, ids) - before).abs().max() <= 2 * same_dtype_error
        assert AutoTokenizer.from_pretrained(folder)("May").input_ids == tokenizer("May").input_ids
    # the training model still has its adapter and its outputs
    assert isinstance(model, PeftModel) and any("lora_A" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model, ids), before)
    with pytest.raises(ValueError, match="dtype"):
        save_merged(model, tmp_path / "bad", dtype=torch.int8)


def rounded_reference(model: PeftModel, outtype: str) -> torch.nn.Module:
    """The merged model with every 2-D weight rounded exactly as the f16 export stores it."""
    reference = merged_copy(model)
    if outtype == "f16":
        with torch.no_grad():
            for p in reference.parameters():
                if p.ndim == 2:
                    p.copy_(p.half().float())
    return reference


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("tie", [True, False])
def test_gguf_round_trip(tmp_path, tokenizer, outtype, tie):
    import gguf

    model = tiny_lora_model(tokenizer, seed=3, tie=tie)
    path = export_gguf(model, tmp_path / f"model-{outtype}.gguf", outtype=outtype, tokenizer=tokenizer)

    reader = gguf.GGUFReader(path)
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert ("output.weight" in types) == (not tie)
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    expected_2d = gguf.GGMLQuantizationType.F16 if outtype == "f16" else gguf.GGMLQuantizationType.Q8_0
    assert types["blk.1.ffn_down.weight"] == expected_2d and types["token_embd.weight"] == expected_2d

    # tensors: v/o/ffn need no permutation. q8_0 stores d = amax/127 per 32-block in f16 and q = round(x/d):
    # error <= d/2 from rounding + 127 * |d - f16(d)| <= d * (0.5 + 127 * 2**-11)
    merged = merged_copy(model)
    stored = read_gguf_tensors(path)
    for hf_name, gguf_name in [
        ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
        ("model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight"),
    ]:
        original = merged.state_dict()[hf_name].numpy()
        error = np.abs(stored[gguf_name] - original)
        if outtype == "f16":
            assert np.array_equal(stored[gguf_name], original.astype(np.float16).astype(np.float32))
        else:
            block_amax = np.abs(original.reshape(original.shape[0], -1, 32)).max(-1, keepdims=True)
            bound = block_amax / 127 * (0.5 + 127 * 2.0**-11) + 1e-7
            assert (error.reshape(bound.shape[0], -1, 32) <= bound).all()

    # transformers' GGUF loader (which undoes the rotary permutation) rebuilds the same network and tokenizer
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 11))
    got, want = logits(loaded, ids), logits(rounded_reference(model, outtype), ids)
    if outtype == "f16":
        assert torch.allclose(got, want, atol=1e-5)
    else:
        assert (got - want).abs().max() < 0.05 * want.abs().max()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "Natalia sold 48 clips in May.<|im_end|>"
    assert loaded_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert loaded_tokenizer.eos_token == "<|im_end|>"


def test_gguf_from_merged_folder_and_argument_errors(tmp_path, tokenizer):
    model = tiny_lora_model(tokenizer, seed=4)
    folder = save_merged(model, tmp_path / "merged", dtype=torch.float16, tokenizer=tokenizer)
    path = export_gguf(folder, tmp_path / "from-folder.gguf")
    assert "blk.1.ffn_up.weight" in read_gguf_tensors(path)
    with pytest.raises(ValueError, match="outtype"):
        export_gguf(model, tmp_path / "x.gguf", outtype="q4_k", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        export_gguf(model, tmp_path / "x.gguf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_gguf(tmp_path / "nowhere", tmp_path / "x.gguf")
