"""The policy's forward pass over a batch's completions: backbone hidden states and per-token log-probabilities.

The trainer never builds (B, T, V) logits: `completion_hidden` returns the hidden states that predict the
completion tokens, and the fused op (`fusedrl.ops`) applies the lm-head and the log-softmax in chunks.
"""

from __future__ import annotations

import torch

from fusedrl.model.hidden import forward_hidden, lm_head_of
from fusedrl.ops import selective_logp
from fusedrl.train.batching import TrainingBatch
from fusedrl.train.optim import Precision


def completion_inputs(batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompt + completion, (B, P + Tc)."""
    return (torch.cat([batch.prompt_ids, batch.completion_ids], dim=1),
            torch.cat([batch.prompt_mask, batch.completion_mask], dim=1))


def completion_hidden(model: torch.nn.Module, batch: TrainingBatch) -> torch.Tensor:
    """(B, Tc, H) hidden states; position t predicts batch.completion_ids[:, t]."""
    input_ids, attention_mask = completion_inputs(batch)
    return forward_hidden(model, input_ids, attention_mask, logits_to_keep=batch.completion_ids.shape[1])


@torch.no_grad()
def per_token_logp(model: torch.nn.Module, batch: TrainingBatch, precision: Precision, temperature: float) -> torch.Tensor:
    """(B, Tc) float32 logp of the completion tokens under `model`, no graph kept (old-policy and reference logp)."""
    with precision.autocast():
        hidden = completion_hidden(model, batch)
        head = lm_head_of(model)
        logp, _ = selective_logp(hidden, head.weight, batch.completion_ids, lm_head_bias=head.bias,
                                 temperature=temperature, logit_softcap=head.logit_softcap,
                                 logit_scale=head.logit_scale)
    return logp.float()
