"""The built-in rollout engine: batched sampling from the training model itself.

On CUDA (or with static_decode=True) supported decoders (Llama, Mistral, Qwen2/3, Gemma) run our static-cache
decode loop with CUDA graphs (`static_decode.py`, same outputs and sampler log-probabilities); everything else,
and every model on a CPU by default, runs transformers' `generate` as described below. The static loop draws its
random numbers (one per row and step) directly from the given generator, so its samples are reproducible too but
differ from `generate`'s for the same seed; greedy decoding gives the same tokens.

Prompts are left-padded into one batch; `generate` samples with the KV cache (model in eval mode, so gradient
checkpointing is off), stopping each row at its first EOS. The sampler's log-probability of each chosen token,
log_softmax(raw_logits / temperature), is taken in float32 by a logits processor that runs first in the chain, so
it sees the raw logits before repetition penalty, temperature, top-k, top-p and min-p reshape them; it keeps one
step of log-probabilities at a time (N x V), never the whole (N x Tc x V) history that `output_logits` would hold.

Reproducibility: transformers' sampling draws from the global torch RNG. When a `torch.Generator` is given, a seed
is drawn from it and sampling runs in a forked RNG state seeded with it, so the same generator state gives the same
completions and the global RNG is left untouched.
"""

from __future__ import annotations

import gc
import logging

import torch
import transformers
from transformers import LogitsProcessor, LogitsProcessorList

from fusedrl.rollout.base import RolloutOutput, SamplingConfig, check_generate_arguments
from fusedrl.rollout.static_decode import StaticDecodeLoop

logger = logging.getLogger(__name__)


