"""compute_advantages and aggregate_rewards against a float64 re-derivation of TRL's formulas."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from fusedrl.train.advantages import aggregate_rewards, compute_advantages


def reference_advantages(rewards: list[float], g: int, scale: str) -> list[float]:
    """Plain-Python float64 TRL semantics (NaN = unscorable, excluded, advantage 0)."""

    def mean_std(values: list[float]) -> tuple[float, float]:
        vals = [v for v in values if not math.isnan(v)]
        if not vals:
            return math.nan, math.nan
        m = sum(vals) / len(vals)
        s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else math.nan
        return m, s

    _, batch_std = mean_std(rewards)
    out = []
    for start in range(0, len(rewards), g):
        group = rewards[start : start + g]
        m, s = mean_std(group)
        std = batch_std if scale == "batch" else s
        vals = [v for v in group if not math.isnan(v)]
        for v in group:
            if math.isnan(v) or len(set(vals)) <= 1:
                out.append(0.0)
                continue
            a = v - m
            if scale != "none":
                a = a / (std + 1e-4)
            out.append(0.0 if math.isnan(a) else a)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("groups,g", [(1, 2), (3, 5), (7, 3), (4, 16)])
def test_matches_reference(scale: str, groups: int, g: int) -> None:
    gen = torch.Generator().manual_seed(groups * 100 + g)
    rewards = torch.randn(groups * g, generator=gen, dtype=torch.float64) * 3
    adv, stats = compute_advantages(rewards.float(), g, scale)
    ref = torch.tensor(reference_advantages(rewards.float().double().tolist(), g, scale), dtype=torch.float64)
    assert adv.dtype == torch.float32 and adv.shape == (groups * g,)
    torch.testing.assert_close(adv.double(), ref, rtol=1e-5, atol=1e-5)
    assert stats["reward_mean"] == pytest.approx(float(rewards.mean()), rel=1e-5, abs=1e-6)
    assert stats["reward_std"] == pytest.approx(float(rewards.std()), rel=1e-5)
    assert stats["frac_reward_zero_std"] == 0.0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_reward_groups_get_exact_zero(scale: str) -> None:
    # 0.1 three times: the float mean is not exactly 0.1, yet advantages must be exactly 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, 2.0, 0.5, 0.0, 0.7, 0.7, 0.7])
    adv, stats = compute_advantages(rewards, 3, scale)
    assert torch.all(adv[:3] == 0) and torch.all(adv[6:] == 0)
    assert not torch.all(adv[3:6] == 0)
    assert torch.isfinite(adv).all()
    if scale != "batch":
        assert stats["frac_reward_zero_std"] == pytest.approx(2 / 3)


def test_group_scaling_gives_unit_std_and_zero_mean() -> None:
    rewards = torch.rand(6 * 8, generator=torch.Generator().manual_seed(3)) * 5
    adv, _ = compute_advantages(rewards, 8, "group")
    grouped = adv.view(6, 8).double()
    torch.testing.assert_close(grouped.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.all((grouped.std(1) - 1).abs() < 1e-2)


def test_unscorable_rows_excluded_and_zero() -> None:
    nan = float("nan")
    rewards = torch.tensor([1.0, nan, 3.0, nan, nan, nan, 2.0, nan, 2.0, 5.0, nan, nan])
    adv, stats = compute_advantages(rewards, 3, "group")
    ref = torch.tensor(reference_advantages(rewards.tolist(), 3, "group"))
    torch.testing.assert_close(adv, ref)
    assert torch.isfinite(adv).all()
    assert adv[1] == 0 and adv[3:6].eq(0).all() and adv[9:].eq(0).all()
    # group 0 baseline is mean(1, 3) = 2, not mean(1, 0, 3)
    assert adv[0] == pytest.approx(-1 / (math.sqrt(2) + 1e-4), rel=1e-6)
    assert stats["frac_reward_unscorable"] == pytest.approx(7 / 12)
    assert stats["reward_mean"] == pytest.approx((1 + 3 + 2 + 2 + 5) / 5)
    assert math.isfinite(stats["reward_std"])


def test_all_unscorable_batch_is_all_zero_with_finite_stats() -> None:
    adv, stats = compute_advantages(torch.full((4,), float("nan")), 2, "batch")
    assert torch.equal(adv, torch.zeros(4))
    assert all(math.isfinite(v) for v in stats.values())


def test_bool_scale_rewards_and_errors() -> None:
    rewards = torch.tensor([0.0, 1.0, 1.0, 3.0])
    torch.testing.assert_close(compute_advantages(rewards, 2, True)[0], compute_advantages(rewards, 2, "group")[0])
    torch.testing.assert_close(compute_advantages(rewards, 2, False)[0], torch.tensor([-0.5, 0.5, -1.0, 1.0]))
    with pytest.raises(ValueError, match="scale_rewards"):
        compute_advantages(rewards, 2, "std")
    with pytest.raises(ValueError, match="multiple of num_generations"):
        compute_advantages(rewards, 3, "group")
    with pytest.raises(ValueError, match="1-D"):
        compute_advantages(rewards.view(2, 2), 2, "group")


def test_aggregate_rewards_weighted_nansum(caplog: pytest.LogCaptureFixture) -> None:
    nan = float("nan")
    per_func = torch.tensor([[1.0, 2.0, 0.5], [nan, 2.0, nan], [nan, nan, nan], [0.0, 0.0, 0.0], [1.0, nan, 4.0]])
    weights = [2.0, 0.5, -1.0]
    with caplog.at_level(logging.WARNING, logger="fusedrl.train.advantages"):
        rewards = aggregate_rewards(per_func, weights)
    assert "All reward functions returned None" in caplog.text and "[2]" in caplog.text
    expected = torch.tensor([2.0 + 1.0 - 0.5, 1.0, nan, 0.0, 2.0 - 4.0])
    torch.testing.assert_close(rewards, expected, equal_nan=True)
    torch.testing.assert_close(aggregate_rewards(per_func[:2]), torch.tensor([3.5, 2.0]))


def test_aggregate_rewards_checks_weights() -> None:
    with pytest.raises(ValueError, match="one weight per reward function"):
        aggregate_rewards(torch.zeros(3, 2), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="2-D"):
        aggregate_rewards(torch.zeros(3), None)
