"""What a user sees of a running job: metrics.jsonl, a compact console table, sample completions, a progress bar.

MetricsLogger(output_dir, logging_steps=..., max_steps=...) is called with each step's metrics (a dict of numbers;
0-d tensors are fine), e.g. as the trainer's `on_log` hook:
  - every call appends one JSON line {"step", "time_s", **metrics} to output_dir/metrics.jsonl (non-finite numbers
    are written as null so the file stays valid JSON);
  - every `logging_steps` steps it prints one table row averaging the window since the last row (maxima and minima
    take the window's max and min, see window_statistic): loss, reward mean±std in total and per reward function, fraction of zero-std groups, completion length
    mean/max, truncated ratio, KL (when logged, i.e. beta > 0), clip ratios, entropy, learning rate, generation and
    training tokens/s, peak GPU memory (read from torch.cuda when the trainer does not log it);
  - log_samples(...) prints a few (prompt, completion, reward) samples and appends them to completions.jsonl;
  - TensorBoard scalars go to output_dir/tensorboard when torch.utils.tensorboard can be imported ("auto");
  - a tqdm progress bar with ETA runs over max_steps; table rows are written above it.
Metric names follow TRL's GRPOTrainer ("reward", "rewards/<func>/mean", "completions/mean_length", ...); the few
throughput/memory names are fusedrl's GRPOTrainer's (THROUGHPUT_* and PEAK_MEMORY_KEY below).

As a GRPOTrainer callback (callbacks=[..., logger]) it also follows the run: on_train_begin sets the progress bar
to the trainer's (possibly resumed) step and total, on_step_end logs the latest round's samples every
logging_steps, on_train_end closes everything.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"
THROUGHPUT_GENERATION_KEY = "throughput/generation_tokens_per_s"
THROUGHPUT_TRAINING_KEY = "throughput/training_tokens_per_s"
PEAK_MEMORY_KEY = "memory/peak_gb"

# (metric key, column title, number format); reward-function columns are inserted after "reward"
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("loss", "loss", "{:.4f}"),
    ("reward", "reward", "{:.3f}"),
    ("frac_reward_zero_std", "0-std", "{:.2f}"),
    ("completions/mean_length", "len", "{:.0f}"),
    ("completions/max_length", "len_max", "{:.0f}"),
    ("completions/clipped_ratio", "trunc", "{:.2f}"),
    ("kl", "kl", "{:.4f}"),
    (
        "clip_ratio/region_mean",
        "clip",
        "{:.3f}",
    ),  # with low/high appended: "region (low/high)"
    ("entropy", "entropy", "{:.3f}"),
    ("learning_rate", "lr", "{:.2e}"),
    (THROUGHPUT_GENERATION_KEY, "gen_tok/s", "{:.0f}"),
    (THROUGHPUT_TRAINING_KEY, "train_tok/s", "{:.0f}"),
    (PEAK_MEMORY_KEY, "mem_GB", "{:.2f}"),
)


def to_float(value: Any) -> float | None:
    """A metric value as a finite float, or None for non-finite values (NaN, inf) and non-numbers."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars
        except (TypeError, ValueError):
            return None
    value = float(value)
    return value if math.isfinite(value) else None


def window_statistic(key: str) -> str:
    """How a table row combines a metric over its window: "max", "min" or "mean", read from the metric's last
    path component ("completions/max_length", "clip_ratio/low_min", ".../max"), never from a reward's name
    ("rewards/terminal_answer_reward/mean" is a mean)."""
    if key == PEAK_MEMORY_KEY:
        return "max"
    last = key.rsplit("/", 1)[-1]
    for statistic in ("max", "min"):
        if last == statistic or last.startswith(statistic + "_") or last.endswith("_" + statistic):
            return statistic
    return "mean"


def _aggregate(key: str, values: list[float]) -> float:
    statistic = window_statistic(key)
    if statistic == "max":
        return max(values)
    if statistic == "min":
        return min(values)
    return sum(values) / len(values)


def reward_function_names(keys: Sequence[str]) -> list[str]:
    """The <func> of every "rewards/<func>/mean" key, in order of appearance."""
    return [k[len("rewards/") : -len("/mean")] for k in keys if k.startswith("rewards/") and k.endswith("/mean")]


