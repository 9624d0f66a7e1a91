"""Online RL on the embedded SmolLM2-135M: a short GRPO and PPO run on the built-in arithmetic task.

Short on purpose (a CPU runs a step in tens of seconds): they check that the recipes run on a real chat model in
bf16, that the policy starts at the reference, and that the artifact evaluates. The learning curve itself is in
docs/reward.md (a longer run; see its command).
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from honellm.reward.recipes.grpo import GRPOConfig, grpo
from honellm.reward.recipes.ppo import PPOConfig, ppo
from honellm.runs import read_metrics
from honellm.task import Task

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def task(embedded_model_dir):
    return Task.load("arithmetic", [f"model={embedded_model_dir}"])


def test_grpo_runs_on_the_embedded_model_and_its_artifact_evaluates(task, tmp_path):
    from honellm.evaluation.evaluate import evaluate

    config = GRPOConfig(max_steps=1, prompts_per_step=2, group_size=4, max_new_tokens=16, guard_prompts=4,
                        eval_every=1, guard_temperature=0.0, dynamic_sampling=False)
    artifact = grpo(task, config, out=tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train"][0]
    # A fresh adapter adds exact zeros, and the policy and the reference (adapter disabled) take the same grouped
    # products, so the KL starts at 0 (in bf16, two differently grouped computations put it near 1e-3 here).
    assert train["kl"] < 1e-4 and [r for r in rows if r.get("kind") == "guard"][0]["kl"] < 1e-2
    assert train["generation_tokens_per_second"] > 0 and 0 < train["generation_share"] < 1
    result = evaluate(tmp_path / "run" / "artifact", task, "validation", limit=2, progress=False)
    assert result.n == 2 and result.metric == "numeric_match"
    assert artifact.manifest.cost["generated_tokens"] > 0


def test_ppo_runs_on_the_embedded_model(task, tmp_path):
    config = PPOConfig(max_steps=1, prompts_per_step=4, max_new_tokens=16, ppo_epochs=2, eval_every=0)
    artifact = ppo(task, config, out=tmp_path / "run")
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("kind") == "train"][0]
    assert train["updates"] == 2 and 0 <= train["clip_fraction"] <= 1
    for key in ("loss", "policy_loss", "value_loss", "approx_kl", "reward"):
        assert math.isfinite(train[key]), (key, train)
    # the value head sits on SmolLM2's hidden states (576 wide) and is saved finite; whether it moves from zero
    # depends on the rewards this short run draws (tests/unit/test_align_online_recipes.py checks that it trains)
    head = load_file(tmp_path / "run" / "artifact" / "value_head.safetensors")
    assert head["weight"].shape == (1, 576) and all(torch.isfinite(v).all() for v in head.values())
    assert artifact.kind == "adapter" and artifact.manifest.method == "ppo"
