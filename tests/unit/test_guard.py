"""The reward-hacking guard on scripted traces: it fires on hacking, at about the right step, and stays quiet when
training is healthy (noise included)."""

from __future__ import annotations

import random

import pydantic
import pytest
import torch

from honellm.reward.guard import (
    ALARM_KINDS,
    GuardConfig,
    RewardHackingGuard,
    distinct_n,
    mean_token_entropy,
    theil_sen_rise,
)

EVERY = 50


def healthy_trace(seed: int, n: int = 20) -> list[dict]:
    """Proxy and gold both rise, KL grows within budget, length, diversity and entropy stay put; all noisy."""
    rng = random.Random(seed)
    return [
        dict(
            step=i * EVERY,
            proxy_reward=0.2 + 0.03 * i + rng.gauss(0, 0.01),
            gold=0.3 + 0.02 * i + rng.gauss(0, 0.01),
            kl=0.3 * i + abs(rng.gauss(0, 0.2)),
            mean_length=100 + rng.gauss(0, 5),
            distinct_n=0.8 + rng.gauss(0, 0.02),
            entropy=1.5 - 0.02 * i + rng.gauss(0, 0.03),
        )
        for i in range(n)
    ]


def run(trace: list[dict], config: GuardConfig | None = None) -> RewardHackingGuard:
    guard = RewardHackingGuard(config)
    for point in trace:
        guard.observe(**point)
    return guard


def first(guard: RewardHackingGuard, kind: str):
    alarms = [a for a in guard.alarms if a.kind == kind]
    assert alarms, f"no {kind} alarm; got {[a.kind for a in guard.alarms]}"
    return alarms[0]


@pytest.mark.parametrize("seed", range(20))
def test_quiet_on_a_healthy_noisy_trace(seed):
    guard = run(healthy_trace(seed))
    assert guard.alarms == []
    assert guard.best_step is not None and guard.best_step >= 15 * EVERY  # gold keeps rising: late is best


@pytest.mark.parametrize("seed", range(5))
def test_quiet_when_both_signals_plateau(seed):
    rng = random.Random(seed)
    trace = [
        dict(step=i * EVERY, proxy_reward=0.7 + rng.gauss(0, 0.01), gold=0.6 + rng.gauss(0, 0.01))
        for i in range(20)
    ]
    assert run(trace).alarms == []


@pytest.mark.parametrize("seed", range(10))
def test_proxy_up_gold_down_fires_divergence_soon_after_the_turn(seed):
    """Gold peaks at check 10 (step 500) and then falls while the proxy keeps rising."""
    rng = random.Random(seed)
    trace = healthy_trace(seed)
    for i, point in enumerate(trace):
        gold = 0.3 + 0.02 * i if i <= 10 else 0.5 - 0.03 * (i - 10)
        point["gold"] = gold + rng.gauss(0, 0.01)
    guard = run(trace)
    alarm = first(guard, "proxy_gold_divergence")
    assert 10 * EVERY < alarm.step <= 14 * EVERY
    assert "gold" in alarm.message and alarm.values
    assert {a.kind for a in guard.alarms} == {"proxy_gold_divergence"}
    assert 9 * EVERY <= guard.best_step <= 11 * EVERY  # the checkpoint to keep is around the peak


def test_proxy_up_gold_flat_fires_divergence():
    rng = random.Random(0)
    trace = healthy_trace(0)
    for i, point in enumerate(trace):
        point["gold"] = (0.3 + 0.02 * min(i, 8)) + rng.gauss(0, 0.005)
    alarm = first(run(trace), "proxy_gold_divergence")
    assert 8 * EVERY < alarm.step <= 13 * EVERY


@pytest.mark.parametrize("seed", range(5))
def test_length_blow_up_fires_length_drift(seed):
    trace = healthy_trace(seed)
    for i, point in enumerate(trace):
        point["mean_length"] = 100 * (1.3 ** max(0, i - 8))  # doubles after about 3 checks past check 8
    guard = run(trace)
    alarm = first(guard, "length_drift")
    assert 10 * EVERY <= alarm.step <= 13 * EVERY
    assert alarm.values["ratio"] > 2
    assert {a.kind for a in guard.alarms} == {"length_drift"}


def test_length_collapse_fires_length_drift():
    trace = healthy_trace(0)
    for i, point in enumerate(trace):
        point["mean_length"] = 100 if i < 10 else 20
    assert first(run(trace), "length_drift").step in (10 * EVERY, 11 * EVERY)


