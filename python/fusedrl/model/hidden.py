"""Last hidden states of a causal LM's decoder, and its lm-head, for the fused lm-head + loss op.

`forward_hidden` runs only the decoder backbone (through peft wrappers, with gradient checkpointing and LoRA
gradients intact) and returns the final-norm hidden states at the positions that predict the last
`logits_to_keep` tokens: hidden (B, logits_to_keep, H), position t predicting token input_ids[:, -logits_to_keep + t].
No logits are ever computed; `lm_head_of` gives the weight (V, H), optional bias (V,), logit scale s and final-logit
softcap c that turn those hidden states into the model's logits: c * tanh(s * (hidden @ weight.T + bias) / c).
`check_lm_head_reproduces_logits` compares that with the model's own forward once, so a model whose forward
transforms its logits in a way not listed here is refused instead of trained on the wrong log-probabilities.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import transformers


class LmHead(NamedTuple):
    """The output projection of a causal LM: logits = softcap(logit_scale * (hidden @ weight.T (+ bias)))."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,) or None
    logit_softcap: float | None
    logit_scale: float = 1.0


def logit_scale_of(config: transformers.PretrainedConfig) -> float:
    """The factor a model's forward multiplies its lm-head output by (before any softcap), from its config.

    Cohere / Cohere2 `logit_scale`; Muse Glimmer `output_multiplier`; Falcon-H1 `lm_head_multiplier`; Granite
    family and MiniCPM3 divide by `logits_scaling` (MiniCPM3 divides the hidden states, the same for a bias-free
    head); HyperCLOVA X multiplies by it. The same list as TRL 1.16's fused lm-head.
    """
    text_config = config.get_text_config()
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if text_config.model_type == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


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
    if hasattr(output_embeddings, "base_layer"):
        # A peft adapter (e.g. LoRA) on the lm-head: the fused op reads the weight matrix directly, so the adapter
        # would be ignored and never trained (TRL 1.16 refuses this too).
        raise ValueError(
            f"a peft adapter wraps the lm-head of {type(causal_lm).__name__} ({type(output_embeddings).__name__}); "
            "fusedrl's fused lm-head op reads lm_head.weight directly, so the adapter would never be trained. "
            "Remove 'lm_head' from the LoRA target_modules, or train the whole head with modules_to_save=['lm_head']."
        )
    # peft's modules_to_save wrapper exposes the active (trainable) copy's weight.
    weight = output_embeddings.weight
    bias = getattr(output_embeddings, "bias", None)
    softcap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
    scale = logit_scale_of(causal_lm.config)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"{type(causal_lm).__name__} multiplies its logits by {scale} (from its config); fusedrl's "
                         "fused lm-head supports positive finite logit scales only")
    return LmHead(weight=weight, bias=bias, logit_softcap=float(softcap) if softcap else None, logit_scale=scale)


@torch.no_grad()
def check_lm_head_reproduces_logits(model: torch.nn.Module, *, tokens: int = 6) -> None:
    """Raise ValueError unless `forward_hidden` + `lm_head_of` give the model's own log-probabilities.

    Runs the model's full forward once on `tokens` fixed ids and compares log_softmax of its logits with the
    logits rebuilt from the hidden states, in float32 (tolerance: the model dtype's rounding of the logits).
    """
    causal_lm = _causal_lm_of(model)
    head = lm_head_of(model)
    device = head.weight.device
    vocab = head.weight.shape[0]
    input_ids = (torch.arange(tokens, device=device) * 7919 % vocab).unsqueeze(0)
    attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    try:
        own = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
        hidden = forward_hidden(model, input_ids, attention_mask, tokens - 1)
    finally:
        model.train(was_training)
    rebuilt = (hidden @ head.weight.T + (0 if head.bias is None else head.bias)).float() * head.logit_scale
    if head.logit_softcap is not None:
        rebuilt = head.logit_softcap * torch.tanh(rebuilt / head.logit_softcap)
    own_logp, rebuilt_logp = torch.log_softmax(own, -1), torch.log_softmax(rebuilt, -1)
    eps = torch.finfo(head.weight.dtype).eps if head.weight.dtype.is_floating_point else 1e-3
    tolerance = 8 * eps * (1.0 + own.abs().max().item())
    error = (own_logp - rebuilt_logp).abs().max().item()
    if not error <= tolerance:
        raise ValueError(
            f"{type(causal_lm).__name__}'s forward transforms its logits in a way fusedrl does not reproduce "
            f"(log-probabilities differ by {error:.3g} > {tolerance:.3g}): fusedrl applies the lm-head, the logit "
            "scales named by logit_scale / output_multiplier / lm_head_multiplier / logits_scaling and "
            "final_logit_softcapping. Training it would use wrong log-probabilities; please open an issue naming "
            "the architecture."
        )
