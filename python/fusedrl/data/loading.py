"""The prompt datasets `fusedrl train` and `fusedrl eval` read: one-digit sums, offline GSM8K, GSM8K from the Hub, a .jsonl file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fusedrl.run_config import ConfigError


def build_dataset(spec: dict[str, Any], default_split: str = "train") -> Any:
    """[dataset] name: "sums" (the quick demo's one-digit sums), "gsm8k-offline" (packaged problems), "gsm8k" (the Hub), or a local .jsonl file."""
    name = spec.get("name", "gsm8k-offline")
    limit = spec.get("limit")
    seed = spec.get("seed", 0)
    if name == "gsm8k-offline":
        from fusedrl.data.gsm8k import load_offline_gsm8k

        try:
            return load_offline_gsm8k(limit, seed=seed)
        except RuntimeError as error:  # the package with the offline problems is missing: says how to install it
            raise ConfigError(str(error)) from error
    if name == "sums":
        from fusedrl.data.sums import sums_dataset

        try:
            return sums_dataset(spec.get("split", default_split), limit)
        except ValueError as error:
            raise ConfigError(f"[dataset] {error}") from error
    if name == "gsm8k":
        from fusedrl.data.gsm8k import load_gsm8k

        dataset = load_gsm8k(spec.get("split", default_split))
    elif str(name).endswith((".jsonl", ".json")):
        dataset = _load_jsonl_dataset(Path(name))
    else:
        raise ConfigError(f"[dataset] name: expected 'sums', 'gsm8k-offline', 'gsm8k' or a .jsonl file, got {name!r}")
    return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset


def _load_jsonl_dataset(path: Path) -> Any:
    import datasets

    from fusedrl.data.gsm8k import gsm8k_rows_to_dataset

    if not path.is_file():
        raise ConfigError(f"[dataset] name: {path} does not exist")
    if not path.read_text(encoding="utf-8").strip():
        raise ConfigError(f"[dataset] name: {path} is empty; expected one JSON object per line, each with a 'prompt'")
    dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    if "prompt" in dataset.column_names:
        return dataset
    if {"question", "answer"} <= set(dataset.column_names):
        return gsm8k_rows_to_dataset(dataset)
    raise ConfigError(
        f"[dataset] {path}: rows need a 'prompt' column (text or chat messages) or GSM8K "
        f"'question' + 'answer' ('... #### N'); found columns {dataset.column_names}"
    )
