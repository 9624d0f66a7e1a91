"""`hone eval` as a user runs it, on the tiny model: the table, eval.json, overwrite rules, artifacts, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.helpers import hone


@pytest.fixture(scope="module")
def needs_engine():
    import honellm

    here = Path(honellm.__file__).parent
    if not ((here / "generation.py").exists() or (here / "generation").is_dir()):
        pytest.skip("the generation engine (branch gen) has not landed")


def test_eval_model_prints_the_table_and_writes_eval_json(tiny_model_dir, tmp_path, needs_engine):
    out = tmp_path / "ev"
    run = hone("eval", tiny_model_dir, "--task", "intents", "--split", "validation", "--limit", "6", "--out", out)
    assert run.returncode == 0, run.stderr
    for text in ("accuracy", "95% CI", "prompt tok/ex", "acc_norm", "wrote"):
        assert text in run.stdout
    data = json.loads((out / "eval.json").read_text())
    assert data["n"] == 6 and data["metric"] == "accuracy" and data["mode"] == "choices"
    assert len(data["records"]) == 6 and data["ci95"][0] <= data["score"] <= data["ci95"][1]

    again = hone("eval", tiny_model_dir, "--task", "intents", "--split", "validation", "--limit", "6", "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert "Traceback" not in again.stderr
    forced = hone("eval", tiny_model_dir, "--task", "intents", "--split", "validation", "--limit", "6", "--out", out,
                  "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["score"] == data["score"]


def test_eval_artifact_writes_into_it_and_show_reports_the_score(tiny_model_dir, tmp_path, needs_engine):
    from honellm.artifact import Artifact
    from honellm.task import Task

    task = Task.load("intents")
    art_dir = Artifact.zero_shot(str(tiny_model_dir), task).save(tmp_path / "art")
    run = hone("eval", art_dir, "--split", "validation", "--limit", "4")  # the task comes from the manifest
    assert run.returncode == 0, run.stderr
    assert (art_dir / "eval.json").exists()
    manifest = json.loads((art_dir / "hone.json").read_text())
    assert manifest["metrics"]["validation"]["metric"] == "accuracy"
    assert manifest["metrics"]["validation"]["n"] == 4
    show = hone("show", art_dir)
    assert show.returncode == 0, show.stderr
    assert "validation" in show.stdout and "accuracy" in show.stdout


def test_eval_without_a_model_run_folder(tiny_model_dir, tmp_path, needs_engine):
    run = hone("eval", tiny_model_dir, "--task", "support_prefs", "--split", "validation", "--limit", "3",
               env={"HONE_RUNS": str(tmp_path / "runs")})
    assert run.returncode == 0, run.stderr
    found = list((tmp_path / "runs" / "support_prefs").glob("eval-*/eval.json"))
    assert len(found) == 1
    assert json.loads(found[0].read_text())["metric"] == "preference_accuracy"


def test_eval_user_errors_have_no_traceback(tiny_model_dir, tmp_path):
    missing_split = hone("eval", tiny_model_dir, "--task", "support_prefs", "data.test=null")
    assert missing_split.returncode == 2 and "has no test split" in missing_split.stderr
    assert "Traceback" not in missing_split.stderr
    no_task = hone("eval", tiny_model_dir)
    assert no_task.returncode == 2 and "--task" in no_task.stderr
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "eval.json").write_text("{}")
    exists = hone("eval", tiny_model_dir, "--task", "intents", "--out", tmp_path / "o")
    assert exists.returncode == 2 and "already exists" in exists.stderr


def test_eval_data_scores_a_held_out_file_and_names_the_line_of_a_bad_record(tiny_model_dir, tmp_path, needs_engine):
    from honellm.artifact import Artifact
    from honellm.task import Task

    art_dir = Artifact.zero_shot(str(tiny_model_dir), Task.load("intents")).save(tmp_path / "art")
    mine = [{"text": "my card was charged twice", "label": "billing"},
            {"text": "the parcel never came", "label": "shipping"},
            {"text": "please close my account", "label": "cancel"}]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mine))
    run = hone("eval", art_dir, "--data", tmp_path / "mine.jsonl", "--json")  # the task from the manifest
    assert run.returncode == 0, run.stderr
    data = json.loads((art_dir / "eval-mine.json").read_text())
    assert data["n"] == 3 and data["config"]["data"] == str(tmp_path / "mine.jsonl")
    assert [r["reference"] for r in data["records"]] == ["billing", "shipping", "cancel"]
    assert not (art_dir / "eval.json").exists()  # the task's own test score is not replaced
    manifest = json.loads((art_dir / "hone.json").read_text())
    assert manifest["metrics"]["file:mine.jsonl"]["n"] == 3 and "test" not in manifest["metrics"]

    (tmp_path / "bad.jsonl").write_text(json.dumps(mine[0]) + "\n" + json.dumps({"text": "hi", "label": "x"}) + "\n")
    bad = hone("eval", art_dir, "--data", tmp_path / "bad.jsonl")
    assert bad.returncode == 2 and f"{tmp_path / 'bad.jsonl'}:2" in bad.stderr and "not one of the choices" in bad.stderr
    assert "Traceback" not in bad.stderr
    skipped = hone("eval", art_dir, "--data", tmp_path / "bad.jsonl", "--skip-invalid", "--json")
    assert skipped.returncode == 0, skipped.stderr
    assert json.loads(skipped.stdout)["n"] == 1
    missing = hone("eval", art_dir, "--data", tmp_path / "nope.jsonl")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
