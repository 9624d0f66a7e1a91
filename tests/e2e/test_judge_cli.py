"""Training a judge from the CLI and scoring an open-ended task with it, on the tiny model: `hone align TASK
--method judge` writes the artifact and metrics.jsonl with agreement lines; a task with `metric: judge_win_rate`
naming that artifact (relative to the task) and calibration pairs trains with `hone tune` and scores with
`hone eval`; a task without pairs is one clear error."""

from __future__ import annotations

import json

import pytest

from honellm.runs import read_metrics
from honellm.testing import make_tiny_preference_task, make_tiny_task
from tests.e2e.helpers import hone

SHORT = "pairwise_prompt={prompt}\nA: {a}\nB: {b}"


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A judge trained from the CLI on the tiny preference task: (task folder, run folder, the CLI's result)."""
    folder = tmp_path_factory.mktemp("judge")
    task_yaml = make_tiny_preference_task(folder / "prefs", tiny_model_dir, n_train=16, n_validation=8)
    out = folder / "run"
    result = hone("align", task_yaml, "--method", "judge", "max_steps=2", "eval_every=1", "batch_size=4", "r=4",
                  "lr=1e-2", SHORT, "--out", out)
    return task_yaml.parent, out, result


def test_hone_align_trains_a_judge(trained):
    _, out, result = trained
    assert result.returncode == 0, result.stderr
    assert f"artifact: {out / 'artifact'}" in result.stdout and "agreement" in result.stdout
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    evals = [r for r in rows if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals:
        assert 0 <= r["val_agreement"] <= 1 and 0 <= r["val_position_bias"] <= 1 and r["val_loss"] > 0
    manifest = json.loads((out / "artifact" / "hone.json").read_text())
    assert manifest["method"] == "judge" and manifest["kind"] == "adapter"
    assert manifest["judge"]["pairwise_prompt"] == "{prompt}\nA: {a}\nB: {b}"


def test_an_open_ended_task_tunes_and_evaluates_with_the_judge(trained, tiny_model_dir, tmp_path):
    prefs, out, _ = trained
    task = tmp_path / "replies.yaml"
    task.write_text(
        "name: replies\n"
        f"model: {tiny_model_dir}\n"
        f"data: {{train: {prefs / 'train.jsonl'}, validation: {prefs / 'validation.jsonl'}, format: fields}}\n"
        "prompt: {system: Reply., template: '{prompt}'}\n"
        "target: chosen\n"
        "metric: judge_win_rate\n"
        f"judge: {{model: {out.name}/artifact, calibration: '{prefs.name}/validation.jsonl', force: true}}\n"
        "generation: {max_new_tokens: 2}\n")
    (tmp_path / out.name).symlink_to(out)  # the judge's folder, relative to the task
    (tmp_path / prefs.name).symlink_to(prefs)

    result = hone("eval", tiny_model_dir, "--task", task, "--split", "validation", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["metric"] == "judge_win_rate" and summary["n"] == 8
    assert summary["ci95"][0] <= summary["score"] <= summary["ci95"][1]
    assert summary["extras"]["judge"] == str((out / "artifact").resolve())
    assert summary["extras"]["judge_calibration_pairs"] == 8

    sft = tmp_path / "sft"
    result = hone("tune", task, "--method", "lora", "max_steps=2", "eval_every=2", "batch_size=4", "--out", sft)
    assert result.returncode == 0, result.stderr
    evals = [r for r in read_metrics(sft / "metrics.jsonl") if r.get("event") == "eval"]
    assert len(evals) == 1 and 0 <= evals[0]["val_judge_win_rate"] <= 1  # SFT on prompt -> chosen, judged


def test_a_task_without_pairs_is_one_clear_error(tiny_model_dir, tmp_path):
    task_yaml = make_tiny_task(tmp_path / "sft", tiny_model_dir)
    result = hone("align", task_yaml, "--method", "judge", "max_steps=1", "--out", tmp_path / "run")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "judge trains on preference data" in result.stderr + result.stdout
