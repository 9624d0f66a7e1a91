"""`hone compare`, `hone report` and `hone demo` as a user runs them."""

from __future__ import annotations

import json

import pytest

from honellm.testing import make_tiny_task
from tests.e2e.helpers import hone


@pytest.fixture(scope="module")
def task_yaml(tiny_model_dir, tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("task"), tiny_model_dir, n_train=40, n_validation=12)


def test_compare_prints_the_leaderboard_and_writes_the_report(task_yaml, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", task_yaml, "--methods", "zero-shot,few-shot,lora,kto", "--set", "lora:max_steps=2",
            "--set", "lora:r=4", "--set", "few-shot:shots=2", "--budget", "5m", "--out", out]
    result = hone(*args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    assert "accuracy" in header and "95% CI" in header and "latency/req" in header and "trainable" in header
    assert any(line.startswith("lora ") for line in lines) and any(line.startswith("zero-shot ") for line in lines)
    assert any(line.startswith("kto") and "skipped" in line for line in lines)
    assert "recommended:" in result.stdout and f"report: {out / 'report.html'}" in result.stdout
    saved = json.loads((out / "compare.json").read_text())
    assert saved["budget_seconds"] == 300 and saved["results"]["lora"]["status"] == "done"
    page = (out / "report.html").read_text()
    assert "<h2>Leaderboard</h2>" in page and "data:image/png;base64," in page

    again = hone(*args, "--resume")  # every finished method is reused
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "compare.json").read_text())["results"]["lora"] == saved["results"]["lora"]
    report = hone("report", out, "--out", tmp_path / "r.html")
    assert report.returncode == 0 and (tmp_path / "r.html").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--methods", "zero-shot,lorra"], "did you mean 'lora'"),
    (["--budget", "soon"], "cannot read the budget"),
    (["--set", "r=4"], "METHOD:KEY=VALUE"),
])
def test_user_errors_are_one_clear_message(task_yaml, tmp_path, args, message):
    result = hone("compare", task_yaml, *args, "--out", tmp_path / "cmp")
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_report_of_a_folder_that_is_not_a_compare_run(tmp_path):
    result = hone("report", tmp_path)
    assert result.returncode != 0 and "no compare.json" in result.stderr and "Traceback" not in result.stderr


def test_demo_runs_the_main_job_on_the_embedded_model(embedded_model_dir, tmp_path):
    """`hone demo` on the built-in classification task (judged on 40 test examples to keep CI short)."""
    out = tmp_path / "demo"
    result = hone("demo", "--tasks", "intents", "--limit", "40", "--out", out, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "demo finished in" in result.stdout and f"report: {out / 'report.html'}" in result.stdout
    results = json.loads((out / "intents" / "compare.json").read_text())["results"]
    assert {m: r["status"] for m, r in results.items()} == {"zero-shot": "done", "few-shot": "done", "lora": "done"}
    assert results["lora"]["score"] > results["zero-shot"]["score"]  # the tuned method beats zero-shot
    page = (out / "report.html").read_text()
    assert "Task: intents" in page and "<h2>Leaderboard</h2>" in page
