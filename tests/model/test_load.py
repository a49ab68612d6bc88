"""load_model: tiny random models of several families load with LoRA, frozen base, checkpointing, left padding."""

from __future__ import annotations

import peft
import pytest
import torch

from fusedrl.model import LoraConfig, load_model
from fusedrl.model.load import resolve_dtype


def _is_checkpointing(model) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2"])
def test_lora_params_train_and_base_is_frozen(save_tiny_model, family):
    folder = save_tiny_model(family)
    model, tokenizer = load_model(folder, dtype="float32", lora=LoraConfig(r=4, lora_alpha=8), device="cpu")

    assert isinstance(model, peft.PeftModel)
    assert model.training
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert any("embed_tokens" in name for name in frozen)
    # every linear of every decoder layer got an adapter ("all-linear")
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{projection}.lora_A" in name for name in trainable), projection
    assert not any("lm_head" in name for name in trainable)
    assert _is_checkpointing(model.get_base_model())
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None


def test_checkpointed_backward_reaches_lora_only(save_tiny_model):
    folder = save_tiny_model("llama")
    model, tokenizer = load_model(
        folder, dtype=torch.float32, lora=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), device="cpu"
    )
    batch = tokenizer(["what is 2+3 ?", "a b"], return_tensors="pt", padding=True)
    # LoRA B starts at zero: give it values so gradients reach A too.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    logits = model(**batch).logits
    logits.float().logsumexp(-1).mean().backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)


def test_missing_pad_token_becomes_eos(save_tiny_model):
    folder = save_tiny_model("qwen2", with_pad=False)
    model, tokenizer = load_model(folder, dtype="fp32", lora=None, gradient_checkpointing=False, device="cpu")
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.padding_side == "left"
    assert not isinstance(model, peft.PeftModel)
    assert all(p.requires_grad for p in model.parameters())
    assert not _is_checkpointing(model)


def test_dtype_strings_and_max_seq_length(save_tiny_model):
    folder = save_tiny_model("llama")
    model, tokenizer = load_model(folder, dtype="bf16", max_seq_length=100, device="cpu")
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    # peft keeps adapter weights in float32 over a 16-bit base (autocast_adapter_dtype)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert tokenizer.model_max_length == 100
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        load_model(folder, dtype="float32", max_seq_length=8192)


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"dtype": "int8"}, ValueError, "dtype"),
        ({"dtype": torch.int32}, ValueError, "dtype"),
        ({"dtype": 3}, TypeError, "dtype"),
        ({"max_seq_length": 0}, ValueError, "max_seq_length"),
        ({"max_seq_length": 1.5}, ValueError, "max_seq_length"),
        ({"lora": {"r": 4}}, TypeError, "lora"),
        ({"gradient_checkpointing": "yes"}, TypeError, "gradient_checkpointing"),
        ({"device": "nonsense"}, ValueError, "device"),
        ({"load_in_4bit": 1}, TypeError, "load_in_4bit"),
    ],
)
def test_bad_arguments_name_the_argument(save_tiny_model, kwargs, error, argument):
    folder = save_tiny_model("llama")
    with pytest.raises(error, match=argument):
        load_model(folder, **kwargs)


def test_resolve_dtype_accepts_names_and_dtypes():
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(" BFloat16 ") is torch.bfloat16
    assert resolve_dtype(torch.float32) is torch.float32


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"r": 0}, "r"),
        ({"r": True}, "r"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"bias": "some"}, "bias"),
        ({"target_modules": "all"}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target_modules"),
    ],
)
def test_lora_config_validation(kwargs, argument):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{argument}"):
        LoraConfig(**kwargs)


def test_lora_config_to_peft():
    config = LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), lora_dropout=0.05).to_peft()
    assert isinstance(config, peft.LoraConfig)
    assert config.task_type == peft.TaskType.CAUSAL_LM
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 16, 0.05, "none")
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert LoraConfig(target_modules=["o_proj"]).target_modules == ("o_proj",)
