"""Tiny models and tokenizers for fast tests and demos that need no downloaded weights.

`tiny_model_from_tokenizer` builds a random-init Llama over any tokenizer's vocabulary (e.g. the offline SmolLM2
one); `tiny_word_tokenizer` builds a small whitespace/word-level tokenizer with special tokens and a ChatML-style
chat template, so tests need no files at all.
"""

from __future__ import annotations

import string

import tokenizers
import torch
import transformers

TINY_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>")
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def tiny_word_tokenizer(words: list[str] | None = None) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer (whitespace and punctuation split) with pad/bos/eos/unk and ChatML markers.

    The vocabulary is the special tokens, then `words` (default: digits, lowercase letters, common punctuation and
    a few English words). eos is `<|im_end|>`, pad `<pad>`; unknown words map to `<unk>`. padding_side is "left".
    """
    if words is None:
        words = list(string.digits) + list(string.ascii_lowercase) + list("+-*/=.,?!:#()")
        words += "the answer is what how many user assistant system and of a to".split()
    vocabulary: dict[str, int] = {}
    for token in (*TINY_SPECIAL_TOKENS, *words):
        if not isinstance(token, str) or not token:
            raise ValueError(f"words must be non-empty strings, got {token!r}")
        vocabulary.setdefault(token, len(vocabulary))
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.WhitespaceSplit(), tokenizers.pre_tokenizers.Punctuation()]
    )
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<eos>"],
        padding_side="left",
    )
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_model_from_tokenizer(
    tokenizer: transformers.PreTrainedTokenizerBase,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> transformers.LlamaForCausalLM:
    """A float32 LlamaForCausalLM with random weights (seeded), `layers` decoder layers of width `hidden`.

    The vocabulary covers every id of `tokenizer` (added tokens included); bos/eos/pad ids come from it.
    `hidden` must be a positive multiple of 16 (4 heads of at least 4 dims, 2 key/value heads).
    """
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0 or hidden % 16:
        raise ValueError(f"hidden must be a positive multiple of 16, got {hidden!r}")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers <= 0:
        raise ValueError(f"layers must be a positive int, got {layers!r}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model.float()
