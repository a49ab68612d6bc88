"""Reward functions: their names, their weights, and scoring one generation round with them, as TRL 1.16 calls them.

Each reward function is one of:
- a callable f(prompts, completions, completion_ids, **kwargs) -> list[float | None] (None: cannot score);
- an `async def` callable of the same signature: all async functions of a round run concurrently (asyncio.gather on
  one event loop in a daemon thread, so this also works where the caller already runs a loop, e.g. Jupyter);
- a sequence-classification model (`torch.nn.Module`, e.g. `AutoModelForSequenceClassification`) scoring the
  prompt + completion text (chat template applied for conversational prompts) by its first logit; or a model id /
  local path, loaded with `AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)`.
The keyword arguments are the dataset's other columns (one list each), `trainer_state`, and `log_metric(name, value)`
/ `log_extra(column, values)` for a function to log a scalar metric (averaged per round) or a column of the
completions table. Dataset columns may not use these reserved names. A value must be a real number or None.
The round's reward is the weighted sum of the functions' rewards (advantages.py).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import numbers
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

RewardFunc = Callable[..., Sequence[float | None]]

# Names the trainer passes to reward functions itself; a dataset column of the same name would be lost.
RESERVED_REWARD_KWARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")
# Columns never forwarded (TRL: "prompt" and "completion" are given as `prompts` / `completions`).
NOT_FORWARDED_COLUMNS = ("prompt", "completion")


def check_dataset_columns(columns: Sequence[str]) -> None:
    """ValueError naming any dataset column that collides with a keyword the trainer passes to reward functions."""
    clashes = [column for column in columns if column in RESERVED_REWARD_KWARGS]
    if clashes:
        raise ValueError(
            f"train_dataset column(s) {clashes} collide with keyword(s) the trainer passes to reward functions "
            f"({', '.join(RESERVED_REWARD_KWARGS)}); rename the column(s), e.g. dataset.rename_column({clashes[0]!r}, "
            f"'{clashes[0]}_column')."
        )


def is_async_callable(func: Any) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))


def reward_func_name(func: Any) -> str:
    """The name in metrics ("rewards/<name>/mean"): a model's name (last part of its id), a function's __name__,
    a partial's function name, or the class name."""
    if isinstance(func, torch.nn.Module) and getattr(func, "config", None) is not None:
        return str(getattr(func.config, "_name_or_path", "") or type(func).__name__).rstrip("/").split("/")[-1]
    if isinstance(func, functools.partial):
        return reward_func_name(func.func)
    return getattr(func, "__name__", None) or type(func).__name__


