"""Reward functions with TRL's signature f(prompts, completions, **kwargs) -> list[float | None].

REWARD_FUNCTIONS maps the names used in TOML configs (each function's __name__, which is also the name TRL-style
logging uses) to the functions; get_reward_function(name) looks one up with a helpful error.
"""

from __future__ import annotations

import difflib

from fusedrl.rewards.arithmetic import final_number_reward, number_answer_reward
from fusedrl.rewards.gsm8k import (
    correctness_reward,
    int_reward,
    soft_format_reward,
    strict_format_reward,
    xmlcount_reward,
)
from fusedrl.rewards.proximity import RewardFunction, make_proximity_reward, proximity_reward

REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    f.__name__: f
    for f in (
        correctness_reward,
        int_reward,
        strict_format_reward,
        soft_format_reward,
        xmlcount_reward,
        proximity_reward,
        number_answer_reward,
        final_number_reward,
    )
}


def get_reward_function(name: str) -> RewardFunction:
    """The registered reward function called `name`; ValueError listing close names otherwise."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    close = difflib.get_close_matches(name, list(REWARD_FUNCTIONS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"Unknown reward function {name!r}.{hint} Known: {sorted(REWARD_FUNCTIONS)}.")


__all__ = [
    "REWARD_FUNCTIONS",
    "RewardFunction",
    "correctness_reward",
    "final_number_reward",
    "get_reward_function",
    "int_reward",
    "make_proximity_reward",
    "number_answer_reward",
    "proximity_reward",
    "soft_format_reward",
    "strict_format_reward",
    "xmlcount_reward",
]
