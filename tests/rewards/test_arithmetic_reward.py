"""number_answer_reward: the bare answer 1.0, the answer as the last number of more text 0.5, else 0.0;
final_number_reward: 1.0 when the last number is the answer."""

from __future__ import annotations

import pytest
from fusedrl.rewards import get_reward_function
from fusedrl.rewards.arithmetic import (
    final_number_reward,
    final_number_score,
    number_answer_reward,
    number_answer_score,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7", 1.0),
        (" 7.\n", 1.0),
        ("3 plus 4 is 7.", 0.5),
        ("The answer is 1,007", 0.0),  # truth is 7: 1007 is another number
        ("7 is what 3 + 4 gives, not 8", 0.0),  # the last number is 8
        ("seven", 0.0),
        ("", 0.0),
        ("-7", 0.0),
    ],
)
def test_scores(text, expected):
    assert number_answer_score(text, "7") == expected


def test_negative_and_grouped_answers():
    assert number_answer_score("-12", "-12") == 1.0
    assert number_answer_score("it is 1,007", "1007") == 0.5


def test_chat_completions_truth_none_and_registration():
    completions = [[{"role": "assistant", "content": "9"}], [{"role": "assistant", "content": "so 9"}], "x"]
    assert number_answer_reward(None, completions, answer=["9", "9", None]) == [1.0, 0.5, None]
    assert get_reward_function("number_answer_reward") is number_answer_reward


def test_missing_or_misaligned_answers_are_clear_errors():
    with pytest.raises(ValueError, match="needs the ground truth"):
        number_answer_reward(None, ["1"])
    with pytest.raises(ValueError, match="1 entries but there are 2"):
        number_answer_reward(None, ["1", "2"], answer=["1"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7", 1.0), ("3 + 4 = 7", 1.0), ("it is 7.", 1.0), ("3 + 4 = 8", 0.0), ("7 or 8", 0.0), ("seven", 0.0),
     ("1,007", 0.0), ("", 0.0)],
)
def test_final_number_scores(text, expected):
    assert final_number_score(text, "7") == expected


def test_final_number_reward_is_registered_and_keeps_none():
    completions = [[{"role": "assistant", "content": "3 + 6 = 9"}], "so 8", "9"]
    assert final_number_reward(None, completions, answer=["9", "9", None]) == [1.0, 0.0, None]
    assert get_reward_function("final_number_reward") is final_number_reward
    with pytest.raises(ValueError, match="final_number_reward needs the ground truth"):
        final_number_reward(None, ["1"])
