"""`hone align` as a user runs it, on the tiny model: every offline method trains a few steps from the CLI, writes
its metrics and artifact, resumes, and `hone eval` scores the artifact; user errors are one clear message."""

from __future__ import annotations

import json

import pytest

from honellm.runs import read_metrics
from honellm.testing import make_tiny_preference_task, make_tiny_task
from tests.e2e.helpers import hone

METHODS = ["reward_model", "dpo", "ipo", "cdpo", "kto", "orpo", "simpo"]
QUICK = ["max_steps=2", "eval_every=2", "batch_size=4", "r=4", "lr=1e-2"]


@pytest.fixture(scope="module")
def task_yaml(tiny_model_dir, tmp_path_factory):
    return make_tiny_preference_task(tmp_path_factory.mktemp("prefs"), tiny_model_dir)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_from_the_cli(task_yaml, tmp_path, method):
    out = tmp_path / "run"
    result = hone("align", task_yaml, "--method", method, *QUICK, "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"artifact: {out / 'artifact'}" in result.stdout
    assert "trainable parameters:" in result.stdout and "tokens/s" in result.stdout
    assert "best validation (step" in result.stdout and "accuracy" in result.stdout
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "tokens_per_second"):
        assert all(key in r for r in steps), key
    info = json.loads(hone("show", out / "artifact", "--json").stdout)
    assert info["method"] == method and info["kind"] == ("reward_model" if method == "reward_model" else "adapter")


@pytest.mark.parametrize("method", ["dpo", "reward_model"])
def test_hone_eval_scores_the_artifact_on_held_out_pairs(task_yaml, tmp_path, method):
    out = tmp_path / "run"
    assert hone("align", task_yaml, "--method", method, *QUICK, "--out", out).returncode == 0
    result = hone("eval", out / "artifact", "--split", "validation", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["metric"] == "preference_accuracy" and summary["n"] == 16
    assert summary["ci95"][0] <= summary["score"] <= summary["ci95"][1]
    scorer = {"dpo": "implicit_reward_margins", "reward_model": "reward_model_margins"}[method]
    assert summary["extras"]["preference_scorer"] == scorer


def test_resume_continues_from_the_last_checkpoint(task_yaml, tmp_path):
    out = tmp_path / "run"
    args = ["--method", "dpo", "max_steps=4", "save_every=2", "eval_every=0", "batch_size=4", "r=4", "--out", out]
    assert hone("align", task_yaml, *args).returncode == 0
    again = hone("align", task_yaml, *args)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    resumed = hone("align", task_yaml, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    rows = read_metrics(out / "metrics.jsonl")
    assert next(r for r in rows if r.get("event") == "resume")["step"] == 2
    changed = hone("align", task_yaml, *args, "beta=0.5", "--resume")
    assert changed.returncode == 2 and "beta" in changed.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "dpoo"], "did you mean 'dpo'"),
    (["--method", "dpo", "betta=0.2"], "did you mean 'beta'"),
    (["--method", "dpo", "beta=-1"], "beta"),
    (["--method", "simpo", "adapter=ia3"], "adapter"),
    ([], "no align method given"),
])
def test_user_errors_are_one_clear_message(task_yaml, tmp_path, args, message):
    result = hone("align", task_yaml, *args, "max_steps=1", "--out", tmp_path / "run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_task_without_pairs_is_refused(tiny_model_dir, tmp_path):
    sft = make_tiny_task(tmp_path / "sft", tiny_model_dir)
    result = hone("align", sft, "--method", "dpo", "max_steps=1", "--out", tmp_path / "run")
    assert result.returncode == 2 and "preference data" in result.stderr and "Traceback" not in result.stderr


def test_methods_are_listed_with_their_settings():
    result = hone("align", "--methods", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(METHODS) <= set(rows)
    assert rows["dpo"]["settings"]["beta"]["default"] == 0.1 and rows["simpo"]["settings"]["gamma"]["default"] == 1.0
    assert rows["kto"]["data"] == ["preference", "unpaired"]
    text = hone("align", "--methods")
    assert "dpo: direct preference optimisation" in text.stdout and "beta=0.1" in text.stdout
