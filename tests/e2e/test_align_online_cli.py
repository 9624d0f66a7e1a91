"""`hone align` with the online methods (grpo, rloo, ppo, rft, best_of_n), as a user runs them, on the tiny model
through the built-in arithmetic task (`model=<dir>` overrides the task's model)."""

from __future__ import annotations

import json
import math

import pytest

from honellm.runs import read_metrics
from honellm.testing import make_tiny_preference_task
from tests.e2e.helpers import hone

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the tiny model is fastest on one thread, and a busy machine punishes two
ROLLOUTS = ["max_steps=2", "prompts_per_step=2", "group_size=2", "max_new_tokens=4", "guard_prompts=2",
            "eval_every=1", "r=4"]
METHODS = {
    "grpo": ROLLOUTS + ["kl_coef=0.1", "guard.action=stop"],
    "rloo": ROLLOUTS,
    "ppo": ROLLOUTS + ["ppo_epochs=2"],
    "rft": ["n=2", "max_steps=1", "max_new_tokens=4", "eval_prompts=2", "min_reward=null", "prompts_per_round=4",
            "r=4"],
    "best_of_n": ["n=2", "eval_limit=2"],
}


def _align(tiny_model_dir, method, out, *extra):
    return hone("align", "arithmetic", f"model={tiny_model_dir}", "--method", method, *METHODS[method], *extra,
                "--out", out, env=ONE_THREAD)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_online_method_runs_from_the_cli(tiny_model_dir, tmp_path, method):
    out = tmp_path / "run"
    result = _align(tiny_model_dir, method, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"artifact: {out / 'artifact'}" in result.stdout
    manifest = json.loads((out / "artifact" / "hone.json").read_text())
    assert manifest["method"] == method
    rows = read_metrics(out / "metrics.jsonl")
    if method == "best_of_n":
        assert manifest["inference"]["best_of_n"]["n"] == 2 and "validation" in manifest["metrics"]
        return
    assert (out / "artifact" / "adapter" / "adapter_config.json").exists()
    train = [r for r in rows if r.get("kind") == "train"]
    assert train and all("loss" in r and "reward" in r for r in train)
    if method in ("grpo", "rloo", "ppo"):
        assert [r["step"] for r in rows if r.get("kind") == "guard"] == [0, 1, 2]
        assert [r for r in rows if r.get("kind") == "guard_summary"]
        assert {"generation_share", "generation_tokens_per_second", "training_tokens_per_second"} <= set(train[0])
    if method == "ppo":  # the value head beside the adapter: one output over the tiny model's hidden states
        from safetensors.torch import load_file

        head = load_file(out / "artifact" / "value_head.safetensors")
        hidden = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
        assert head["weight"].shape == (1, hidden) and head["bias"].shape == (1,)
        assert all(bool(v.isfinite().all()) for v in head.values())
        assert all(math.isfinite(r["value_loss"]) and math.isfinite(r["policy_loss"]) for r in train)


def test_a_best_of_n_artifact_samples_n_when_evaluated(tiny_model_dir, tmp_path):
    out = tmp_path / "bon"
    assert _align(tiny_model_dir, "best_of_n", out, "eval_limit=0").returncode == 0
    result = hone("eval", out / "artifact", f"model={tiny_model_dir}", "--task", "arithmetic", "--split",
                  "validation", "--limit", "3", "--json", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    # every request paid for n = 2 samples of up to 48 tokens (the task's max_new_tokens)
    assert summary["n"] == 3 and summary["cost"]["completion_tokens_per_example"] > 48


def test_ppo_trains_on_a_reward_model(tiny_model_dir, tmp_path):
    prefs = make_tiny_preference_task(tmp_path / "prefs", tiny_model_dir)
    rm = tmp_path / "rm"
    made = hone("align", prefs, "--method", "reward_model", "max_steps=2", "r=4", "--out", rm, env=ONE_THREAD)
    assert made.returncode == 0, made.stderr[-3000:]
    result = _align(tiny_model_dir, "ppo", tmp_path / "ppo", f"reward_model={rm / 'artifact'}", "task_rewards=false")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    start = [r for r in rows if r.get("event") == "start"][0]
    assert start["proxy_reward"] == ["reward_model"]
    assert all("rewards/reward_model" in r for r in rows if r.get("kind") == "train")


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "grpoo"], "did you mean 'grpo'"),
    (["--method", "grpo", "grad_accum=2"], "grad_accum is not used by online RL"),
    (["--method", "rloo", "group_size=1"], "group_size"),
    (["--method", "grpo", "guard.acton=stop"], "did you mean 'action'"),
])
def test_user_errors_are_one_clear_message(tiny_model_dir, tmp_path, args, message):
    result = hone("align", "arithmetic", f"model={tiny_model_dir}", *args, "max_steps=1", "--out", tmp_path / "run",
                  env=ONE_THREAD)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
