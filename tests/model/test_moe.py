"""Router aux loss of tiny random MoE models: the model's own aux_loss, TRL's coefficient rule."""

from __future__ import annotations

import pytest
import torch
import transformers

from fusedrl.model import forward_hidden
from fusedrl.model.moe import forward_hidden_and_router_aux, router_aux_of

_SMALL = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, num_experts_per_tok=2)


def tiny_moe(family: str, seed: int = 0):
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**_SMALL, moe_intermediate_size=8, num_experts=4, head_dim=8,
                                             decoder_sparse_step=1, mlp_only_layers=[])
    else:
        config = transformers.MixtralConfig(**_SMALL, num_local_experts=4)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_router_aux_loss_is_the_models_own(family):
    model = tiny_moe(family)
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 40, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding
    aux = router_aux_of(model, None)
    assert aux == (0.001, 4, 2)  # the config's own coefficient (TRL: router_aux_loss_coef=None)
    hidden, aux_loss = forward_hidden_and_router_aux(model, input_ids, attention_mask, 4, aux)
    own = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True).aux_loss
    torch.testing.assert_close(aux_loss, own, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hidden, forward_hidden(model, input_ids, attention_mask, 4), rtol=1e-5, atol=1e-6)
    assert aux_loss.requires_grad


def test_coefficient_rules():
    model = tiny_moe("mixtral")
    assert router_aux_of(model, 0.0) is None
    assert router_aux_of(model, 0.02).coef == 0.02
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    assert router_aux_of(dense, None) is None
    with pytest.raises(ValueError, match="not a Mixture-of-Experts model"):
        router_aux_of(dense, 0.01)
