"""The static decode loop: prefill once, then one fixed-shape decode step per token, replayed from CUDA graphs.

Rows are padded up to a batch bucket (a power of two); the whole step — forward over the cache, sampling, recording
the chosen token and its sampler log-probability, per-row EOS bookkeeping, advancing positions — reads and writes
only the static buffers of `_DecodeState`, so on CUDA it is captured once per (batch bucket, attended length
bucket, sampling settings) and replayed every token. With the fused attention kernels (`attention="fused"`, the
default on CUDA) the attended range [start, slot] is read from device memory, so one graph per batch bucket
serves every position; with SDPA the attended length is the cache prefix up to the current slot, rounded up to
`LENGTH_BUCKET` (one graph per length bucket), so a step reads the keys/values it needs, not the whole cache.
Prompts are prefilled one length at a time, each distinct prompt once (a GRPO group shares one prefill). Finished rows
stay in the batch (their tokens become padding, their log-probabilities 0); the loop stops when every row has
finished (checked every `FINISH_CHECK_EVERY` steps) or after max_new_tokens.

Graphs and the cache live until `release()` (the engine's sleep); the graphs read the model's parameters by
address, so an optimizer step that updates weights or LoRA adapters in place is seen by the next replay, and a
parameter replaced by a new tensor (checked each call) triggers a re-capture.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from fusedrl.rollout.base import SamplingConfig
from fusedrl.rollout.llama_family import LlamaFamilyDecoder, fused_attention_reason, unsupported_reason
from fusedrl.rollout.sampler import sample_step
from fusedrl.rollout.static_cache import StaticKVCache

LENGTH_BUCKET = 128
CACHE_ROUNDING = 256
FINISH_CHECK_EVERY = 8
PREFILL_TOKENS_PER_CHUNK = 8192  # 16384 put the batch-64 peak at 1.12 x (weights + KV) on the H200
ATTENTION_MODES = ("auto", "fused", "sdpa")

logger = logging.getLogger(__name__)


def batch_bucket(count: int, max_batch: int) -> int:
    """The smallest power of two >= count, at most max_batch."""
    return min(max_batch, 1 << max(0, (count - 1).bit_length()))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass
class _DecodeState:
    """The static buffers one decode step reads and writes, for a batch bucket of B rows and cache length L."""

    tokens: torch.Tensor  # (B,) long, the last chosen token
    positions: torch.Tensor  # (B,) long, rotary position of `tokens`
    slot: torch.Tensor  # (1,) long, the cache slot `tokens` is written to
    step: torch.Tensor  # (1,) long, the completion index being sampled
    finished: torch.Tensor  # (B,) bool
    seen: torch.Tensor  # (B, V) bool, tokens present in the row (repetition penalty)
    uniforms: torch.Tensor  # (L, B) float32, one random number per row and step
    out_tokens: torch.Tensor  # (B, L) long
    out_logp: torch.Tensor  # (B, L) float32

    @classmethod
    def allocate(cls, batch: int, length: int, vocab: int, device: torch.device) -> _DecodeState:
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(zeros(batch), zeros(batch), zeros(1), zeros(1), zeros(batch, dtype=torch.bool),
                   zeros(batch, vocab, dtype=torch.bool), zeros(length, batch, dtype=torch.float32),
                   zeros(batch, length), zeros(batch, length, dtype=torch.float32))


class StaticDecodeLoop:
    """Generates from a supported causal LM (see `llama_family.unsupported_reason`) with a static KV cache.

    eos_token_ids / pad_token_id: as the engine defines them. max_batch_size: rows decoded together (larger
    requests run in chunks). use_cuda_graphs: capture and replay the decode step (default: on CUDA devices).
    attention: "fused" (fusedrl's rotary/cache-write and split-KV decode kernels), "sdpa" (torch), or "auto":
    fused on CUDA where the kernels support the model and dtype, else SDPA (one log line says why).
    `stats` holds the last call's timings (prefill_s, capture_s, decode_s, decode_steps, batch_bucket).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        eos_token_ids: list[int],
        pad_token_id: int,
        max_batch_size: int = 512,
        use_cuda_graphs: bool | None = None,
        attention: str = "auto",
    ) -> None:
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be > 0, got {max_batch_size}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
        self.attention = attention
        self.model = model
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = int(pad_token_id)
        self.max_batch_size = max_batch_size
        self.use_cuda_graphs = use_cuda_graphs
        self._decoder: LlamaFamilyDecoder | None = None
        self._cache: StaticKVCache | None = None
        self._cache_shape: tuple[int, int] | None = None  # kept across release() so prepare() can re-allocate
        self._states: dict[int, _DecodeState] = {}
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._param_ptrs: list[int] = []
        self._eos: torch.Tensor | None = None
        self.stats: dict[str, float] = {}

    # ---- support and memory --------------------------------------------------------------------------------------
    def unsupported_reason(self, total_length: int) -> str | None:
        return unsupported_reason(self.model, total_length)

    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    def release(self) -> None:
        """Drops the graphs, the decode buffers, the adapter copies and the KV cache (the sizes are remembered for
        `prepare`)."""
        self._drop_cache()
        if self._decoder is not None:
            self._decoder.release()

    def _drop_cache(self) -> None:
        self._graphs.clear()
        self._states.clear()
        self._cache = None
        self._graph_pool = None

    def prepare(self) -> None:
        """Allocates the KV cache of the last size used, if any (the engine's wake)."""
        if self._cache is None and self._cache_shape is not None:
            self._ensure_cache(*self._cache_shape)

    def _ensure_decoder(self) -> LlamaFamilyDecoder:
        """The decoder over the model's modules, built once, with its attention mode chosen."""
        if self._decoder is None:
            param = self._param()
            self._decoder = LlamaFamilyDecoder(self.model)
            self._choose_attention(param.dtype, param.device)
        return self._decoder

    def _ensure_cache(self, batch: int, length: int) -> StaticKVCache:
        param = self._param()
        self._ensure_decoder()
        if self._cache is None or not self._cache.fits(batch, length, param.dtype, param.device):
            if self._cache is not None:
                batch, length = max(batch, self._cache.batch), max(length, self._cache.length)
            self._drop_cache()
            self._cache = self._decoder.new_cache(batch, length, param.dtype, param.device)
            self._cache_shape = (batch, length)
        return self._cache

    def _choose_attention(self, dtype: torch.dtype, device: torch.device) -> None:
        reason = None if self.attention == "sdpa" else fused_attention_reason(self._decoder, device, dtype)
        if reason is None and self.attention == "auto" and device.type != "cuda":
            reason = "on the CPU the fused ops are plain references (SDPA is faster)"
        if reason is not None:
            (logger.warning if self.attention == "fused" else logger.info)(
                "static decode: attention with SDPA, not the fused kernels: %s", reason)
        self._decoder.fused_attention = reason is None and self.attention != "sdpa"

    def _check_parameters_in_place(self) -> None:
        pointers = [p.data_ptr() for p in self.model.parameters()]
        if pointers != self._param_ptrs:
            self._graphs.clear()
            self._param_ptrs = pointers

    # ---- one step ------------------------------------------------------------------------------------------------
    def _sample_and_record(self, state: _DecodeState, logits: torch.Tensor, sampling: SamplingConfig) -> None:
        uniform = state.uniforms.index_select(0, state.step).squeeze(0)
        token, logp = sample_step(logits, state.seen, uniform, sampling)
        token = token.masked_fill(state.finished, self.pad_token_id)
        logp = logp.masked_fill(state.finished, 0.0)
        state.out_tokens.index_copy_(1, state.step, token[:, None])
        state.out_logp.index_copy_(1, state.step, logp[:, None])
        state.finished |= (token[:, None] == self._eos).any(dim=-1)
        if sampling.repetition_penalty != 1.0:
            state.seen.scatter_(1, token[:, None], True)
        state.tokens.copy_(token)
        state.step.add_(1)

    def _decode_step(self, state: _DecodeState, kv_len: int, sampling: SamplingConfig) -> None:
        hidden = self._decoder.decode(state.tokens, state.positions, state.slot, self._cache, kv_len)
        state.positions.add_(1)
        state.slot.add_(1)
        self._sample_and_record(state, self._decoder.logits(hidden), sampling)

    def _capture(self, state: _DecodeState, batch: int, kv_lens: list[int], sampling: SamplingConfig) -> None:
        """Captures the decode step for each attended length in `kv_lens` not captured yet (state is scratch here)."""
        missing = [n for n in kv_lens if (batch, n, sampling) not in self._graphs]
        if not missing:
            return
        state.slot.zero_()
        state.step.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: cuBLAS handles, lazy inits
            for _ in range(2):
                self._decode_step(state, missing[0], sampling)
        torch.cuda.current_stream().wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        for kv_len in missing:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                self._decode_step(state, kv_len, sampling)
            self._graphs[(batch, kv_len, sampling)] = graph

    def _kv_len(self, slot: int, cache: StaticKVCache) -> int:
        """The attended length a decode step at `slot` is captured for (fused: one graph for every slot)."""
        if self._decoder.fused_attention:
            return cache.length
        return min(_round_up(slot + 1, LENGTH_BUCKET), cache.length)

    # ---- generation ----------------------------------------------------------------------------------------------
    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(completion ids (N, Tc) padded after EOS, sampler logp (N, Tc) float32, 0 after EOS) on the device."""
        self.stats = {"prefill_s": 0.0, "capture_s": 0.0, "decode_s": 0.0, "decode_steps": 0}
        device = self._param().device
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("static decode: every prompt needs at least one token")
        if self._ensure_decoder().refresh():  # the current adapters, copied into the projection groups' buffers
            self._graphs.clear()
        if self._eos is None or self._eos.device != device:  # read by captured graphs: keep one tensor
            self._eos = torch.tensor(self.eos_token_ids, device=device)
        draws = None
        if not sampling.greedy:  # all random numbers of the call, drawn up front from the caller's generator
            gen_device = generator.device if generator is not None else device
            draws = torch.rand((sampling.max_new_tokens, len(prompt_ids)), generator=generator, device=gen_device)
            draws = draws.to(device)
        chunk = batch_bucket(len(prompt_ids), self.max_batch_size)
        ids, logps = [], []
        for start in range(0, len(prompt_ids), chunk):
            rows = prompt_ids[start : start + chunk]
            part = None if draws is None else draws[:, start : start + chunk]
            chunk_ids, chunk_logp = self._generate_chunk(rows, sampling, part, device)
            ids.append(chunk_ids)
            logps.append(chunk_logp)
        width = max(t.shape[1] for t in ids)
        ids = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=self.pad_token_id) for t in ids]
        logps = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in logps]
        return torch.cat(ids), torch.cat(logps)

    def _prefill(self, prompts: list[list[int]], width: int, batch: int, cache: StaticKVCache, device) -> torch.Tensor:
        """Prefills every row of `prompts` into cache rows [0, len(prompts)), slots [width - len, width); returns
        the last hidden state of each row of the cache's batch bucket (bucket padding rows zero)."""
        by_length: dict[int, dict[tuple, list[int]]] = {}  # length -> distinct prompt -> its rows
        for row, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt), {}).setdefault(tuple(prompt), []).append(row)
        last_hidden = None
        for length, distinct in sorted(by_length.items()):
            items = list(distinct.items())
            per_forward = max(1, PREFILL_TOKENS_PER_CHUNK // length)
            for first in range(0, len(items), per_forward):
                part = items[first : first + per_forward]
                ids = torch.tensor([list(prompt) for prompt, _ in part], dtype=torch.long, device=device)
                rows = [row for _, part_rows in part for row in part_rows]
                source = [i for i, (_, part_rows) in enumerate(part) for _ in part_rows]
                hidden = self._decoder.prefill(ids, cache, rows, source, width - length)
                if last_hidden is None:
                    last_hidden = hidden.new_zeros(batch, hidden.shape[-1])
                last_hidden[torch.tensor(rows, device=device)] = hidden[torch.tensor(source, device=device)]
        return last_hidden

    def _generate_chunk(self, prompts, sampling: SamplingConfig, draws, device):
        count, max_new = len(prompts), sampling.max_new_tokens
        batch = batch_bucket(count, self.max_batch_size)
        width = max(len(p) for p in prompts)
        cache = self._ensure_cache(batch, _round_up(width + max_new, CACHE_ROUNDING))
        decoder = self._decoder
        use_graphs = device.type == "cuda" if self.use_cuda_graphs is None else self.use_cuda_graphs
        state = self._states.get(batch)
        if state is None:
            state = self._states[batch] = _DecodeState.allocate(batch, cache.length, decoder.vocab_size, device)
        decode_slots = range(width, width + max_new - 1)  # the slot each decode step writes
        kv_lens = sorted({self._kv_len(s, cache) for s in decode_slots})
        sync = device.type == "cuda"
        if use_graphs and kv_lens:
            self._check_parameters_in_place()
            start = time.perf_counter()
            try:
                self._capture(state, batch, kv_lens, sampling)
                torch.cuda.synchronize(device)
            except RuntimeError as err:  # a module that syncs or allocates host memory mid-step cannot be captured
                logger.warning("static decode: capturing the decode step failed (%s); decoding without CUDA graphs "
                               "from now on", str(err).splitlines()[0])
                _complete_a_capture(device)
                self._graphs.clear()
                self.use_cuda_graphs = use_graphs = False
            self.stats["capture_s"] += time.perf_counter() - start

        # Left-padded prompts, as transformers' generate lays them out (rotary positions skip the padding).
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        valid = torch.arange(width)[None, :] >= (width - lengths)[:, None]
        input_ids = torch.full((count, width), self.pad_token_id, dtype=torch.long)
        input_ids[valid] = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
        input_ids, valid = input_ids.to(device), valid.to(device)

        cache.valid.zero_()
        cache.valid[:count, :width] = valid
        cache.start.fill_(width)  # rows past `count` (bucket padding) attend to their own decode slots only
        cache.start[:count] = (width - lengths).to(device=device, dtype=torch.int32)
        state.finished.fill_(True)
        state.finished[:count] = False
        state.seen.zero_()
        if sampling.repetition_penalty != 1.0:
            # Padding columns point at the row's last (real) token, so they add nothing to `seen`.
            state.seen[:count].scatter_(1, input_ids.where(valid, input_ids[:, -1:]), True)
        state.uniforms.zero_()
        if draws is not None:
            state.uniforms[:max_new, :count] = draws
        state.positions.zero_()
        state.positions[:count] = lengths.to(device)
        state.slot.fill_(width)
        state.step.zero_()
        state.out_tokens.fill_(self.pad_token_id)
        state.out_logp.zero_()

        start = time.perf_counter()
        last_hidden = self._prefill(prompts, width, batch, cache, device)
        self._sample_and_record(state, decoder.logits(last_hidden), sampling)
        if sync:
            torch.cuda.synchronize(device)
        self.stats["prefill_s"] += time.perf_counter() - start

        start = time.perf_counter()
        steps = 1
        for slot in decode_slots:
            if (steps % FINISH_CHECK_EVERY == 0 or not sync) and bool(state.finished.all()):
                break
            kv_len = self._kv_len(slot, cache)
            if use_graphs:
                self._graphs[(batch, kv_len, sampling)].replay()
            else:
                self._decode_step(state, kv_len, sampling)
            steps += 1
        if sync:
            torch.cuda.synchronize(device)
        self.stats["decode_s"] += time.perf_counter() - start
        self.stats["decode_steps"] += steps - 1
        self.stats["batch_bucket"] = batch

        tokens, logp = state.out_tokens[:count, :steps], state.out_logp[:count, :steps]
        is_eos = (tokens[..., None] == self._eos).any(dim=-1)
        ends = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, steps)
        length = int(ends.max())
        return tokens[:, :length].clone(), logp[:, :length].clone()


def _complete_a_capture(device: torch.device) -> None:
    """After a failed capture torch (2.11) leaves the device's default generator marked as capturing: the capture's
    end raised before the generator's epilogue ran, and every later random draw on the device (a trainer's dropout,
    `torch.randint`) raises "Offset increment outside graph capture encountered unexpectedly". A capture that
    completes runs that epilogue."""
    try:
        with torch.cuda.device(device):
            scratch = torch.zeros(1, device=device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                scratch.add_(1)
            del graph
    except RuntimeError as err:
        logger.warning("static decode: could not reset the CUDA generator after the failed capture (%s)", err)
