"""GSM8K tutorial reward functions and the extraction helpers they use."""

from __future__ import annotations

import random

import pytest

from fusedrl.rewards import REWARD_FUNCTIONS, get_reward_function
from fusedrl.rewards.extract import (
    completion_text,
    extract_hash_answer,
    extract_last_number,
    extract_xml_answer,
    parse_number,
)
from fusedrl.rewards.gsm8k import (
    correctness_reward,
    count_xml,
    int_reward,
    soft_format_reward,
    strict_format_reward,
    xmlcount_reward,
)

PERFECT = "<reasoning>\nStep one.\nStep two: 6 * 7 = 42.\n</reasoning>\n<answer>\n42\n</answer>\n"
LOOSE = "<reasoning>think\nmore</reasoning> <answer>42</answer> trailing words"
PLAIN = "The answer is 42."


def as_chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize("wrap", [lambda t: t, as_chat], ids=["string", "chat"])
def test_rewards_on_reference_completions(wrap) -> None:
    completions = [wrap(PERFECT), wrap(LOOSE), wrap(PLAIN), wrap(PERFECT.replace("42\n</answer>", "41\n</answer>"))]
    prompts = [[{"role": "user", "content": "q"}]] * len(completions)
    answer = ["42"] * len(completions)
    assert correctness_reward(prompts, completions, answer=answer) == [2.0, 2.0, 0.0, 0.0]
    assert int_reward(prompts, completions, answer=answer) == [0.5, 0.5, 0.0, 0.5]
    assert strict_format_reward(prompts, completions) == [0.5, 0.0, 0.0, 0.5]
    assert soft_format_reward(prompts, completions) == [0.5, 0.5, 0.0, 0.5]
    xml = xmlcount_reward(prompts, completions)
    assert xml[0] == pytest.approx(0.5) and xml[2] == 0.0 and xml[3] == pytest.approx(0.5)
    assert 0.0 <= xml[1] < 0.125


def test_correctness_is_exact_string_match_and_none_without_truth() -> None:
    completions = ["<answer> 1,000 </answer>", "<answer>1000</answer>", "<answer>1000</answer>"]
    assert correctness_reward(None, completions, answer=["1000", "1000", None]) == [0.0, 2.0, None]
    with pytest.raises(ValueError, match="align"):
        correctness_reward(None, completions, answer=["1"])
    with pytest.raises(ValueError, match="answer"):
        correctness_reward(None, completions)


def test_xmlcount_trailing_text_penalty() -> None:
    for extra in ("", "x", "abc def"):
        text = PERFECT + extra
        assert count_xml(text) == pytest.approx(0.5 - 2 * 0.001 * len(extra))
    assert count_xml("<reasoning>\n") == 0.125
    assert count_xml(PERFECT + PERFECT) == 0.0  # every tag twice: no credit


def test_random_completions_stay_in_range() -> None:
    rng = random.Random(0)
    pieces = ["<reasoning>", "</reasoning>", "<answer>", "</answer>", "\n", "12", "abc", " ", "-3"]
    completions = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 15))) for _ in range(200)]
    for func, top in ((int_reward, 0.5), (strict_format_reward, 0.5), (soft_format_reward, 0.5)):
        assert all(r in (0.0, top) for r in func(None, completions))
    assert all(r <= 0.5 for r in xmlcount_reward(None, completions))


def test_extract_helpers() -> None:
    assert extract_xml_answer("a <answer> 7 </answer> b") == "7"
    assert extract_xml_answer("<answer>1</answer><answer>2</answer>") == "2"
    assert extract_xml_answer("  no tags ") == "no tags"
    assert extract_hash_answer("He pays 3*4=12.\n#### 12") == "12"
    assert extract_hash_answer("no marker") is None
    assert parse_number("1,234") == 1234.0
    assert parse_number(" $12.50 ") == 12.5
    assert parse_number("42.") == 42.0
    assert parse_number("-3") == -3.0
    assert parse_number("15%") == 15.0
    for bad in ("", "12 apples", "abc", "1.2.3", "nan", "inf", None):
        assert parse_number(bad) is None
    assert extract_last_number("She had 3 then $1,250.") == 1250.0
    assert extract_last_number("nothing here") is None
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]) == "hi"
    with pytest.raises(TypeError, match="completion"):
        completion_text(42)


def test_registry() -> None:
    assert set(REWARD_FUNCTIONS) == {
        "correctness_reward",
        "int_reward",
        "strict_format_reward",
        "soft_format_reward",
        "xmlcount_reward",
        "proximity_reward",
        "number_answer_reward",
        "final_number_reward",
    }
    assert get_reward_function("int_reward") is int_reward
    with pytest.raises(ValueError, match="correctness_reward"):
        get_reward_function("correctnes_reward")
