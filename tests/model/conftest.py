"""Tiny random causal LMs of several families saved with a word-level tokenizer, for model-loading tests."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable

import pytest
import torch
import transformers

from fusedrl.model.tiny import tiny_word_tokenizer

_COMMON = dict(
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def tiny_config(family: str, vocab_size: int, pad_token_id: int, eos_token_id: int) -> transformers.PretrainedConfig:
    """A tiny config of `family` ("llama", "qwen2", "gemma2", "mistral", "cohere", "granite") over `vocab_size`
    tokens; gemma2 softcaps its logits, cohere and granite scale them."""
    ids = dict(vocab_size=vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=1)
    if family == "llama":
        return transformers.LlamaConfig(**_COMMON, **ids, tie_word_embeddings=False)
    if family == "qwen2":
        return transformers.Qwen2Config(**_COMMON, **ids, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**_COMMON, **ids, sliding_window=None)
    if family == "gemma2":
        return transformers.Gemma2Config(
            **_COMMON,
            **ids,
            head_dim=12,
            final_logit_softcapping=3.0,
            attn_logit_softcapping=50.0,
            sliding_window=4,
            query_pre_attn_scalar=12,
        )
    if family == "cohere":  # logits * logit_scale
        return transformers.CohereConfig(**_COMMON, **ids, logit_scale=0.25, tie_word_embeddings=True)
    if family == "granite":  # logits / logits_scaling
        return transformers.GraniteConfig(**_COMMON, **ids, logits_scaling=4.0, tie_word_embeddings=False)
    raise ValueError(f"unknown family {family!r}")


@pytest.fixture
def save_tiny_model(tmp_path: Path) -> Callable[..., Path]:
    """save_tiny_model(family, with_pad=True, seed=0) -> folder holding a random model and its tokenizer."""

    def save(family: str, *, with_pad: bool = True, seed: int = 0) -> Path:
        tokenizer = tiny_word_tokenizer()
        if not with_pad:
            tokenizer.pad_token = None
        config = tiny_config(family, len(tokenizer), tokenizer.pad_token_id or 0, tokenizer.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(config)
        folder = tmp_path / f"{family}-{seed}-{'pad' if with_pad else 'nopad'}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return save
