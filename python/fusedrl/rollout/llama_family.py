"""The forward pass of Llama-family decoders (Llama, Mistral, Qwen2/2.5, Qwen3) over a static KV cache.

It runs the training model's own weights (embeddings, norms, q/k/v/o projections, MLP, lm-head; peft LoRA adapters
applied live, unmerged) and re-does only the glue transformers does between them, in fewer kernels, same math:
plain RMSNorms as one F.rms_norm; projections that share an input as one `ProjectionGroup` (base GEMMs with the
residual add in their epilogue, one GEMM for the LoRA A side of q/k/v and of gate/up); rotary from the model's own
rotary module (its rope scaling included). A module the groups cannot fuse (a quantized base layer, DoRA, ...)
runs as-is. Gemma (embedding scale, its own norms) is not supported yet and falls back.
- prefill: prompts of one length at a time (no padding inside a forward, so SDPA runs its causal flash kernel with
  no mask); keys/values are written right-aligned to cache slots [W - len, W) of the rows that share the prompt
  (a GRPO group's identical prompts are run once);
- decode, attention "fused" (csrc/kernels/decode_attention.h): one kernel applies rope (and Qwen3's q/k norms) and
  writes the new key/value to slot `slot` (a device tensor, so a CUDA graph replays every position), a split-KV
  kernel attends over each row's slots [start, slot] reading every key/value once for all query heads of its kv
  head; attention "sdpa": rope in torch, SDPA over the first `kv_len` slots with an additive padding mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedrl.model.hidden import _causal_lm_of, decoder_of
from fusedrl.rollout.projections import ProjectionGroup
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


class _LayerGroups:
    """The projection groups of one decoder layer."""

    def __init__(self, layer: torch.nn.Module) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.qkv = ProjectionGroup([attention.q_proj, attention.k_proj, attention.v_proj], _linear)
        self.o = ProjectionGroup([attention.o_proj], _linear)
        self.gated = all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        self.gate_up = ProjectionGroup([mlp.gate_proj, mlp.up_proj], _linear) if self.gated else None
        self.down = ProjectionGroup([mlp.down_proj], _linear) if self.gated else None

    def all(self) -> list[ProjectionGroup]:
        return [g for g in (self.qkv, self.o, self.gate_up, self.down) if g is not None]

    def refresh(self) -> bool:
        return any([g.refresh() for g in self.all()])  # a list: every group refreshes


def fused_attention_reason(decoder: "LlamaFamilyDecoder", device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the fused decode-attention kernels cannot run this decoder (None: they can)."""
    try:
        from fusedrl.ops.decode_attention import decode_attention_supported
    except ImportError as err:
        return f"fusedrl's compiled ops are missing ({err})"
    if not decode_attention_supported(device, dtype, decoder.head_dim, decoder.group):
        return f"no kernel for head_dim {decoder.head_dim}, {decoder.group} query heads per kv head, {dtype} on {device}"
    if decoder.has_qk_norm and decoder.qk_norms is None:
        return "the q/k norms are not plain RMSNorms"
    if decoder.rotary_dim != decoder.head_dim:
        return f"partial rotary ({decoder.rotary_dim} of {decoder.head_dim} dimensions)"
    return None


