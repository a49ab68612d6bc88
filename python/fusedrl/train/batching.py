"""Turning dataset rows into padded token batches, and token batches into micro-batches.

- `PromptSampler`: which dataset rows each generation round uses (TRL's RepeatSampler order: a seeded permutation
  per epoch, `prompts_per_round` unique prompts per round, incomplete rounds dropped).
- `repeat_rows`: each prompt row repeated `num_generations` times in a row, so groups are contiguous.
- `tokenize_prompts`: chat messages -> ids through the tokenizer's chat template (add_generation_prompt=True), plain
  strings -> ids; prompts longer than `max_prompt_length` keep their last tokens (TRL's left truncation).
- `pad_sequences`: left or right padding to a `(N, T)` id tensor and its `(N, T)` mask.
- `TrainingBatch`: the tensors of one generation batch or micro-batch, with shuffling, splitting into equal
  micro-batches and trimming of all-padding columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch


class PromptSampler:
    """Yields, per generation round, the dataset indices of its unique prompts.

    Epoch `e` walks `torch.randperm(len, generator seeded with seed + e)` (or the identity when `shuffle` is off)
    in chunks of `prompts_per_round`; a last chunk shorter than that is dropped, as TRL's sampler does.
    """

    def __init__(self, num_rows: int, prompts_per_round: int, *, shuffle: bool = True, seed: int = 0) -> None:
        if prompts_per_round < 1:
            raise ValueError(f"prompts_per_round must be >= 1, got {prompts_per_round}")
        if num_rows < prompts_per_round:
            raise ValueError(
                f"train_dataset has {num_rows} rows but one generation round needs {prompts_per_round} unique "
                "prompts (generation_batch_size / num_generations); use a larger dataset or a smaller "
                "generation_batch_size"
            )
        self.num_rows = num_rows
        self.prompts_per_round = prompts_per_round
        self.shuffle = shuffle
        self.seed = seed

    @property
    def rounds_per_epoch(self) -> int:
        return self.num_rows // self.prompts_per_round

    def epoch_rounds(self, epoch: int) -> list[list[int]]:
        """The prompt indices of every round of `epoch`."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_rows, generator=generator).tolist()
        else:
            order = list(range(self.num_rows))
        size = self.prompts_per_round
        return [order[i * size : (i + 1) * size] for i in range(self.rounds_per_epoch)]

    def __iter__(self) -> Iterator[list[int]]:
        """Rounds forever, epoch after epoch; the trainer decides when to stop."""
        epoch = 0
        while True:
            yield from self.epoch_rounds(epoch)
            epoch += 1


def repeat_rows(rows: Sequence[dict[str, Any]], num_generations: int) -> list[dict[str, Any]]:
    """[a, b] -> [a, a, ..., b, b, ...] with each row `num_generations` times (groups are contiguous)."""
    return [row for row in rows for _ in range(num_generations)]


def is_conversational(prompt: Any) -> bool:
    """A prompt is conversational when it is a list of {"role", "content"} messages."""
    return (
        isinstance(prompt, list)
        and len(prompt) > 0
        and all(isinstance(message, dict) and "role" in message and "content" in message for message in prompt)
    )


