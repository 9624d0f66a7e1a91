"""`hone prompt` as a user runs it, on the tiny model: search table, artifact, and `hone eval` reproducing it."""

from __future__ import annotations

import csv
import json
import re

from tests.e2e.helpers import hone

FP32 = {"HONE_CPU_BF16": "0"}  # the tiny model runs faster in fp32


def test_prompt_search_then_eval_reproduces_the_score(tiny_model_dir, tmp_path):
    env = FP32 | {"HONE_RUNS": str(tmp_path / "runs")}
    art = tmp_path / "art"
    run = hone("prompt", "intents", "prompt.instructions=[]", "--model", tiny_model_dir, "--search", "2",
               "--max-examples", "4", "--propose", "0", "--out", art, env=env)
    assert run.returncode == 0, run.stderr
    assert "Prompt candidates (validation)" in run.stdout and "candidates:" in run.stdout
    found = re.search(r"validation accuracy: ([0-9.]+)", run.stdout)
    assert found, run.stdout
    table = next((tmp_path / "runs" / "intents").glob("prompt-search-*/candidates.csv"))
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 6 and {"instruction", "shots", "selector", "calibration", "score"} <= set(rows[0])
    assert (art / "hone.json").exists() and (art / "prompt.json").exists()

    again = hone("eval", art, "--split", "validation", "--limit", "4", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert round(json.loads(again.stdout)["score"], 4) == float(found.group(1))


def test_prompt_few_shot_with_calibration(tiny_model_dir, tmp_path):
    env = FP32 | {"HONE_RUNS": str(tmp_path / "runs")}
    run = hone("prompt", "intents", "--model", tiny_model_dir, "--shots", "2", "--selector", "bm25", "--calibrate",
               "--max-examples", "3", "--out", tmp_path / "art", env=env)
    assert run.returncode == 0, run.stderr
    assert "selector bm25 k=2 per query" in run.stdout and "calibrated" in run.stdout
    assert (tmp_path / "art" / "pool.jsonl").exists()
    show = hone("show", tmp_path / "art")
    assert show.returncode == 0 and "selector bm25 k=2" in show.stdout and "calibrated" in show.stdout


def test_prompt_user_errors(tiny_model_dir, tmp_path):
    bad = hone("prompt", "intents", "--model", tiny_model_dir, "--shots", "2", "--selector", "bm52",
               "--out", tmp_path / "a", env={"HONE_RUNS": str(tmp_path / "runs")})
    assert bad.returncode == 2 and "did you mean 'bm25'" in bad.stderr and "Traceback" not in bad.stderr
    no_val = hone("prompt", "intents", "data.validation=null", "--model", tiny_model_dir, "--search", "2",
                  "--out", tmp_path / "b", env={"HONE_RUNS": str(tmp_path / "runs")})
    assert no_val.returncode == 2 and "never scores on test" in no_val.stderr