class LlamaFamilyDecoder:
    """Prefill and single-token decode of a supported causal LM (see `unsupported_reason`) on a StaticKVCache.

    Call `refresh()` before a generation call: it copies the current LoRA adapters into the projection groups'
    buffers and returns True when those buffers were re-allocated (graphs that read them must be re-captured)."""

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
        self.rotary_dim = int(self.head_dim * float(getattr(config, "partial_rotary_factor", None) or 1.0))
        self.qk_norms = None  # per layer (q weight, k weight, eps) when every q/k norm is a plain RMSNorm
        if self.has_qk_norm:
            norms = [(layer.self_attn.q_norm, layer.self_attn.k_norm) for layer in self.layers]
            if all(type(n).__name__ in _PLAIN_RMS_NORMS for pair in norms for n in pair):
                self.qk_norms = [(q.weight, k.weight, float(q.variance_epsilon)) for q, k in norms]
        self.vocab_size = int(self.embed.num_embeddings)
        self.groups = [_LayerGroups(layer) for layer in self.layers]
        self.fused_attention = False  # set by the loop after `fused_attention_reason` said None

    def refresh(self) -> bool:
        return any([groups.refresh() for groups in self.groups])

    def release(self) -> None:
        """Frees the projection groups' adapter copies (`refresh` re-allocates them)."""
        for groups in self.groups:
            for group in groups.all():
                group.release()

    def _norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's RMSNorm: fusedrl's one-kernel rms_norm op on CUDA with the fused kernels (transformers'
        roundings), else `_norm`."""
        if (self.fused_attention and x.is_cuda and type(module).__name__ in _PLAIN_RMS_NORMS
                and module.weight.dtype == x.dtype):
            from fusedrl.ops.decode_attention import rms_norm

            return rms_norm(x, module.weight, module.variance_epsilon)
        return _norm(module, x)

    def new_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> StaticKVCache:
        return StaticKVCache(len(self.layers), batch, length, self.num_kv_heads, self.head_dim, dtype, device)

    def _rotary_tables(self, hidden: torch.Tensor, positions: torch.Tensor):
        """cos and signed sin (B, 1, T, d) from the model's own rotary module (its rope scaling included)."""
        cos, sin = self.rotary(hidden, positions)
        return cos.unsqueeze(1), _signed_sin(sin).unsqueeze(1)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)

    def _projections(self, index: int, hidden: torch.Tensor):
        """q (B, T, H, d), k and v (B, T, Hkv, d) before rotary, from the layer input hidden (B, T, hidden)."""
        layer = self.layers[index]
        batch, length = hidden.shape[:2]
        q, k, v = self.groups[index].qkv(self._norm(layer.input_layernorm, hidden))
        return (q.view(batch, length, -1, self.head_dim), k.view(batch, length, -1, self.head_dim),
                v.view(batch, length, -1, self.head_dim))

    def _qkv(self, index: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (B, H, T, d), k and v (B, Hkv, T, d) with rotary applied (torch ops)."""
        q, k, v = self._projections(index, hidden)
        if self.has_qk_norm:
            attention = self.layers[index].self_attn
            q, k = _norm(attention.q_norm, q), _norm(attention.k_norm, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        return _rotary(q, cos, sin), _rotary(k, cos, sin), v.transpose(1, 2)

    def _finish_layer(self, index: int, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """o_proj of the attention output (B, T, H*d) plus the residual, then the MLP block plus its residual."""
        layer, groups = self.layers[index], self.groups[index]
        hidden = groups.o(attended, residual=residual)[0]
        normed = self._norm(layer.post_attention_layernorm, hidden)
        if groups.gated:
            gate, up = groups.gate_up(normed)
            return groups.down(layer.mlp.act_fn(gate) * up, residual=hidden)[0]
        return hidden + layer.mlp(normed)

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """(B, V) logits in the model's dtype from the final-normed last hidden state (B, hidden)."""
        return self.lm_head(last_hidden)

    def prefill(self, input_ids: torch.Tensor, cache: StaticKVCache, rows: list[int], source: list[int],
                first_slot: int) -> torch.Tensor:
        """Runs n unpadded prompts of one length (n, T) and writes their keys/values to cache slots
        [first_slot, first_slot + T) of cache rows `rows`, row rows[i] taking prompt source[i].
        Returns the final-normed hidden state of each prompt's last token (n, hidden)."""
        count, length = input_ids.shape
        device = input_ids.device
        positions = torch.arange(length, device=device).expand(count, length)
        slots = slice(first_slot, first_slot + length)
        if source == list(range(count)) and rows == list(range(rows[0], rows[0] + count)):
            row_index, source_index = slice(rows[0], rows[0] + count), None  # plain slices, no gather
        else:
            row_index = torch.tensor(rows, device=device)
            source_index = torch.tensor(source, device=device)
        hidden = self._embed(input_ids)
        cos, sin = self._rotary_tables(hidden, positions)
        for index in range(len(self.layers)):
            q, k, v = self._qkv(index, hidden, cos, sin)
            for store, value in ((cache.keys[index], k), (cache.values[index], v)):
                store[row_index, :, slots] = value if source_index is None else value.index_select(0, source_index)
            if self.group > 1:
                k = k.repeat_interleave(self.group, dim=1)
                v = v.repeat_interleave(self.group, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
            hidden = self._finish_layer(index, hidden, out.transpose(1, 2).reshape(count, length, -1))
        return self._norm(self.final_norm, hidden[:, -1])

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, cache: StaticKVCache, kv_len: int
    ) -> torch.Tensor:
        """One token per row: tokens (B,) at rotary positions (B,), written to cache slot `slot` ((1,) long on the
        device, < kv_len) of rows [0, B); attends over slots [0, kv_len) (SDPA) or [start, slot] (fused).
        Returns the final-normed hidden (B, hidden)."""
        if self.fused_attention:
            return self._decode_fused(tokens, positions, slot, cache)
        batch = tokens.shape[0]
        cache.valid[:batch].index_fill_(1, slot, True)
        hidden = self._embed(tokens[:, None])
        # One additive mask per step in the model's dtype (SDPA would convert a bool mask in every layer).
        mask = torch.zeros((batch, 1, 1, kv_len), dtype=hidden.dtype, device=hidden.device)
        mask.masked_fill_(~cache.valid[:batch, None, None, :kv_len], float("-inf"))
        cos, sin = self._rotary_tables(hidden, positions[:, None])
        for index in range(len(self.layers)):
            q, k, v = self._qkv(index, hidden, cos, sin)
            keys, values = cache.keys[index][:batch], cache.values[index][:batch]
            keys.index_copy_(2, slot, k)
            values.index_copy_(2, slot, v)
            grouped_q = q.view(batch, self.num_kv_heads, self.group, self.head_dim)
            out = F.scaled_dot_product_attention(
                grouped_q, keys[:, :, :kv_len], values[:, :, :kv_len], attn_mask=mask, scale=self.scaling
            )
            hidden = self._finish_layer(index, hidden, out.reshape(batch, 1, -1))
        return self._norm(self.final_norm, hidden[:, -1])

    def _decode_fused(self, tokens, positions, slot, cache: StaticKVCache) -> torch.Tensor:
        from fusedrl.ops.decode_attention import decode_attention, rotary_cache_write

        batch = tokens.shape[0]
        hidden = self._embed(tokens[:, None])
        cos, sin = self.rotary(hidden, positions[:, None])
        cos, sin = cos.reshape(batch, -1).contiguous(), sin.reshape(batch, -1).contiguous()
        for index in range(len(self.layers)):
            q, k, v = self._projections(index, hidden)
            q_norm, k_norm, eps = self.qk_norms[index] if self.qk_norms is not None else (None, None, 1e-6)
            keys, values = cache.keys[index], cache.values[index]
            q = rotary_cache_write(q.reshape(batch, self.num_heads, self.head_dim),
                                   k.reshape(batch, self.num_kv_heads, self.head_dim),
                                   v.reshape(batch, self.num_kv_heads, self.head_dim), cos, sin, keys, values, slot,
                                   q_norm=q_norm, k_norm=k_norm, eps=eps)
            out = decode_attention(q, keys, values, cache.start, slot, self.scaling)
            hidden = self._finish_layer(index, hidden, out.view(batch, 1, -1))
        return self._norm(self.final_norm, hidden[:, -1])
