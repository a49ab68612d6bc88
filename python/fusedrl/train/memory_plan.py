"""Memory plan of one GRPO micro-batch step: the peak GPU memory estimated from the model's shape, the batch and the
context, before anything runs; the checkpointing mode (plain / offloaded) and MLP chunk size that fit.

Terms (N = batch x sequence tokens of one micro-batch, d = bytes of the compute dtype, H hidden, I MLP width,
K = key/value width, Q = query width (heads x head_dim: H on Llama, 1.6 H on Qwen3-4B), L layers; U = N*H*d, one
layer input; QW = N*Q*d; KV = N*K*d):
  weights          every parameter and buffer as stored;
  optimizer        per trainable parameter: its gradient (own dtype) + AdamW's two fp32 moments;
  checkpoints      one layer input per layer, U each: L of them on the device without offload; with offload the
                   last layer's plus the two device slots (3);
  layer working    the peak inside one layer's recompute + backward.
                   Unchunked (transformers' checkpointing, or fusedrl's without chunks), fitted to measured peaks:
                   N*d*(H + 2Q + 4K + 6I) for attention's saved tensors, the MLP's (its input, the four saved (N, I)
                   tensors, three of their gradients in flight) and 3U of gradients in flight (+ the float32 inputs
                   of per-head q/k norms, N*d*(2Q + 2K)); with transformers' checkpointing also the copy of its
                   input that each LoRA projection over a 16-bit base keeps under autocast (peft casts the input to
                   its float32 adapters, autocast casts it back for the matmul and that copy is saved): N*d times the
                   summed input widths of a layer's LoRA projections, 5H + Q + I with LoRA on every Llama linear,
                   none for 4-bit layers (fusedrl's NF4, bitsandbytes') and none under fusedrl's checkpointing,
                   which switches that no-op cast off.
                   Chunked by c tokens (fusedrl.nn.offload: MLP and norms chunked, the MLP's output deferred in the
                   recompute, no LoRA input copies): the larger of two phases —
                     attention backward: kept x_norm (U), rotated q, attention output (2QW) and rotated k, v (2KV);
                     in flight the layer's output gradient and the residual's (2U), the attention output's gradient
                     and dq (2QW), flash attention's float32 dq accumulator (2QW), dk, dv (2KV) and, with grouped
                     KV heads, dk, dv expanded to every head (2QW): 3U + 8QW + 4KV (- 2QW without grouping), plus
                     with per-head q/k norms (Qwen3) the q/k projections' outputs their chunked norms keep (QW + KV);
                     MLP backward: the kept attention tensors and the two residual-stream ones (3U + 2QW + 2KV, + QW
                     + KV with head norms), the output and input gradients (2U) and one chunk's MLP tensors c*d*7I;
  loss             the final-norm input and output, the completion hidden states' contiguous copy and the fused
                   op's (N, H) gradient direction: 4U, plus one chunk of float32 logits (256 MiB, or N x vocab when
                   smaller); with transformers' own checkpointing also the two float32 (N, H) copies its RMSNorm
                   saves (fusedrl's checkpointing chunks the final norm instead);
  engine           the rollout engine's KV cache when it is not freed during training (passed in);
  overhead         5% for allocator rounding and fragmentation.
peak = weights + optimizer + engine + checkpoints + max(layer working, loss), times the overhead factor.
The estimate is checked against measured peaks (tests/train/test_memory_plan.py on CUDA, bench/bench_step.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fusedrl.ops.offload import arena_bytes

GiB = float(2**30)
LOGITS_CHUNK_BYTES = 256 << 20  # the fused loss's chunk of logits on CUDA
OVERHEAD = 1.05
HEAD_NORM_SUFFIXES = ("self_attn.q_norm", "self_attn.k_norm")  # Qwen3's per-head RMSNorms
# Tried in this order (cheapest first) when the user has not chosen: (offload, mlp chunk tokens or None).
CANDIDATES = ((False, None), (False, 8192), (True, 8192), (True, 4096), (True, 2048), (True, 1024))


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a decoder LM."""

    hidden: int
    intermediate: int
    layers: int
    kv_width: int  # num_key_value_heads * head_dim
    weight_bytes: int
    trainable_params: int
    trainable_bytes: int
    compute_bytes: int = 2  # bytes per activation element (bf16/fp16: 2, fp32: 4)
    vocab: int = 0  # output vocabulary (0: unknown, the loss's logits chunk is taken at its full size)
    query_width: int = 0  # num_attention_heads * head_dim (0: the hidden size)
    head_norms: bool = False  # per-head RMSNorms on q and k inside attention (Qwen3's q_norm / k_norm)
    lora_input_copy_width: int = 0  # per layer: summed input widths of the LoRA projections that copy their input

    @classmethod
    def of(cls, model: torch.nn.Module, compute_dtype: torch.dtype | None = None) -> ModelShape:
        from fusedrl.model.hidden import _causal_lm_of

        config = _causal_lm_of(model).config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        params = list(model.parameters())
        trainable = [p for p in params if p.requires_grad]
        weight_bytes = sum(p.numel() * p.element_size() for p in params)
        weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
        dtype = compute_dtype or next(p.dtype for p in params if p.is_floating_point())
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            kv_width=kv_heads * head_dim,
            weight_bytes=weight_bytes,
            trainable_params=sum(p.numel() for p in trainable),
            trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
            compute_bytes=torch.empty(0, dtype=dtype).element_size(),
            vocab=int(getattr(config, "vocab_size", 0) or 0),
            query_width=heads * head_dim,
            head_norms=any(name.endswith(HEAD_NORM_SUFFIXES) for name, _ in model.named_modules()),
            lora_input_copy_width=_lora_input_copy_width(model, dtype) // max(config.num_hidden_layers, 1),
        )


