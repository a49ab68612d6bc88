"""forward_hidden + lm_head_of reproduce the model's logits at the kept positions, through peft and checkpointing."""

from __future__ import annotations

import pytest
import torch

from fusedrl.model import LoraConfig, forward_hidden, lm_head_of, load_model
from fusedrl.model.hidden import check_lm_head_reproduces_logits, position_ids_from_mask
from fusedrl.ops import selective_logp


def _random_batch(vocab_size: int, lengths: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random ids (pad id 0) and the attention mask, rows of the given lengths."""
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(6, vocab_size, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


def _logits_from_hidden(hidden: torch.Tensor, model) -> torch.Tensor:
    head = lm_head_of(model)
    logits = hidden @ head.weight.T
    if head.bias is not None:
        logits = logits + head.bias
    logits = logits * head.logit_scale
    if head.logit_softcap is not None:
        logits = torch.tanh(logits / head.logit_softcap) * head.logit_softcap
    return logits


def _give_lora_weights(model, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "cohere", "granite"])
def test_hidden_times_lm_head_matches_model_logits(save_tiny_model, family):
    generator = torch.Generator().manual_seed(1234)
    folder = save_tiny_model(family)
    model, tokenizer = load_model(
        folder, dtype="float32", lora=LoraConfig(r=4), gradient_checkpointing=True, device="cpu"
    )
    _give_lora_weights(model, generator)
    input_ids, attention_mask = _random_batch(len(tokenizer), [13, 7, 11], generator)
    logits_to_keep = 5

    hidden = forward_hidden(model, input_ids, attention_mask, logits_to_keep)
    assert hidden.shape == (3, logits_to_keep, model.config.hidden_size)
    reference = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).logits[:, -logits_to_keep - 1 : -1]
    torch.testing.assert_close(_logits_from_hidden(hidden, model), reference, rtol=1e-5, atol=1e-5)
    expected = {"gemma2": (3.0, 1.0), "cohere": (None, 0.25), "granite": (None, 0.25)}.get(family, (None, 1.0))
    assert (lm_head_of(model).logit_softcap, lm_head_of(model).logit_scale) == expected
    check_lm_head_reproduces_logits(model)  # does not raise

    # The fused op, given the head's scale and softcap, gives the model's own log-probabilities
    targets = input_ids[:, -logits_to_keep:]
    head = lm_head_of(model)
    logp, _ = selective_logp(hidden.detach(), head.weight, targets, lm_head_bias=head.bias, temperature=0.7,
                             logit_softcap=head.logit_softcap, logit_scale=head.logit_scale)
    own = torch.log_softmax(reference / 0.7, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp, own, rtol=1e-5, atol=1e-5)


def test_a_model_scaling_its_logits_unknowingly_is_refused(save_tiny_model):
    """A forward that transforms logits in a way lm_head_of does not know about is refused, not trained wrongly."""
    model, _ = load_model(save_tiny_model("llama"), dtype="float32", lora=None, device="cpu")
    original_forward = model.forward

    def doubled_logits(*args, **kwargs):
        output = original_forward(*args, **kwargs)
        output.logits = output.logits * 2.0
        return output

    model.forward = doubled_logits
    with pytest.raises(ValueError, match="forward transforms its logits in a way fusedrl does not reproduce"):
        check_lm_head_reproduces_logits(model)


def test_non_positive_logit_scale_is_refused(save_tiny_model):
    model, _ = load_model(save_tiny_model("cohere"), dtype="float32", lora=None, device="cpu")
    model.config.logit_scale = -1.0
    with pytest.raises(ValueError, match="multiplies its logits by -1.0"):
        lm_head_of(model)


def test_lm_head_of_tied_and_untied(save_tiny_model):
    tied, _ = load_model(save_tiny_model("qwen2"), dtype="float32", device="cpu")
    head = lm_head_of(tied)
    assert head.weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    assert head.bias is None and head.logit_softcap is None and not head.weight.requires_grad
    untied, _ = load_model(save_tiny_model("llama"), dtype="float32", device="cpu")
    assert lm_head_of(untied).weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()


def test_gradients_reach_lora_through_checkpointing(save_tiny_model):
    generator = torch.Generator().manual_seed(7)
    model, tokenizer = load_model(save_tiny_model("llama"), dtype="float32", gradient_checkpointing=True, device="cpu")
    _give_lora_weights(model, generator)
    input_ids, attention_mask = _random_batch(len(tokenizer), [9, 6], generator)
    hidden = forward_hidden(model, input_ids, attention_mask, 4)
    (hidden.square().mean()).backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in lora_grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_left_padding_does_not_change_hidden(save_tiny_model):
    generator = torch.Generator().manual_seed(99)
    model, tokenizer = load_model(save_tiny_model("llama"), dtype="float32", device="cpu")
    model.eval()
    input_ids, attention_mask = _random_batch(len(tokenizer), [10, 6], generator)
    with torch.no_grad():
        padded = forward_hidden(model, input_ids, attention_mask, 3)[1]
        alone = forward_hidden(model, input_ids[1:, -6:], attention_mask[1:, -6:], 3)[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_plain_model_without_peft(save_tiny_model):
    generator = torch.Generator().manual_seed(3)
    model, tokenizer = load_model(
        save_tiny_model("gemma2"), dtype="float32", lora=None, gradient_checkpointing=False, device="cpu"
    )
    input_ids, attention_mask = _random_batch(len(tokenizer), [5, 5], generator)
    hidden = forward_hidden(model, input_ids, attention_mask, 4)
    reference = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -5:-1]
    torch.testing.assert_close(_logits_from_hidden(hidden, model), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("logits_to_keep", [0, 8, -1, 2.0, True])
def test_bad_logits_to_keep(save_tiny_model, logits_to_keep):
    model, _ = load_model(save_tiny_model("llama"), dtype="float32", device="cpu")
    input_ids = torch.ones(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="logits_to_keep"):
        forward_hidden(model, input_ids, torch.ones_like(input_ids), logits_to_keep)


def test_mismatched_mask_shape(save_tiny_model):
    model, _ = load_model(save_tiny_model("llama"), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="attention_mask"):
        forward_hidden(model, torch.ones(2, 8, dtype=torch.long), torch.ones(2, 7, dtype=torch.long), 3)


def test_lora_on_lm_head_is_refused_and_modules_to_save_trains_the_head(save_tiny_model):
    import peft

    base, _ = load_model(save_tiny_model("llama"), dtype="float32", lora=None, device="cpu")
    lora_on_head = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="a peft adapter wraps the lm-head"):
        lm_head_of(lora_on_head)

    base, _ = load_model(save_tiny_model("llama"), dtype="float32", lora=None, device="cpu")
    whole_head = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = lm_head_of(whole_head)
    wrapper = whole_head.get_base_model().get_output_embeddings()
    assert head.weight.requires_grad and head.weight is wrapper.modules_to_save["default"].weight
