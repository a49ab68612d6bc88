"""plot_run(run_dir): a PNG of a run's curves from its metrics.jsonl (matplotlib, Agg backend, no display needed).

Four panels against the optimizer step: total reward (mean with a ±std band), each reward function's mean, the
loss, and completion length (mean and max). Panels whose metrics were never logged say so instead of being empty.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fusedrl.train.metrics_log import read_metrics, reward_function_names


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def _plot_lines(axis: Any, records: list[dict[str, Any]], keys: list[tuple[str, str]], title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    drawn = False
    for key, label in keys:
        steps, values = _series(records, key)
        if steps:
            axis.plot(steps, values, marker="." if len(steps) < 50 else None, label=label)
            drawn = True
    axis.set_title(title)
    axis.set_xlabel("step")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if drawn:
        if len(keys) > 1:
            axis.legend(fontsize="small")
    else:
        axis.text(
            0.5,
            0.5,
            "not logged",
            ha="center",
            va="center",
            transform=axis.transAxes,
            color="gray",
        )


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw reward, per-function rewards, loss and completion length vs step; returns the PNG path.

    output defaults to run_dir/metrics.png.
    """
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plot_run needs matplotlib: pip install matplotlib") from error

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"run_dir: {run_dir / 'metrics.jsonl'} holds no metrics yet")
    output = Path(output) if output is not None else run_dir / "metrics.png"

    figure, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    reward_axis = axes[0][0]
    _plot_lines(reward_axis, records, [("reward", "reward")], "reward (mean ± std)")
    steps, means = _series(records, "reward")
    std_by_step = dict(zip(*_series(records, "reward_std")))
    if steps and std_by_step:
        band = [(s, m, std_by_step[s]) for s, m in zip(steps, means) if s in std_by_step]
        reward_axis.fill_between(
            [b[0] for b in band],
            [b[1] - b[2] for b in band],
            [b[1] + b[2] for b in band],
            alpha=0.2,
        )
    keys = sorted({key for record in records for key in record})
    functions = reward_function_names(keys)
    _plot_lines(
        axes[0][1],
        records,
        [(f"rewards/{name}/mean", name) for name in functions],
        "reward per function",
    )
    _plot_lines(axes[1][0], records, [("loss", "loss")], "loss")
    _plot_lines(
        axes[1][1],
        records,
        [("completions/mean_length", "mean"), ("completions/max_length", "max")],
        "completion length (tokens)",
    )
    figure.suptitle(run_dir.name)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output