def tokenize_prompts(
    tokenizer: Any,
    prompts: Sequence[Any],
    *,
    max_prompt_length: int | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[list[int]]:
    """Token ids of each prompt, unpadded.

    Chat prompts go through `tokenizer.apply_chat_template(..., add_generation_prompt=True)`, plain strings through
    the tokenizer itself. With `max_prompt_length`, a longer prompt keeps its last `max_prompt_length` tokens.
    """
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be None or >= 1, got {max_prompt_length}")
    ids: list[list[int]] = []
    for index, prompt in enumerate(prompts):
        if is_conversational(prompt):
            encoded = tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True, **(chat_template_kwargs or {})
            )
            prompt_ids = list(encoded["input_ids"])
        elif isinstance(prompt, str):
            prompt_ids = list(tokenizer(prompt)["input_ids"])
        else:
            raise TypeError(
                f"prompt {index} must be a string or a list of chat messages with 'role' and 'content', "
                f"got {type(prompt).__name__}: {prompt!r:.80}"
            )
        if len(prompt_ids) == 0:
            raise ValueError(f"prompt {index} tokenized to zero tokens: {prompt!r:.80}")
        if max_prompt_length is not None:
            prompt_ids = prompt_ids[-max_prompt_length:]
        ids.append([int(token) for token in prompt_ids])
    return ids


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, *, side: str, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids (N, T) long, mask (N, T) long)`; `side` is "left" or "right"; T is the longest sequence (>= 1)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max([len(sequence) for sequence in sequences] + [1])
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence) == 0:
            continue
        columns = slice(width - len(sequence), width) if side == "left" else slice(0, len(sequence))
        ids[row, columns] = torch.as_tensor(list(sequence), dtype=torch.long)
        mask[row, columns] = 1
    return ids.to(device), mask.to(device)


@dataclasses.dataclass
class TrainingBatch:
    """One batch of sampled completions with everything the loss needs.

    prompt_ids/prompt_mask (B, P) left-padded; completion_ids/completion_mask (B, T) right-padded (the mask is the
    loss mask: truncated completions may have been zeroed); advantages (B,); optional per-token (B, T) fp32
    old_logp (policy before this round's updates), ref_logp (reference model), sampling_logp (the rollout engine's).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    sampling_logp: torch.Tensor | None = None
    # active completion tokens of the whole generation round this batch came from (TRL's num_items_in_batch)
    round_tokens: float = 0.0

    def __post_init__(self) -> None:
        rows = self.prompt_ids.shape[0]
        width = self.completion_ids.shape[1]
        if self.prompt_mask.shape != self.prompt_ids.shape:
            raise ValueError(f"prompt_mask {tuple(self.prompt_mask.shape)} != prompt_ids {tuple(self.prompt_ids.shape)}")
        if self.completion_ids.shape[0] != rows or self.completion_mask.shape != self.completion_ids.shape:
            raise ValueError(
                f"completion_ids {tuple(self.completion_ids.shape)} and completion_mask "
                f"{tuple(self.completion_mask.shape)} must both be ({rows}, T)"
            )
        if self.advantages.shape != (rows,):
            raise ValueError(f"advantages must have shape ({rows},), got {tuple(self.advantages.shape)}")
        for name in ("old_logp", "ref_logp", "sampling_logp"):
            value = getattr(self, name)
            if value is not None and value.shape != (rows, width):
                raise ValueError(f"{name} must have shape ({rows}, {width}), got {tuple(value.shape)}")

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def num_active_tokens(self) -> int:
        """Completion tokens that enter the loss."""
        return int(self.completion_mask.sum().item())

    def replace(self, **changes: Any) -> TrainingBatch:
        return dataclasses.replace(self, **changes)

    def _map_rows(self, rows: torch.Tensor | slice) -> TrainingBatch:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return TrainingBatch(**{name: value[rows] if isinstance(value, torch.Tensor) else value
                                for name, value in fields.items()})

    def shuffled(self, generator: torch.Generator) -> TrainingBatch:
        """Rows in a random order drawn from `generator` (CPU generator)."""
        permutation = torch.randperm(len(self), generator=generator).to(self.prompt_ids.device)
        return self._map_rows(permutation)

    def split(self, num_chunks: int, *, trim_completions: bool = True) -> list[TrainingBatch]:
        """`num_chunks` consecutive equal slices of the rows, each trimmed of all-padding columns (see `trimmed`)."""
        if num_chunks < 1 or len(self) % num_chunks != 0:
            raise ValueError(f"cannot split a batch of {len(self)} rows into {num_chunks} equal micro-batches")
        size = len(self) // num_chunks
        return [
            self._map_rows(slice(i * size, (i + 1) * size)).trimmed(completions=trim_completions)
            for i in range(num_chunks)
        ]

    def trimmed(self, *, completions: bool = True) -> TrainingBatch:
        """Drop leading prompt columns and (if `completions`) trailing completion columns that are padding in every
        row.

        Leading prompt padding has no effect on the model's outputs (the attention mask hides it) and trailing
        completion columns with mask 0 everywhere never enter the loss, so this only saves compute, except for a
        loss that averages over padding columns too (token-level luspo), whose caller keeps the completion width.
        At least one column of each is kept.
        """
        prompt_used = self.prompt_mask.any(dim=0).nonzero()
        first_prompt = int(prompt_used[0].item()) if prompt_used.numel() else self.prompt_mask.shape[1] - 1
        completion_used = self.completion_mask.any(dim=0).nonzero()
        end_completion = int(completion_used[-1].item()) + 1 if completion_used.numel() else 1
        if not completions:
            end_completion = self.completion_mask.shape[1]
        per_token = {
            name: None if getattr(self, name) is None else getattr(self, name)[:, :end_completion]
            for name in ("completion_ids", "completion_mask", "old_logp", "ref_logp", "sampling_logp")
        }
        return self.replace(
            prompt_ids=self.prompt_ids[:, first_prompt:], prompt_mask=self.prompt_mask[:, first_prompt:], **per_token
        )

    def to(self, device: torch.device | str) -> TrainingBatch:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return TrainingBatch(**{name: value.to(device) if isinstance(value, torch.Tensor) else value
                                for name, value in fields.items()})