class MetricsLogger:
    """Writes metrics.jsonl, prints a console table every logging_steps, optional TensorBoard and progress bar."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        logging_steps: int = 10,
        max_steps: int | None = None,
        initial_step: int = 0,
        log_completions: bool = False,
        num_completions_to_print: int | None = None,
        tensorboard: bool | str = "auto",
        progress_bar: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        if isinstance(logging_steps, bool) or not isinstance(logging_steps, int) or logging_steps < 1:
            raise ValueError(f"logging_steps: expected an int >= 1, got {logging_steps!r}")
        if max_steps is not None and max_steps < 0:
            max_steps = None  # -1 = derived from epochs: unknown here
        if tensorboard not in (True, False, "auto"):
            raise ValueError(f"tensorboard: expected True, False or 'auto', got {tensorboard!r}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / METRICS_FILE
        self.completions_path = self.output_dir / COMPLETIONS_FILE
        self.logging_steps = logging_steps
        self.log_completions = log_completions
        self.num_completions_to_print = num_completions_to_print
        self.stream = stream if stream is not None else sys.stdout
        self._window: dict[str, list[float]] = {}
        self._header: tuple[str, ...] | None = None
        self._rows_since_header = 0
        self._last_step = initial_step
        self._samples_shown: Any = None
        self._start = time.monotonic()
        self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        if _ends_mid_line(self.metrics_path):  # a killed run's torn last line: start ours on a fresh line
            self._metrics_file.write("\n")
        self._tensorboard = self._open_tensorboard(tensorboard)
        self._progress = None
        if progress_bar:
            from tqdm.auto import tqdm

            self._progress = tqdm(
                total=max_steps,
                initial=initial_step,
                desc="training",
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )

    # -- sinks ------------------------------------------------------------------------------------------------

    def _open_tensorboard(self, tensorboard: bool | str) -> Any:
        if tensorboard is False:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            if tensorboard is True:
                raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard") from error
            return None
        return SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))

    def _print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    # -- metrics ----------------------------------------------------------------------------------------------

    def __call__(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.log(metrics, step)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float | None]:
        """Record one step's metrics; step defaults to metrics["step"], else the previous step + 1."""
        if step is None:
            step = int(metrics["step"]) if "step" in metrics else self._last_step + 1
        values = {key: to_float(value) for key, value in metrics.items() if key != "step"}
        if PEAK_MEMORY_KEY not in values and torch.cuda.is_available():
            values[PEAK_MEMORY_KEY] = torch.cuda.max_memory_allocated() / 2**30
        record = {
            "step": step,
            "time_s": round(time.monotonic() - self._start, 3),
            **values,
        }
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        for key, value in values.items():
            if value is not None:
                self._window.setdefault(key, []).append(value)
                if self._tensorboard is not None:
                    self._tensorboard.add_scalar(key, value, step)
        if self._progress is not None:
            self._progress.update(max(step - self._last_step, 0))
            if values.get("reward") is not None:
                self._progress.set_postfix(reward=f"{values['reward']:.3f}", refresh=False)
        self._last_step = step
        if step % self.logging_steps == 0:
            self.flush_table(step)
        return values

    def flush_table(self, step: int | None = None) -> None:
        """Print one table row averaging the metrics logged since the previous row (nothing if none)."""
        if not self._window:
            return
        window = {key: _aggregate(key, vals) for key, vals in self._window.items()}
        self._window = {}
        titles, cells = ["step"], [str(step if step is not None else self._last_step)]
        functions = reward_function_names(list(window))
        for key, title, fmt in _COLUMNS:
            if key == "reward" and key in window:
                cell = fmt.format(window[key])
                if "reward_std" in window:
                    cell += "±" + fmt.format(window["reward_std"])
                titles.append(title)
                cells.append(cell)
                for name in functions:
                    mean, std = (
                        window[f"rewards/{name}/mean"],
                        window.get(f"rewards/{name}/std"),
                    )
                    titles.append(name.removesuffix("_reward"))
                    cells.append(f"{mean:.3f}" + (f"±{std:.3f}" if std is not None else ""))
            elif key == "clip_ratio/region_mean" and key in window:
                titles.append("clip(lo/hi)")
                low, high = (
                    window.get("clip_ratio/low_mean"),
                    window.get("clip_ratio/high_mean"),
                )
                extra = f"({low:.2f}/{high:.2f})" if low is not None and high is not None else ""
                cells.append(fmt.format(window[key]) + extra)
            elif key in window:
                titles.append(title)
                cells.append(fmt.format(window[key]))
        widths = [max(len(t), len(c)) for t, c in zip(titles, cells)]
        header = tuple(titles)
        if header != self._header or self._rows_since_header >= 20:
            self._print(" | ".join(t.rjust(w) for t, w in zip(titles, widths)))
            self._header, self._rows_since_header = header, 0
        self._print(" | ".join(c.rjust(w) for c, w in zip(cells, widths)))
        self._rows_since_header += 1

    # -- GRPOTrainer callback ---------------------------------------------------------------------------------

    def on_train_begin(self, trainer: Any) -> None:
        self._last_step = trainer.state.global_step
        if self._progress is not None:
            self._progress.reset(total=trainer.state.max_steps)
            # a resumed run starts part-way; `initial` keeps the ETA from counting restored steps as fast ones
            self._progress.initial = self._progress.n = self._progress.last_print_n = trainer.state.global_step
            self._progress.refresh()

    def on_log(self, metrics: Mapping[str, Any]) -> None:
        self.log(metrics)

    def on_step_end(self, trainer: Any) -> None:
        samples = getattr(trainer, "last_completions", None)
        due = trainer.state.global_step % self.logging_steps == 0
        if self.log_completions and samples and due and samples is not self._samples_shown:
            self.log_samples(
                trainer.state.global_step,
                [s["prompt"] for s in samples],
                [s["completion"] for s in samples],
                {"reward": [s["reward"] for s in samples]},
            )
            self._samples_shown = samples  # a round's samples are shown once

    def on_train_end(self, trainer: Any) -> None:
        self.close()

    # -- samples ----------------------------------------------------------------------------------------------

    def log_samples(
        self,
        step: int,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        rewards: Mapping[str, Sequence[float | None]],
    ) -> None:
        """Append (prompt, completion, rewards) samples to completions.jsonl and print a few, if log_completions.

        rewards maps reward-function names to one value per completion.
        """
        if not self.log_completions:
            return
        if len(prompts) != len(completions):
            raise ValueError(f"prompts and completions must align: {len(prompts)} vs {len(completions)}")
        for name, values in rewards.items():
            if len(values) != len(completions):
                raise ValueError(f"rewards[{name!r}] has {len(values)} values for {len(completions)} completions")
        with open(self.completions_path, "a", encoding="utf-8") as f:
            for i, (prompt, completion) in enumerate(zip(prompts, completions)):
                sample = {
                    "step": step,
                    "prompt": prompt,
                    "completion": completion,
                    "rewards": {name: to_float(values[i]) for name, values in rewards.items()},
                }
                f.write(json.dumps(sample, default=str) + "\n")
        count = len(completions) if self.num_completions_to_print is None else self.num_completions_to_print
        for i in range(min(count, len(completions))):
            scores = ", ".join(f"{name}={to_float(values[i])}" for name, values in rewards.items())
            self._print(
                f"--- sample {i} at step {step} ({scores})\n"
                f"prompt: {_text_of(prompts[i])}\ncompletion: {_text_of(completions[i])}"
            )

    # -- lifetime ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Print what is left of the window, close files, TensorBoard and the progress bar. Idempotent."""
        if self._metrics_file.closed:
            return
        self.flush_table()
        self._metrics_file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._progress is not None:
            self._progress.close()

    def __enter__(self) -> MetricsLogger:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() == 0:
            return False
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def _text_of(item: Any) -> str:
    """Chat message lists -> their last message's content; anything else -> str."""
    if isinstance(item, list) and item and isinstance(item[-1], Mapping):
        return str(item[-1].get("content", ""))
    return str(item)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of run_dir/metrics.jsonl, one per step, by step.

    A resumed run re-logs the steps after its checkpoint: the later record of a step wins. A torn line (crash
    mid-write) is skipped.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"run_dir: {path} does not exist (expected the metrics.jsonl of a fusedrl run)")
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]
