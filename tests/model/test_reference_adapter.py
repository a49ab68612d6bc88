"""The KL reference of a peft model: disabled adapters when fresh, a frozen copy of the starting adapter otherwise."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

from fusedrl.model.reference_adapter import StartingAdapter, adapters_are_fresh, reference_context


def _tiny_peft(seed=0, modules_to_save=None):
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM(config).eval()
    return peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                     modules_to_save=modules_to_save))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _train_a_little(model, value=0.3):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.full_like(parameter, value))


def test_fresh_adapters_use_disabled_adapters():
    model = _tiny_peft()
    assert adapters_are_fresh(model)
    assert reference_context(model) == model.disable_adapter


def test_trained_adapter_reference_is_the_starting_adapter():
    model = _tiny_peft()
    ids = torch.randint(0, 40, (2, 5))
    _train_a_little(model, 0.2)  # e.g. an SFT adapter loaded before RL
    assert not adapters_are_fresh(model)
    starting = _logits(model, ids)
    with model.disable_adapter():
        base = _logits(model, ids)
    reference = reference_context(model)
    _train_a_little(model, 0.5)  # RL moves the adapter
    trained = _logits(model, ids)
    with reference():
        torch.testing.assert_close(_logits(model, ids), starting)
    torch.testing.assert_close(_logits(model, ids), trained)  # restored afterwards
    assert not torch.allclose(starting, base) and not torch.allclose(starting, trained)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_modules_to_save_counts_as_trained_once_changed():
    model = _tiny_peft(modules_to_save=["lm_head"])
    assert adapters_are_fresh(model)
    with torch.no_grad():
        model.get_base_model().lm_head.modules_to_save["default"].weight.add_(0.1)
    assert not adapters_are_fresh(model)


def test_restored_after_an_error():
    model = _tiny_peft()
    _train_a_little(model)
    snapshot = StartingAdapter(model)
    _train_a_little(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(RuntimeError, match="boom"):
        with snapshot.active():
            raise RuntimeError("boom")
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert torch.equal(parameter, before[name])
