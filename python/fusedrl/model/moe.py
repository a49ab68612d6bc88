"""Mixture-of-Experts router load-balancing loss, added to the GRPO loss as TRL 1.16 does.

TRL: a model whose config has `output_router_logits` (Mixtral, Qwen2/3-MoE, ...) gets
`router_aux_loss_coef * aux_loss / gradient_accumulation_steps` added to each micro-batch's loss, where aux_loss is
transformers' `load_balancing_loss_func` over the router logits of the training forward (the whole prompt +
completion sequence, padding excluded through the attention mask) and the coefficient is GRPOConfig's
`router_aux_loss_coef`, or the model config's own when that is None (0.0 where it declares none).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fusedrl.model.hidden import _causal_lm_of, decoder_of, position_ids_from_mask


class RouterAux(NamedTuple):
    coef: float
    num_experts: int
    experts_per_token: int


def router_aux_of(model: torch.nn.Module, coef: float | None) -> RouterAux | None:
    """The router aux-loss setting of `model` (None: no aux loss). `coef` None takes the model config's own."""
    causal_lm = _causal_lm_of(model)
    text_config = causal_lm.config.get_text_config()
    if not hasattr(text_config, "output_router_logits"):
        if coef:
            raise ValueError(f"router_aux_loss_coef is set to {coef} but {type(causal_lm).__name__} is not a "
                             "Mixture-of-Experts model that returns router logits: there is no auxiliary loss to weight")
        return None
    value = float(getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef)
    if value == 0.0:
        return None
    num_experts = getattr(text_config, "num_experts", None) or getattr(text_config, "num_local_experts", None)
    return RouterAux(value, int(num_experts), int(text_config.num_experts_per_tok))


def forward_hidden_and_router_aux(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                  logits_to_keep: int, aux: RouterAux) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (B, logits_to_keep, H) as `forward_hidden` returns it, the router load-balancing loss (scalar)).

    Unlike forward_hidden, the whole sequence runs (the last token included), so the router sees what TRL's
    training forward routes.
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    if not 0 < logits_to_keep < input_ids.shape[1]:
        raise ValueError(f"logits_to_keep must be in [1, {input_ids.shape[1] - 1}], got {logits_to_keep}")
    outputs = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                                output_router_logits=True, return_dict=True)
    hidden = outputs.last_hidden_state[:, -logits_to_keep - 1:-1, :]
    aux_loss = load_balancing_loss_func(outputs.router_logits, aux.num_experts, aux.experts_per_token, attention_mask)
    return hidden, aux_loss