class _ChosenTokenLogp(LogitsProcessor):
    """Records log_softmax(raw_logits / temperature) at each chosen token; placed first, it sees raw logits.

    At the call for step k, input_ids already holds the token chosen at step k-1, so that token's log-probability
    is gathered from the previous step's distribution; `finish` gathers the last step's token.
    """

    def __init__(self, prompt_length: int, temperature: float) -> None:
        self.prompt_length = prompt_length
        self.temperature = temperature
        self.chosen_logp: list[torch.Tensor] = []
        self.pending_logp: torch.Tensor | None = None  # (N, V) of the step whose token is not yet known

    def _gather_pending(self, tokens: torch.Tensor) -> None:
        assert self.pending_logp is not None
        self.chosen_logp.append(self.pending_logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
        self.pending_logp = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        steps_done = input_ids.shape[1] - self.prompt_length
        if self.pending_logp is not None and len(self.chosen_logp) < steps_done:
            self._gather_pending(input_ids[:, self.prompt_length + len(self.chosen_logp)])
        self.pending_logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """(N, L) float32 log-probabilities of the L tokens of `completion_ids`."""
        length = completion_ids.shape[1]
        if self.pending_logp is not None and len(self.chosen_logp) < length:
            self._gather_pending(completion_ids[:, len(self.chosen_logp)])
        if len(self.chosen_logp) < length:
            raise RuntimeError(
                f"generate returned {length} tokens but the sampler saw only {len(self.chosen_logp)} steps"
            )
        if length == 0:
            return completion_ids.new_zeros(completion_ids.shape, dtype=torch.float32)
        return torch.stack(self.chosen_logp[:length], dim=1)


def _as_id_list(value: int | list[int] | torch.Tensor | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class BuiltinEngine:
    """Generates completions with the training model (a transformers causal LM or a peft model around one)."""

    sampler_differs_from_trainer = False  # it samples from the training model itself

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: transformers.PreTrainedTokenizerBase,
        static_decode: bool | None = None,
        max_batch_size: int = 512,
    ) -> None:
        """static_decode: generate with our static-cache decode loop (`static_decode.StaticDecodeLoop`, CUDA graphs
        on a GPU) instead of transformers' `generate`; None = on CUDA devices only (CPU keeps `generate`).
        Unsupported models fall back to `generate` with a log line. max_batch_size: rows the loop decodes at once."""
        if not callable(getattr(model, "generate", None)):
            raise TypeError(f"model must be a transformers causal LM (with .generate), got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        generation_defaults = getattr(model, "generation_config", None)
        eos_ids = _as_id_list(tokenizer.eos_token_id)
        eos_ids += [i for i in _as_id_list(getattr(generation_defaults, "eos_token_id", None)) if i not in eos_ids]
        if not eos_ids:
            raise ValueError("neither the tokenizer nor the model's generation_config defines an eos token id")
        self.eos_token_ids = eos_ids
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        self._model_min_p = getattr(generation_defaults, "min_p", None)
        self.static_decode = static_decode
        self.static_loop = StaticDecodeLoop(model, eos_ids, self.pad_token_id, max_batch_size=max_batch_size)
        self._fallback_reasons: set[str] = set()

    def _uses_static_loop(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> bool:
        wanted = self.device.type == "cuda" if self.static_decode is None else self.static_decode
        if not wanted:
            return False
        reason = self.static_loop.unsupported_reason(max(len(p) for p in prompt_ids) + sampling.max_new_tokens)
        if reason is not None and reason not in self._fallback_reasons:
            self._fallback_reasons.add(reason)
            logger.warning("BuiltinEngine: static decode loop not used (%s); falling back to transformers generate",
                           reason)
        return reason is None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _left_pad(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(prompt) for prompt in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for row, prompt in enumerate(prompt_ids):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _processors(self, sampling: SamplingConfig, recorder: _ChosenTokenLogp) -> LogitsProcessorList:
        """The logits chain, recorder first, then transformers' processors in generate's own order."""
        processors: list[LogitsProcessor] = [recorder]
        if sampling.repetition_penalty != 1.0:
            processors.append(transformers.RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
        if not sampling.greedy:
            if sampling.temperature != 1.0:
                processors.append(transformers.TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                processors.append(transformers.TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                processors.append(transformers.TopPLogitsWarper(sampling.top_p))
            if sampling.min_p is not None:
                processors.append(transformers.MinPLogitsWarper(sampling.min_p))
        return LogitsProcessorList(processors)

    def _generation_config(self, sampling: SamplingConfig) -> transformers.GenerationConfig:
        # Sampling knobs are set to their neutral values here (explicitly, so the model's own generation defaults
        # cannot fill them in) and applied by our processor chain instead.
        # Greedy decoding applies no warpers, so they are left unset there (transformers warns about set ones).
        neutral_warpers = (
            {}
            if sampling.greedy
            else {
                "temperature": 1.0,
                "top_k": 0,
                "top_p": 1.0,
                "min_p": 0.0 if self._model_min_p is not None else None,
            }
        )
        return transformers.GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=0,
            do_sample=not sampling.greedy,
            **neutral_warpers,
            repetition_penalty=1.0,
            num_beams=1,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            return_dict_in_generate=True,
        )

    def generate(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        generator: torch.Generator | None = None,
    ) -> RolloutOutput:
        """Complete each prompt once. See `RolloutOutput` for the returned tensors (on the model's device)."""
        check_generate_arguments(prompt_ids, sampling, generator, self.model.get_input_embeddings().num_embeddings)
        input_ids, attention_mask = self._left_pad(prompt_ids)
        if self._uses_static_loop(prompt_ids, sampling):
            return self._generate_static(prompt_ids, sampling, generator)
        prompt_length = input_ids.shape[1]
        recorder = _ChosenTokenLogp(prompt_length, sampling.temperature)
        device = self.device
        fork_devices = (
            [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        )

        was_training = self.model.training
        self.model.eval()  # no dropout; transformers skips gradient checkpointing outside training mode
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=fork_devices, enabled=generator is not None):
                if generator is not None:
                    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
                    torch.manual_seed(seed)
                outputs = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=self._generation_config(sampling),
                    logits_processor=self._processors(sampling, recorder),
                )
        finally:
            self.model.train(was_training)

        completion_ids = outputs.sequences[:, prompt_length:]
        sampling_logp = recorder.finish(completion_ids)
        return self._finalize(completion_ids, sampling_logp)

    def _generate_static(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, generator: torch.Generator | None
    ) -> RolloutOutput:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                completion_ids, sampling_logp = self.static_loop.generate(prompt_ids, sampling, generator)
        finally:
            self.model.train(was_training)
        return self._finalize(completion_ids, sampling_logp)

    def _finalize(self, completion_ids: torch.Tensor, sampling_logp: torch.Tensor) -> RolloutOutput:
        """Mask everything after the first EOS, pad it, zero its logp, flag rows without EOS as truncated."""
        count, length = completion_ids.shape
        eos = torch.tensor(self.eos_token_ids, device=completion_ids.device)
        is_eos = torch.isin(completion_ids, eos)
        has_eos = is_eos.any(dim=1)
        first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long))
        positions = torch.arange(length, device=completion_ids.device).expand(count, length)
        completion_mask = (positions <= first_eos.unsqueeze(1)).long()
        completion_ids = completion_ids.masked_fill(completion_mask == 0, self.pad_token_id)
        sampling_logp = sampling_logp.float().masked_fill(completion_mask == 0, 0.0)
        return RolloutOutput(
            completion_ids=completion_ids.contiguous(),
            completion_mask=completion_mask,
            sampling_logp=sampling_logp.contiguous(),
            truncated=~has_eos,
        )

    def sleep(self) -> None:
        """Free the static loop's KV cache and graphs and the CUDA caching allocator's cached memory."""
        self.static_loop.release()
        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Re-allocate the static loop's KV cache at its last size (the weights are the live training model's)."""
        if self.device.type == "cuda" and self.static_decode is not False:
            self.static_loop.prepare()
