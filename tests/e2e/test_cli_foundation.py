import json

import pytest

from tests.e2e.helpers import hone

VERBS = ["prompt", "tune", "align", "eval", "compare", "advise", "report", "serve", "export", "show", "demo", "data", "models"]


def test_help_lists_every_verb():
    result = hone("--help")
    assert result.returncode == 0
    for verb in VERBS:
        assert f"\n  {verb} " in result.stdout, verb


def test_models_lists_the_embedded_default():
    result = hone("models", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows[0]["name"] == "smollm2-135m-instruct" and rows[0]["kind"] == "embedded"
    assert rows[0]["parameters"] > 100_000_000


def test_data_check_sst2_counts_and_token_stats(shared_data):
    result = hone("data", "check", "examples/sst2.yaml", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    splits = {s["name"]: s for s in report["splits"]}
    assert splits["train"]["records"] == 500 and splits["validation"]["records"] == 100
    assert splits["train"]["lengths"]["prompt"]["mean"] > 10


def test_data_check_names_bad_lines_and_missing_field(tmp_path):
    rows = []
    for i in range(1, 16):
        if i == 7:
            rows.append('{"prompt": "broken", "chosen": ')
        elif i == 12:
            rows.append(json.dumps({"prompt": f"q{i}", "rejected": "no"}))
        else:
            rows.append(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}))
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    result = hone("data", "check", path)
    assert result.returncode != 0
    assert f"{path}:7" in result.stdout and "not valid JSON" in result.stdout
    assert f"{path}:12" in result.stdout and "[chosen]" in result.stdout and "missing" in result.stdout
    assert "format: preference" in result.stdout
    assert "Traceback" not in result.stderr


def test_user_errors_are_one_clear_message_without_traceback(tmp_path):
    result = hone("data", "check", tmp_path / "missing.jsonl")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not found" in result.stderr
    bad = tmp_path / "t.yaml"
    bad.write_text("data: {train: x.jsonl}\nprompt: {tempalte: x}\n")
    result = hone("data", "check", bad)
    assert result.returncode == 2 and "did you mean 'template'" in result.stderr and f"{bad}:2" in result.stderr


@pytest.mark.parametrize("verb", ["nonexistent-verb"])
def test_unknown_verb_fails(verb):
    assert hone(verb).returncode != 0
