"""The quick demo's sums task: a fixed 61/20 split with no overlap, correct answers, chat prompts."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("datasets", reason="datasets is not installed (the GPU machine lacks it)")
from fusedrl.data.sums import HELD_OUT, sums_dataset  # noqa: E402


def _pair(row):
    a, b = map(int, re.match(r"What is (\d) \+ (\d)\?", row["prompt"][0]["content"]).groups())
    return a, b


def test_split_is_fixed_disjoint_and_complete():
    train, test = sums_dataset("train"), sums_dataset("test")
    assert len(test) == HELD_OUT and len(train) == 81 - HELD_OUT
    train_pairs, test_pairs = {_pair(r) for r in train}, {_pair(r) for r in test}
    assert not train_pairs & test_pairs
    assert train_pairs | test_pairs == {(a, b) for a in range(1, 10) for b in range(1, 10)}
    assert list(sums_dataset("test")["answer"]) == list(test["answer"])  # same order every call


def test_rows_hold_the_right_answer_and_a_user_message():
    for row in sums_dataset("train", limit=10):
        a, b = _pair(row)
        assert row["answer"] == str(a + b)
        assert [m["role"] for m in row["prompt"]] == ["user"]


@pytest.mark.parametrize(("kwargs", "match"), [({"split": "dev"}, "split must be"), ({"limit": 0}, "limit must"),
                                                ({"limit": 2.5}, "limit must")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sums_dataset(**kwargs)
