"""Rewards -> advantages, with TRL's GRPO semantics ("sum_then_normalize" aggregation).

aggregate_rewards: per-function rewards (N, F), NaN where a function returned None, -> one reward per completion (N,):
    weighted nansum over functions. A completion for which every function returned None is unscorable: like TRL, its
    reward is NaN (not 0, which would bias its group's baseline), a warning is logged, and compute_advantages gives
    it advantage 0 and leaves it out of the group statistics.
compute_advantages: rewards (N,) laid out as N / G consecutive groups of G = num_generations completions of one prompt.
    advantage = reward - nanmean(group); then divided by (std + 1e-4) where std is the group's std
    ("group"), the std over the whole batch ("batch"), or not divided ("none"); std is Bessel-corrected and ignores
    NaN, as TRL's nanstd. Beyond TRL (whose float rounding can leave ~1e-13 there): every completion of a group whose
    scorable rewards are all equal gets exactly 0, and NaN never leaves this module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from fusedrl.train.config_checks import SCALE_REWARDS

logger = logging.getLogger(__name__)

STD_EPS = 1e-4  # TRL's constant in advantages / (std + 1e-4)


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaN (TRL's nanstd); NaN where fewer than 2 values are present."""
    if dim is None:
        values, dim = values.reshape(-1), 0
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim)
    sq = torch.nansum((values - mean) ** 2, dim=dim)
    var = sq / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))


def aggregate_rewards(
    rewards_per_func: torch.Tensor, reward_weights: Sequence[float] | torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted nansum over reward functions: (N, F) with NaN for None -> (N,), NaN where all F are NaN."""
    if rewards_per_func.dim() != 2:
        raise ValueError(
            f"rewards_per_func must be 2-D (N completions, F functions), got shape {tuple(rewards_per_func.shape)}."
        )
    num_funcs = rewards_per_func.shape[1]
    rewards_per_func = rewards_per_func.float()
    if reward_weights is None:
        weights = torch.ones(num_funcs, dtype=torch.float32, device=rewards_per_func.device)
    else:
        weights = torch.as_tensor(reward_weights, dtype=torch.float32, device=rewards_per_func.device).reshape(-1)
        if weights.numel() != num_funcs:
            raise ValueError(
                f"reward_weights has {weights.numel()} entries but there are {num_funcs} reward functions; "
                "give one weight per reward function."
            )
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    if bool(unscorable.any()):
        rows = unscorable.nonzero(as_tuple=True)[0].tolist()
        logger.warning(
            "All reward functions returned None for %d completion(s) (rows %s); they get advantage 0. Make sure at "
            "least one reward function returns a value for every completion.",
            len(rows),
            rows[:10],
        )
        rewards = rewards.masked_fill(unscorable, float("nan"))
    return rewards


def compute_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str | bool = "group"
) -> tuple[torch.Tensor, dict[str, float]]:
    """Group-relative advantages (N,) float32 and stats {reward_mean, reward_std, frac_reward_zero_std,
    frac_reward_unscorable}. NaN rewards mark unscorable completions (see module docstring)."""
    if isinstance(scale_rewards, bool):
        scale_rewards = "group" if scale_rewards else "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {list(SCALE_REWARDS)}, got {scale_rewards!r}.")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}.")
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be an integer >= 1, got {num_generations!r}.")
    if rewards.numel() == 0 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, which is not a positive multiple of num_generations "
            f"({num_generations}); a batch must hold whole groups."
        )
    rewards = rewards.float()
    grouped = rewards.view(-1, num_generations)
    group_mean = torch.nanmean(grouped, dim=1, keepdim=True)

    if num_generations > 1:
        group_std = nanstd(grouped, dim=1).unsqueeze(1).expand_as(grouped)
    else:
        group_std = torch.zeros_like(grouped)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(grouped) if rewards.numel() > 1 else torch.zeros_like(grouped)
    else:  # "group"; for "none" the group std is used only for the zero-std statistic, as in TRL
        std = group_std

    advantages = grouped - group_mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)

    # Groups whose scorable rewards are all equal carry no signal: exactly 0 (float rounding of the mean can leave
    # tiny residues that the 1/(std + 1e-4) factor would amplify).
    big = torch.finfo(grouped.dtype).max
    group_max = torch.where(torch.isnan(grouped), -big, grouped).amax(dim=1, keepdim=True)
    group_min = torch.where(torch.isnan(grouped), big, grouped).amin(dim=1, keepdim=True)
    advantages = torch.where(group_max <= group_min, torch.zeros_like(advantages), advantages)
    advantages = torch.nan_to_num(advantages, nan=0.0, posinf=0.0, neginf=0.0).reshape(-1)

    # std is NaN where a group has < 2 scorable completions: such groups count as zero-std (no signal either).
    stats_std = torch.nan_to_num(std, nan=0.0)
    is_std_zero = torch.isclose(stats_std, torch.zeros_like(stats_std))
    scorable = ~torch.isnan(rewards)
    if bool(scorable.any()):
        reward_mean = float(rewards[scorable].mean())
        reward_std = float(torch.nan_to_num(nanstd(rewards), nan=0.0))
    else:
        reward_mean, reward_std = 0.0, 0.0
    stats = {
        "reward_mean": reward_mean,
        "reward_std": reward_std,
        "frac_reward_zero_std": float(is_std_zero.float().mean()),
        "frac_reward_unscorable": float((~scorable).float().mean()),
    }
    return advantages, stats
