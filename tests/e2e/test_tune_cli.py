"""`hone tune` as a user runs it, on the tiny model."""

from __future__ import annotations

import json

import pytest

from honellm.testing import make_tiny_task
from tests.e2e.helpers import hone


@pytest.fixture(scope="module")
def task_yaml(tiny_model_dir, tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("task"), tiny_model_dir)


def test_tune_writes_an_artifact_and_reports_its_cost(task_yaml, tmp_path):
    out = tmp_path / "run"
    result = hone("tune", task_yaml, "--method", "lora", "max_steps=4", "eval_every=2", "r=4", "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"artifact: {out / 'artifact'}" in result.stdout
    assert "trainable parameters:" in result.stdout and "tokens/s" in result.stdout and "peak memory" in result.stdout
    assert "best validation (step" in result.stdout and "accuracy" in result.stdout
    shown = hone("show", out / "artifact", "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["method"] == "lora" and info["kind"] == "adapter" and info["cost"]["trainable_params"] > 0
    again = hone("tune", task_yaml, "--method", "lora", "max_steps=4", "--out", out)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "lroa"], "did you mean 'lora'"),
    (["--method", "lora", "alpah=8"], "did you mean 'alpha'"),
    (["--method", "lora", "lr=fast"], "lr"),
    (["--method", "qlora"], "needs a CUDA GPU"),
])
def test_user_errors_are_one_clear_message(task_yaml, tmp_path, args, message):
    result = hone("tune", task_yaml, *args, "max_steps=1", "--out", tmp_path / "run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_methods_are_listed_with_their_settings():
    result = hone("tune", "--methods", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert {"lora", "dora", "ia3", "prompt_tuning", "full", "qlora"} <= set(rows)
    assert rows["lora"]["settings"]["r"]["default"] == 16 and rows["qlora"]["gpu_only"]
    assert not rows["prefix_tuning"]["merges"]
