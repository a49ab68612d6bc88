"""Last hidden states of a causal LM's decoder, and its lm-head, for the fused lm-head + loss op.

`forward_hidden` runs only the decoder backbone (through peft wrappers, with gradient checkpointing and LoRA
gradients intact) and returns the final-norm hidden states at the positions that predict the last
`logits_to_keep` tokens: hidden (B, logits_to_keep, H), position t predicting token input_ids[:, -logits_to_keep + t].
No logits are ever computed; `lm_head_of` gives the weight (V, H), optional bias (V,) and final-logit softcap that
turn those hidden states into the model's logits: softcap * tanh((hidden @ weight.T + bias) / softcap).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import transformers


class LmHead(NamedTuple):
    """The output projection of a causal LM: logits = hidden @ weight.T (+ bias), then the optional softcap."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,) or None
    logit_softcap: float | None


def _causal_lm_of(model: torch.nn.Module) -> transformers.PreTrainedModel:
    """The transformers causal LM inside `model` (unwraps peft.PeftModel and its LoraModel)."""
    inner = model
    get_base_model = getattr(inner, "get_base_model", None)
    if callable(get_base_model):
        inner = get_base_model()
    if not isinstance(inner, transformers.PreTrainedModel):
        raise TypeError(
            f"model must be a transformers causal LM or a peft model wrapping one, got {type(model).__name__}"
        )
    return inner


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder backbone (embeddings, layers, final norm) of a causal LM, through peft wrappers."""
    causal_lm = _causal_lm_of(model)
    get_decoder = getattr(causal_lm, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is causal_lm:
        decoder = getattr(causal_lm, "model", None)
    if not isinstance(decoder, torch.nn.Module) or decoder is causal_lm:
        raise TypeError(f"cannot find the decoder backbone of {type(causal_lm).__name__} (no get_decoder() or .model)")
    return decoder


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (0 at padding), as transformers' generate computes them: (B, T) long."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def forward_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    *,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final-norm hidden states (B, logits_to_keep, H) predicting the last `logits_to_keep` tokens of input_ids.

    These are the hidden states at positions -logits_to_keep-1 .. -2. `position_ids` defaults to positions that
    skip left padding, matching the positions used during generation, so a left-padded prompt gives the same
    hidden states as the unpadded one.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    sequence_length = input_ids.shape[1]
    if (
        isinstance(logits_to_keep, bool)
        or not isinstance(logits_to_keep, int)
        or not 0 < logits_to_keep < sequence_length
    ):
        raise ValueError(
            f"logits_to_keep must be an int in [1, {sequence_length - 1}] (input_ids has {sequence_length} tokens), "
            f"got {logits_to_keep!r}"
        )
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    elif position_ids.shape != input_ids.shape:
        raise ValueError(
            f"position_ids must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(position_ids.shape)}"
        )
    # The last token predicts nothing inside the sequence, so it is left out of the forward.
    outputs = decoder_of(model)(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=position_ids[:, :-1],
        use_cache=False,
        return_dict=True,
    )
    return outputs.last_hidden_state[:, -logits_to_keep:, :]


def lm_head_of(model: torch.nn.Module) -> LmHead:
    """The output projection (weight (V, H), bias or None, final-logit softcap or None) of a causal LM.

    With tied embeddings the returned weight is the input embedding matrix itself (same storage).
    """
    causal_lm = _causal_lm_of(model)
    output_embeddings = causal_lm.get_output_embeddings()
    if output_embeddings is None or getattr(output_embeddings, "weight", None) is None:
        raise TypeError(f"{type(causal_lm).__name__} has no output embeddings (lm-head)")
    # A LoRA-wrapped lm-head (peft modules_to_save / targeted) exposes the base layer's weight.
    base_layer = getattr(output_embeddings, "base_layer", output_embeddings)
    weight = base_layer.weight
    bias = getattr(base_layer, "bias", None)
    softcap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
    return LmHead(weight=weight, bias=bias, logit_softcap=float(softcap) if softcap else None)