class _EventLoopThread:
    """One asyncio loop in a daemon thread, started on first use."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self, coroutine):
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, daemon=True, name="fusedrl-rewards").start()
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()


class RewardScorer:
    """Calls the reward functions of a run; see the module docstring for what each may be."""

    def __init__(self, reward_funcs: Any, reward_weights: Sequence[float] | None = None,
                 reward_processing_classes: Any = None, *, device: torch.device | None = None,
                 model_init_kwargs: dict[str, Any] | None = None) -> None:
        funcs = [reward_funcs] if (callable(reward_funcs) or isinstance(reward_funcs, str)) else list(reward_funcs)
        if not funcs:
            raise ValueError("reward_funcs must hold at least one reward function")
        funcs = [self._load(func, index, model_init_kwargs) for index, func in enumerate(funcs)]
        if reward_processing_classes is None:
            classes = [None] * len(funcs)
        elif isinstance(reward_processing_classes, (list, tuple)):
            classes = list(reward_processing_classes)
        else:
            classes = [reward_processing_classes]
        if len(classes) != len(funcs):
            raise ValueError(f"reward_processing_classes has {len(classes)} entries but there are {len(funcs)} reward "
                             "functions; give one per reward function (None for plain functions)")
        for index, (func, tokenizer) in enumerate(zip(funcs, classes)):
            if isinstance(func, torch.nn.Module):
                classes[index] = self._reward_tokenizer(func, tokenizer, index)
                if device is not None:
                    func.to(device)
                func.eval()
        weights = [1.0] * len(funcs) if reward_weights is None else list(reward_weights)
        if len(weights) != len(funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries but {len(funcs)} reward functions were "
                             "given; give one weight per reward function (or reward_weights=None for all 1.0)")
        self.funcs, self.processing_classes = funcs, classes
        self.names = [reward_func_name(func) for func in funcs]
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self._loop = _EventLoopThread()
        self.pending_metrics: dict[str, list[float]] = defaultdict(list)
        self.pending_extra: dict[str, list[Any]] = defaultdict(list)

    @staticmethod
    def _load(func: Any, index: int, model_init_kwargs: dict[str, Any] | None) -> Any:
        if isinstance(func, str):
            import transformers

            try:
                return transformers.AutoModelForSequenceClassification.from_pretrained(
                    func, num_labels=1, **(model_init_kwargs or {}))
            except (OSError, ValueError) as error:
                raise ValueError(f"reward_funcs[{index}] = {func!r} is a string, so it names a reward model (a Hub "
                                 f"id or a local folder), but loading it failed: {error}") from error
        if not callable(func):
            raise TypeError(f"reward_funcs[{index}] must be a callable, a torch.nn.Module reward model or a model id "
                            f"string, got {type(func).__name__}")
        return func

    @staticmethod
    def _reward_tokenizer(model: torch.nn.Module, tokenizer: Any, index: int) -> Any:
        if tokenizer is None:
            import transformers

            name = getattr(getattr(model, "config", None), "_name_or_path", None)
            if not name:
                raise ValueError(f"reward_funcs[{index}] is a reward model without a name to load its tokenizer from: "
                                 "pass its tokenizer in reward_processing_classes")
            tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        # The model reads its score at the last non-padding token, which it finds through pad_token_id.
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        return tokenizer

    # ------------------------------------------------------------------------------------------------------------
    def score(self, rows: list[dict[str, Any]], prompts: list[Any], completions: list[Any],
              completion_ids: list[list[int]], trainer_state: Any) -> torch.Tensor:
        """(N, F) float32 rewards, NaN where a function returned None.

        Raises ValueError when a function returns another number of values than completions, TypeError when a value
        is neither a real number nor None.
        """
        kwargs = {key: [row[key] for row in rows] for key in rows[0] if key not in NOT_FORWARDED_COLUMNS}
        kwargs.update(trainer_state=trainer_state, log_metric=self.log_metric, log_extra=self.log_extra)
        rewards = torch.full((len(rows), len(self.funcs)), float("nan"), dtype=torch.float32)
        pending_async = []
        for index, func in enumerate(self.funcs):
            if isinstance(func, torch.nn.Module):
                rewards[:, index] = self._model_scores(func, self.processing_classes[index], prompts, completions)
            elif is_async_callable(func):
                pending_async.append(index)
            else:
                values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
                rewards[:, index] = self._as_column(values, index, len(rows))
        if pending_async:
            async def run_all():
                return await asyncio.gather(*(
                    self.funcs[index](prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
                    for index in pending_async))

            for index, values in zip(pending_async, self._loop.run(run_all())):
                rewards[:, index] = self._as_column(values, index, len(rows))
        return rewards

    def _as_column(self, values, index: int, count: int) -> torch.Tensor:
        values, name = list(values), self.names[index]
        if len(values) != count:
            raise ValueError(f"reward function {name!r} returned {len(values)} rewards; expected one per completion "
                             f"({count})")
        return torch.tensor([_reward_value(name, position, value) for position, value in enumerate(values)],
                            dtype=torch.float32)

    @torch.inference_mode()
    def _model_scores(self, model: torch.nn.Module, tokenizer: Any, prompts: list[Any],
                      completions: list[Any]) -> torch.Tensor:
        if prompts and isinstance(prompts[0], list):  # conversational
            texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        inputs = tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right",
                           add_special_tokens=False)
        device = next(model.parameters()).device
        inputs = {key: value.to(device) for key, value in inputs.items()}
        return model(**inputs).logits[:, 0].float().cpu()

    # ------------------------------------------------------------------------------------------------------------
    def log_metric(self, name: str, value: float) -> None:
        """For reward functions: a scalar metric, averaged over the round and logged with the step's metrics."""
        self.pending_metrics[name].append(float(value))

    def log_extra(self, column: str, values: list[Any]) -> None:
        """For reward functions: a column of the completions table, one value per completion."""
        self.pending_extra[column].extend(values)

    def pop_logged(self) -> tuple[dict[str, float], dict[str, list[Any]]]:
        """(metrics averaged since the last call, extra completion columns since the last call); then clears both."""
        metrics = {name: sum(values) / len(values) for name, values in self.pending_metrics.items() if values}
        extra = dict(self.pending_extra)
        self.pending_metrics.clear()
        self.pending_extra.clear()
        return metrics, extra


def _reward_value(name: str, position: int, value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"reward function {name!r} returned {value!r:.60} at position {position}; expected a "
                        "float (or None when it cannot score)")
    return float(value)
