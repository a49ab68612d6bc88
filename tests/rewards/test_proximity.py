"""Numeric proximity reward: exact -> max, smooth decay with relative error, 0 without a number, None without truth."""

from __future__ import annotations

import math
import random

import pytest

from fusedrl.rewards.proximity import make_proximity_reward, predicted_number, proximity_reward, proximity_score


def test_exact_and_decay() -> None:
    completions = ["<answer>100</answer>", "<answer>110</answer>", "<answer>90</answer>", "<answer>200</answer>"]
    rewards = proximity_reward(None, completions, answer=["100"] * 4)
    assert rewards[0] == 1.0
    assert rewards[1] == pytest.approx(math.exp(-1)) and rewards[2] == pytest.approx(math.exp(-1))
    assert rewards[3] == pytest.approx(math.exp(-10))


def test_small_truths_use_absolute_error() -> None:
    # |t| < 1: rel_error = |p - t| / 1
    assert proximity_score(0.5, 0.0) == pytest.approx(math.exp(-5))
    assert proximity_score(0.0, 0.0) == 1.0


def test_monotone_and_bounded_on_random_inputs() -> None:
    rng = random.Random(1)
    for _ in range(300):
        truth = rng.uniform(-1e4, 1e4)
        near, far = sorted([abs(rng.gauss(0, 50)), abs(rng.gauss(0, 50))])
        r_near, r_far = proximity_score(truth + near, truth), proximity_score(truth - far, truth)
        assert 0.0 <= r_far <= r_near <= 1.0


def test_unparsable_prediction_and_truth() -> None:
    completions = ["no digits at all", "<answer>12</answer>", "Reasoning... total is $1,200."]
    rewards = proximity_reward(None, completions, answer=["12", "twelve", "1200"])
    assert rewards == [0.0, None, 1.0]


def test_answer_block_preferred_over_last_number() -> None:
    assert predicted_number("3 + 4 = 7 <answer>7</answer> (checked 9 times)") == 7.0
    assert predicted_number("<answer>seven</answer> so 8") == 8.0


def test_chat_completions_and_custom_scale() -> None:
    reward = make_proximity_reward(scale=0.5, max_reward=2.0)
    out = reward(None, [[{"role": "assistant", "content": "<answer>15</answer>"}]], answer=["10"])
    assert out[0] == pytest.approx(2.0 * math.exp(-0.5 / 0.5))
    with pytest.raises(ValueError, match="scale"):
        make_proximity_reward(scale=0.0)
    with pytest.raises(ValueError, match="align"):
        reward(None, ["1", "2"], answer=["1"])