def _lora_input_copy_width(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Summed input widths of the model's peft LoRA linears over a 16-bit base whose adapters are in another dtype
    than the compute dtype: peft's `lora.Linear` casts each input to the adapters' dtype and autocast casts it back,
    and that copy is what the adapter's matmul saves. (peft's bitsandbytes layers skip the cast under autocast;
    fusedrl's NF4 layers never cast.)"""
    width = 0
    for module in model.modules():
        if type(module).__name__ != "Linear" or type(module).__module__ != "peft.tuners.lora.layer":
            continue
        base = getattr(module, "base_layer", None)
        adapters = [a.weight for a in getattr(module, "lora_A", {}).values() if hasattr(a, "weight")]
        if (isinstance(base, torch.nn.Linear) and base.weight.is_floating_point() and base.weight.element_size() == 2
                and getattr(module, "cast_input_dtype_enabled", True) and any(a.dtype != compute_dtype
                                                                              for a in adapters)):
            width += base.in_features
    return width


@dataclass
class MemoryPlan:
    """The estimate of one configuration, term by term (bytes)."""

    tokens: int
    offload: bool
    mlp_chunk_tokens: int | None
    terms: dict[str, int] = field(default_factory=dict)
    pinned_host_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        t = self.terms
        resident = t["weights"] + t["optimizer"] + t["engine"] + t["checkpoints"]
        return int(OVERHEAD * (resident + max(t["layer_working"], t["loss"])))

    def fits(self, budget_bytes: int, host_budget_bytes: int | None = None) -> bool:
        """The peak fits `budget_bytes` and the pinned arena `host_budget_bytes` (None: no host limit)."""
        host_ok = host_budget_bytes is None or self.pinned_host_bytes <= host_budget_bytes
        return self.peak_bytes <= budget_bytes and host_ok

    def describe(self, free_bytes: int | None = None) -> str:
        mode = "offloaded checkpoints" if self.offload else "checkpoints on the GPU"
        chunk = f"MLP chunks of {self.mlp_chunk_tokens} tokens" if self.mlp_chunk_tokens else "unchunked MLP"
        terms = ", ".join(f"{name} {value / GiB:.2f}" for name, value in self.terms.items())
        text = (f"memory plan: {self.tokens} tokens per micro-batch, {mode}, {chunk}: "
                f"peak ~{self.peak_bytes / GiB:.1f} GiB")
        if free_bytes is not None:
            text += f" of {free_bytes / GiB:.1f} GiB free"
        if self.pinned_host_bytes:
            text += f", {self.pinned_host_bytes / GiB:.1f} GiB pinned host"
        return f"{text} ({terms} GiB)"


def estimate(shape: ModelShape, batch: int, sequence: int, *, offload: bool, mlp_chunk_tokens: int | None,
             engine_bytes: int = 0) -> MemoryPlan:
    """The plan of one micro-batch of `batch` sequences of `sequence` tokens (prompt + completion)."""
    for name, value in (("batch", batch), ("sequence", sequence)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if mlp_chunk_tokens is not None and (not isinstance(mlp_chunk_tokens, int) or mlp_chunk_tokens < 1):
        raise ValueError(f"mlp_chunk_tokens must be None or an int >= 1, got {mlp_chunk_tokens!r}")
    n, d, h, i, k = batch * sequence, shape.compute_bytes, shape.hidden, shape.intermediate, shape.kv_width
    q = shape.query_width or h
    layer_input, query, kv = n * h * d, n * q * d, n * k * d
    on_device = min(3, shape.layers) if offload else shape.layers
    if mlp_chunk_tokens is None or mlp_chunk_tokens >= n:
        head_norms = n * d * (2 * q + 2 * k) if shape.head_norms else 0
        fusedrl_checkpointing = offload or mlp_chunk_tokens is not None  # it switches peft's input cast off
        lora_copies = 0 if fusedrl_checkpointing else n * d * shape.lora_input_copy_width
        layer_working = n * d * (h + 2 * q + 4 * k + 6 * i) + head_norms + lora_copies
    else:
        head_norm_inputs = query + kv if shape.head_norms else 0
        grouped = 2 * query if k < q else 0
        attention_backward = 3 * layer_input + 6 * query + 4 * kv + grouped + head_norm_inputs
        mlp_backward = 5 * layer_input + 2 * query + 2 * kv + head_norm_inputs + mlp_chunk_tokens * d * 7 * i
        layer_working = max(attention_backward, mlp_backward)
    logits = LOGITS_CHUNK_BYTES if not shape.vocab else min(LOGITS_CHUNK_BYTES, n * shape.vocab * 4)
    terms = {
        "weights": shape.weight_bytes,
        "optimizer": shape.trainable_bytes + 8 * shape.trainable_params,
        "engine": engine_bytes,
        "checkpoints": on_device * layer_input,
        "layer_working": layer_working,
        "loss": 4 * layer_input + logits + (0 if offload or mlp_chunk_tokens else 8 * n * h),
    }
    pinned = (shape.layers - 1) * arena_bytes(layer_input) if offload else 0
    return MemoryPlan(tokens=n, offload=offload, mlp_chunk_tokens=mlp_chunk_tokens, terms=terms,
                      pinned_host_bytes=pinned)


def choose(shape: ModelShape, batch: int, sequence: int, budget_bytes: int, *, offload: bool | None = None,
           mlp_chunk_tokens: int | None = None, engine_bytes: int = 0, chunk_given: bool = False,
           host_budget_bytes: int | None = None) -> MemoryPlan:
    """The cheapest configuration whose estimated peak fits `budget_bytes` (and whose pinned host arena fits
    `host_budget_bytes`, when given), among those the user left open (`offload` None = either; `chunk_given` = keep
    `mlp_chunk_tokens` as given). Raises MemoryError saying what would fit when none does."""
    candidates = [(o, c) for o, c in CANDIDATES if offload is None or o == offload]
    if chunk_given:
        candidates = list(dict.fromkeys((o, mlp_chunk_tokens) for o, _ in candidates))
    plans = [estimate(shape, batch, sequence, offload=o, mlp_chunk_tokens=c, engine_bytes=engine_bytes)
             for o, c in candidates]
    for plan in plans:
        if plan.fits(budget_bytes, host_budget_bytes):
            return plan
    best = min(plans, key=lambda p: p.peak_bytes)
    longest = longest_sequence(shape, batch, budget_bytes, offload=best.offload,
                               mlp_chunk_tokens=best.mlp_chunk_tokens, engine_bytes=engine_bytes)
    if best.peak_bytes <= budget_bytes:  # the GPU would hold it; the host cannot pin the offloaded inputs
        raise MemoryError(
            f"this step does not fit: {best.describe(budget_bytes)}, but only {host_budget_bytes / GiB:.1f} GiB of "
            "host memory is available to pin; shorten the sequences or free host memory"
        )
    fits = (f"at most {longest} tokens per sequence fit with this setting" if longest
            else "not even 1 token per sequence fits: the weights and optimizer state alone exceed it")
    raise MemoryError(
        f"this step does not fit: {best.describe(budget_bytes)}. With {batch} sequences per micro-batch {fits}; "
        "lower max_completion_length / max_prompt_length or per_device_train_batch_size, or raise "
        "gradient_accumulation_steps"
    )


def available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def longest_sequence(shape: ModelShape, batch: int, budget_bytes: int, *, offload: bool,
                     mlp_chunk_tokens: int | None, engine_bytes: int = 0, host_budget_bytes: int | None = None) -> int:
    """The longest sequence (tokens) whose estimated peak fits the budget (and whose pinned arena fits
    `host_budget_bytes`, when given); 0 when none does (bisection)."""
    def fits(sequence: int) -> bool:
        plan = estimate(shape, batch, sequence, offload=offload, mlp_chunk_tokens=mlp_chunk_tokens,
                        engine_bytes=engine_bytes)
        return plan.fits(budget_bytes, host_budget_bytes)

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high) and high < 1 << 24:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
