"""The forward pass of Llama-family decoders (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma) over a static KV cache.

It calls the training model's own modules (embeddings, norms, q/k/v/o projections, MLP, lm-head; peft LoRA
layers wrap the projections and apply their adapters live; a quantized layer is any module whose forward maps
(..., in) to (..., out)), and re-does only the glue transformers does between them: rotary embedding (with the
model's own rotary module, so rope scaling is the model's), the cache write, and attention with SDPA:
- prefill: the whole left-padded prompt block (B, W) at once, causal and padding-masked, keys/values written to
  cache slots [0, W);
- decode: one token per row written to slot `slot` (a device tensor, so a CUDA graph can replay it), attention
  over the first `kv_len` cache slots only (a sliced view, not the whole cache through a mask); the g = heads /
  kv_heads query heads sharing a kv head are laid out as g query rows of one SDPA problem, so no repeated K/V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedrl.model.hidden import _causal_lm_of, decoder_of
from fusedrl.rollout.static_cache import StaticKVCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")


def unsupported_reason(model: torch.nn.Module, total_length: int) -> str | None:
    """Why the static decode loop cannot run `model` for sequences of `total_length` tokens (None: it can)."""
    try:
        causal_lm = _causal_lm_of(model)
    except TypeError as err:
        return str(err)
    config = causal_lm.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    sliding = window is not None and (model_type == "mistral" or "sliding_attention" in layer_types)
    if sliding and window < total_length:
        return f"sliding-window attention (window {window} < {total_length} tokens) is not implemented"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(rope, dict) and "dynamic" in str(rope.get("rope_type", "")):
        return "dynamic rope scaling changes with the sequence length (not capturable)"
    decoder = decoder_of(model)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    missing = [name for name in needed if not hasattr(decoder, name)]
    if missing:
        return f"the decoder has no {', '.join(missing)}"
    layer = decoder.layers[0]
    attention = getattr(layer, "self_attn", None)
    for owner, names in ((layer, ("input_layernorm", "post_attention_layernorm", "mlp")),
                         (attention, ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim"))):
        if owner is None or any(not hasattr(owner, name) for name in names):
            return f"unexpected decoder layer layout ({type(layer).__name__})"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaFamilyDecoder:
    """Prefill and single-token decode of a supported causal LM (see `unsupported_reason`) on a StaticKVCache."""

    def __init__(self, model: torch.nn.Module) -> None:
        causal_lm = _causal_lm_of(model)
        decoder = decoder_of(model)
        config = causal_lm.config
        self.embed = decoder.embed_tokens
        self.layers = list(decoder.layers)
        self.final_norm = decoder.norm
        self.rotary = decoder.rotary_emb
        self.lm_head = causal_lm.get_output_embeddings()
        attention = self.layers[0].self_attn
        self.head_dim = int(attention.head_dim)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.group = self.num_heads // self.num_kv_heads
        self.scaling = float(attention.scaling)
        self.has_qk_norm = hasattr(attention, "q_norm") and hasattr(attention, "k_norm")
        self.embed_scale = float(config.hidden_size) ** 0.5 if config.model_type == "gemma" else None
        self.vocab_size = int(self.embed.num_embeddings)

    def new_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> StaticKVCache:
        return StaticKVCache(len(self.layers), batch, length, self.num_kv_heads, self.head_dim, dtype, device)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        if self.embed_scale is not None:  # Gemma scales its embeddings by sqrt(hidden) in the model's dtype
            hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        return hidden

    def _qkv(self, layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (B, H, T, d), k and v (B, Hkv, T, d) with rotary applied, from normed hidden (B, T, hidden)."""
        attention = layer.self_attn
        batch, length = hidden.shape[:2]
        q = attention.q_proj(hidden).view(batch, length, -1, self.head_dim)
        k = attention.k_proj(hidden).view(batch, length, -1, self.head_dim)
        v = attention.v_proj(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
        if self.has_qk_norm:
            q, k = attention.q_norm(q), attention.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def _finish_layer(self, layer, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """o_proj of the attention output (B, T, H*d), residual adds, the MLP block."""
        hidden = residual + layer.self_attn.o_proj(attended)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """(B, V) logits in the model's dtype from the final-normed last hidden state (B, hidden)."""
        return self.lm_head(last_hidden)

    def prefill(
        self, input_ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, cache: StaticKVCache, row0: int
    ) -> torch.Tensor:
        """Runs the left-padded prompts (B, W) and writes cache rows [row0, row0 + B), slots [0, W).

        positions: (B, W) rotary positions; valid: (B, W) bool, False at left padding. Returns the final-normed
        hidden state of the last column (B, hidden).
        """
        batch, width = input_ids.shape
        rows = slice(row0, row0 + batch)
        causal = torch.ones(width, width, dtype=torch.bool, device=input_ids.device).tril()
        # Padding queries attend to themselves only, so no row of the mask is empty (an empty row gives NaN).
        mask = (causal & valid[:, None, None, :]) | torch.eye(width, dtype=torch.bool, device=input_ids.device)
        hidden = self._embed(input_ids)
        cos, sin = self.rotary(hidden, positions)
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(hidden), cos, sin)
            cache.keys[index][rows, :, :width] = k
            cache.values[index][rows, :, :width] = v
            if self.group > 1:
                k = k.repeat_interleave(self.group, dim=1)
                v = v.repeat_interleave(self.group, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
            hidden = self._finish_layer(layer, hidden, out.transpose(1, 2).reshape(batch, width, -1))
        cache.valid[rows, :width] = valid
        return self.final_norm(hidden[:, -1])

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, cache: StaticKVCache, kv_len: int
    ) -> torch.Tensor:
        """One token per row: tokens (B,) at rotary positions (B,), written to cache slot `slot` ((1,) long on the
        device, < kv_len) of rows [0, B); attends over slots [0, kv_len). Returns the final-normed hidden (B, hidden)."""
        batch = tokens.shape[0]
        cache.valid[:batch].index_fill_(1, slot, True)
        mask = cache.valid[:batch, None, None, :kv_len]
        hidden = self._embed(tokens[:, None])
        cos, sin = self.rotary(hidden, positions[:, None])
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(hidden), cos, sin)
            keys, values = cache.keys[index][:batch], cache.values[index][:batch]
            keys.index_copy_(2, slot, k)
            values.index_copy_(2, slot, v)
            grouped_q = q.view(batch, self.num_kv_heads, self.group, self.head_dim)
            out = F.scaled_dot_product_attention(
                grouped_q, keys[:, :, :kv_len], values[:, :, :kv_len], attn_mask=mask, scale=self.scaling
            )
            hidden = self._finish_layer(layer, hidden, out.reshape(batch, 1, -1))
        return self.final_norm(hidden[:, -1])
