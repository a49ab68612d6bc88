"""Helpers of the vLLM tests: adapter snapshots, chat prompts, the trainer's log-probabilities, tolerances."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

MAX_SEQ_LENGTH = 256
# float32 on both sides, different kernels (vLLM's CPU attention vs transformers' sdpa): logits agree to about
# 1e-5 relative (seen: 1.3e-5 absolute on log-probabilities); 1e-3 leaves a wide margin and still catches a
# wrong temperature, token or position (errors of 1e-1 and more).
LOGP_TOLERANCE = 1e-3


@contextlib.contextmanager
def restore_adapter(model: torch.nn.Module) -> Iterator[None]:
    """Snapshot the LoRA weights; afterwards put them back and hand them to vLLM again."""
    saved = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in saved:
                    p.copy_(saved[name])
        model.vllm_engine.sync_weights()


def chat_prompt(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def trainer_logp(model: torch.nn.Module, prompt: list[int], completion: list[int], temperature: float = 1.0):
    """The training model's log_softmax(logits / T) of each completion token (float32)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
