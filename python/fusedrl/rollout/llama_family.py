"""The forward pass of Llama-family decoders (Llama, Mistral, Qwen2/2.5, Qwen3) over a static KV cache.

It calls the training model's own modules (embeddings, norms, q/k/v/o projections, MLP, lm-head; peft LoRA
layers wrap the projections and apply their adapters live; a quantized layer is any module whose forward maps
(..., in) to (..., out)), and re-does only the glue transformers does between them: rotary embedding (with the
model's own rotary module, so rope scaling is the model's), the cache write, and attention with SDPA. Fewer kernels per step than transformers' modules, same math: plain
RMSNorms as one F.rms_norm, rotary as one addcmul, a peft LoRA Linear as base + one addmm (`_linear`), one additive
mask per step. Gemma (embedding scale, its own norms) is not supported yet and falls back.
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

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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


_PLAIN_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def _rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = roll(x, d/2) * [-sin_1, sin_2]: 3 kernels."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm; the plain (weight * x / rms) kinds as one fused F.rms_norm (bf16 rounding differs only
    in where the weight multiply rounds)."""
    if type(module).__name__ in _PLAIN_RMS_NORMS:
        return F.rms_norm(x, module.weight.shape, module.weight, eps=module.variance_epsilon)
    return module(x)


def _linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x); a peft LoRA Linear with one plain active adapter as base(x) + scaling * (x A^T) B^T with the B
    product, the scaling and the add fused in one addmm. As in peft, x is cast to the adapter's dtype (peft keeps
    adapters in float32 over a bf16 base) and the sum is rounded once to the base output's dtype. The base layer is
    called as a module, so a quantized base layer (any module) works."""
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if getattr(module, "fuses_lora", False):  # e.g. NF4 LoRA: one fused op (small-M path) beats base + addmm
        return module(x)
    if lora_a is None or module.disable_adapters or module.merged or module.training:
        return module(x)
    active = [name for name in module.active_adapters if name in lora_a]
    if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
        return module(x)
    a, b = lora_a[active[0]], lora_b[active[0]]
    if a.bias is not None or b.bias is not None or a.weight.dtype != b.weight.dtype:
        return module(x)
    base = module.base_layer(x)
    low_rank = F.linear(x.to(a.weight.dtype), a.weight)
    flat = torch.addmm(base.reshape(-1, base.shape[-1]).to(low_rank.dtype), low_rank.reshape(-1, low_rank.shape[-1]),
                       b.weight.t(), alpha=module.scaling[active[0]])
    return flat.to(base.dtype).view(base.shape)


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
        self.vocab_size = int(self.embed.num_embeddings)

    def new_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> StaticKVCache:
        return StaticKVCache(len(self.layers), batch, length, self.num_kv_heads, self.head_dim, dtype, device)

    def _rotary_tables(self, hidden: torch.Tensor, positions: torch.Tensor):
        """cos and signed sin (B, 1, T, d) from the model's own rotary module (its rope scaling included)."""
        cos, sin = self.rotary(hidden, positions)
        return cos.unsqueeze(1), _signed_sin(sin).unsqueeze(1)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)

    def _qkv(self, layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (B, H, T, d), k and v (B, Hkv, T, d) with rotary applied, from normed hidden (B, T, hidden)."""
        attention = layer.self_attn
        batch, length = hidden.shape[:2]
        q = _linear(attention.q_proj, hidden).view(batch, length, -1, self.head_dim)
        k = _linear(attention.k_proj, hidden).view(batch, length, -1, self.head_dim)
        v = _linear(attention.v_proj, hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
        if self.has_qk_norm:
            q, k = _norm(attention.q_norm, q), _norm(attention.k_norm, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        return _rotary(q, cos, sin), _rotary(k, cos, sin), v

    def _finish_layer(self, layer, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """o_proj of the attention output (B, T, H*d), residual adds, the MLP block."""
        hidden = residual + _linear(layer.self_attn.o_proj, attended)
        normed = _norm(layer.post_attention_layernorm, hidden)
        mlp = layer.mlp
        if all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            gated = mlp.act_fn(_linear(mlp.gate_proj, normed)) * _linear(mlp.up_proj, normed)
            return hidden + _linear(mlp.down_proj, gated)
        return hidden + mlp(normed)

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
        cos, sin = self._rotary_tables(hidden, positions)
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, _norm(layer.input_layernorm, hidden), cos, sin)
            cache.keys[index][rows, :, :width] = k
            cache.values[index][rows, :, :width] = v
            if self.group > 1:
                k = k.repeat_interleave(self.group, dim=1)
                v = v.repeat_interleave(self.group, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
            hidden = self._finish_layer(layer, hidden, out.transpose(1, 2).reshape(batch, width, -1))
        cache.valid[rows, :width] = valid
        return _norm(self.final_norm, hidden[:, -1])

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, cache: StaticKVCache, kv_len: int
    ) -> torch.Tensor:
        """One token per row: tokens (B,) at rotary positions (B,), written to cache slot `slot` ((1,) long on the
        device, < kv_len) of rows [0, B); attends over slots [0, kv_len). Returns the final-normed hidden (B, hidden)."""
        batch = tokens.shape[0]
        cache.valid[:batch].index_fill_(1, slot, True)
        hidden = self._embed(tokens[:, None])
        # One additive mask per step in the model's dtype (SDPA would convert a bool mask in every layer).
        mask = torch.zeros((batch, 1, 1, kv_len), dtype=hidden.dtype, device=hidden.device)
        mask.masked_fill_(~cache.valid[:batch, None, None, :kv_len], float("-inf"))
        cos, sin = self._rotary_tables(hidden, positions[:, None])
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, _norm(layer.input_layernorm, hidden), cos, sin)
            keys, values = cache.keys[index][:batch], cache.values[index][:batch]
            keys.index_copy_(2, slot, k)
            values.index_copy_(2, slot, v)
            grouped_q = q.view(batch, self.num_kv_heads, self.group, self.head_dim)
            out = F.scaled_dot_product_attention(
                grouped_q, keys[:, :, :kv_len], values[:, :, :kv_len], attn_mask=mask, scale=self.scaling
            )
            hidden = self._finish_layer(layer, hidden, out.reshape(batch, 1, -1))
        return _norm(self.final_norm, hidden[:, -1])