def test_kl_budget():
    trace = healthy_trace(0)
    for i, point in enumerate(trace):
        point["kl"] = 1.0 * i
    guard = run(trace, GuardConfig(kl_budget=12.0))
    assert first(guard, "kl_budget").step == 13 * EVERY
    assert (
        len([a for a in guard.alarms if a.kind == "kl_budget"]) == 1
    )  # fires once while it stays past budget


def test_repetition_and_entropy_collapse():
    trace = healthy_trace(1)
    for i, point in enumerate(trace):
        point["distinct_n"] = 0.8 if i < 12 else 0.3
        point["entropy"] = 1.5 if i < 6 else 0.2
    guard = run(trace)
    assert first(guard, "repetition").step in (12 * EVERY, 13 * EVERY)
    assert first(guard, "entropy_collapse").step in (6 * EVERY, 7 * EVERY)


def test_entropy_floor():
    trace = [dict(step=i, proxy_reward=0.0, entropy=0.5 if i < 5 else 0.2) for i in range(10)]
    assert run(trace, GuardConfig(min_entropy_ratio=None)).alarms == []
    assert (
        first(run(trace, GuardConfig(min_entropy_ratio=None, entropy_floor=0.3)), "entropy_collapse").step
        >= 5
    )


def test_an_alarm_fires_again_after_it_cleared():
    guard = RewardHackingGuard(GuardConfig(kl_budget=1.0))
    kinds = [
        [a.kind for a in guard.observe(step, 0.0, kl=kl)] for step, kl in enumerate([0.5, 2.0, 3.0, 0.5, 2.0])
    ]
    assert kinds == [[], ["kl_budget"], [], [], ["kl_budget"]]


def test_action_stop_and_best_step_without_gold():
    guard = RewardHackingGuard(GuardConfig(action="stop", kl_budget=1.0))
    assert guard.best_step is None and not guard.should_stop
    guard.observe(0, 0.1, kl=0.1)
    guard.observe(10, 0.5, kl=0.2)
    guard.observe(20, 0.3, kl=0.3)
    assert guard.best_step == 10 and not guard.should_stop
    guard.observe(30, 0.9, kl=5.0)
    assert guard.should_stop
    summary = guard.summary()
    assert summary["best_step"] == 30 and summary["alarms"][0]["kind"] == "kl_budget"
    assert len(summary["history"]) == 4


def test_warn_never_stops():
    guard = RewardHackingGuard(GuardConfig(kl_budget=1.0))
    guard.observe(0, 0.0, kl=5.0)
    assert guard.alarms and not guard.should_stop


def test_config_is_strict_and_documented():
    with pytest.raises(pydantic.ValidationError, match="extra"):
        GuardConfig(kl_budjet=3)
    with pytest.raises(pydantic.ValidationError):
        GuardConfig(action="explode")
    for name, info in GuardConfig.model_fields.items():
        assert info.description, name
        assert not info.is_required(), name
    assert set(ALARM_KINDS) == {
        "proxy_gold_divergence",
        "kl_budget",
        "length_drift",
        "repetition",
        "entropy_collapse",
    }


def test_theil_sen_ignores_one_outlier():
    assert theil_sen_rise([0.0, 1.0, 2.0, 3.0, 4.0]) == pytest.approx(4.0)
    assert theil_sen_rise([0.0, 1.0, 20.0, 3.0, 4.0]) == pytest.approx(4.0)
    assert theil_sen_rise([1.0]) == 0.0


def test_distinct_n_by_hand():
    assert distinct_n(["a b c d"], 2) == 1.0
    assert distinct_n(["a a a a"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)  # ab, ba, ab | ab
    assert distinct_n(["", "x"], 2) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


def test_mean_token_entropy_matches_trl_and_by_hand():
    from trl.trainer.utils import entropy_from_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    mask = (torch.arange(5) < torch.tensor([[5], [2], [4]])).long()
    expected = (entropy_from_logits(logits) * mask).sum() / mask.sum()
    torch.testing.assert_close(mean_token_entropy(logits, mask), expected)
    uniform = torch.zeros(1, 2, 8)
    assert mean_token_entropy(uniform).item() == pytest.approx(torch.log(torch.tensor(8.0)).item())
    assert mean_token_entropy(logits.bfloat16(), mask).dtype == torch.float32
