"""`fusedrl train`'s configuration: a TOML file (or a run's run_config.json) read into a RunConfig.

TOML layout (the names are GRPOConfig's, fusedrl.LoraConfig's and load_model's):
  learning_rate = 1e-5            # GRPOConfig fields at top level and/or in a [train] table
  [model]   name_or_path = "...", dtype = "bfloat16", load_in_4bit = false, max_seq_length = 2048
  [lora]    r = 16, lora_alpha = 32, target_modules = "all-linear", lora_dropout = 0.0  (enabled = false: full model)
  [dataset] name = "gsm8k-offline" | "gsm8k" | "path/to/file.jsonl", split = "train", limit = 64
  [rewards] names = ["correctness_reward", "xmlcount_reward"], weights = [1.0, 0.5]   (or name = weight pairs)
This module checks the layout (sections, keys, reward weights); the values of each section are checked by the
object they build (GRPOConfig, LoraConfig, load_model, the dataset loader).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10
    tomllib = None  # type: ignore[assignment]

RUN_CONFIG_FILE = "run_config.json"
SECTIONS = ("train", "model", "lora", "dataset", "rewards")
MODEL_KEYS = ("name_or_path", "dtype", "load_in_4bit", "max_seq_length")
DATASET_KEYS = ("name", "split", "limit", "seed")


class ConfigError(ValueError):
    """A problem in the user's TOML config or command line, with a message saying what to change."""


@dataclass
class RunConfig:
    """Everything `fusedrl train` needs: GRPOConfig fields plus model, LoRA, dataset and reward choices."""

    train: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = field(default_factory=dict)  # None: train the full model
    dataset: dict[str, Any] = field(default_factory=dict)
    rewards: list[tuple[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "train": self.train,
            "model": self.model,
            "lora": self.lora,
            "dataset": self.dataset,
            "rewards": {
                "names": [n for n, _ in self.rewards],
                "weights": [w for _, w in self.rewards],
            },
        }


def _check_keys(section: str, values: dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"[{section}]: unknown key(s) {unknown}; expected some of {list(allowed)}")


def _parse_rewards(table: Any) -> list[tuple[str, float]]:
    if not isinstance(table, dict):
        raise ConfigError(f"[rewards]: expected a table, got {table!r}")
    if "names" in table:
        _check_keys("rewards", table, ("names", "weights"))
        names = table["names"]
        weights = table.get("weights", [1.0] * len(names))
        if not isinstance(names, list) or not names or len(weights) != len(names):
            raise ConfigError(
                f"[rewards]: names must be a non-empty list and weights (optional) a list of the same "
                f"length; got names={names!r}, weights={weights!r}"
            )
        pairs = list(zip(names, weights))
    else:
        pairs = list(table.items())
    for name, weight in pairs:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"[rewards]: the weight of {name!r} must be a number, got {weight!r}")
    return [(str(name), float(weight)) for name, weight in pairs]


def run_config_from_mapping(values: dict[str, Any]) -> RunConfig:
    """A RunConfig from a parsed TOML (or run_config.json) mapping; top-level scalars are GRPOConfig fields."""
    train = {k: v for k, v in values.items() if k not in SECTIONS}
    section_train = values.get("train", {})
    clash = sorted(set(train) & set(section_train))
    if clash:
        raise ConfigError(f"{clash} set both at top level and in [train]; keep one")
    train.update(section_train)
    model = dict(values.get("model", {}))
    _check_keys("model", model, MODEL_KEYS)
    lora_table = values.get("lora", {})
    lora: dict[str, Any] | None = dict(lora_table) if lora_table is not None else None
    if lora is not None and lora.pop("enabled", True) is False:
        lora = None
    dataset = dict(values.get("dataset", {}))
    _check_keys("dataset", dataset, DATASET_KEYS)
    rewards = _parse_rewards(values.get("rewards", {"names": ["correctness_reward"]}))
    return RunConfig(train=train, model=model, lora=lora, dataset=dataset, rewards=rewards)


def _toml_module() -> Any:
    if tomllib is not None:
        return tomllib
    try:
        import tomli
    except ModuleNotFoundError as error:
        raise ConfigError("reading TOML configs on Python 3.10 needs tomli: pip install tomli") from error
    return tomli


def load_run_config(path: str | Path) -> RunConfig:
    """Read a TOML config file (or a run's run_config.json)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: {path} does not exist")
    toml = _toml_module()
    try:
        if path.suffix == ".json":
            values = json.loads(path.read_text(encoding="utf-8"))
        else:
            with path.open("rb") as f:
                values = toml.load(f)
    except (toml.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"config: {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {error}")
    return run_config_from_mapping(values)
