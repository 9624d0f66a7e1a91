"""`hone ui`'s API through FastAPI's TestClient: browsing, guards, jobs (start, cancel, resume, serve), chat.

Jobs run a stand-in for `python -m honellm` (a small script that writes a run folder like the CLI does), so
cancelling and resuming are tested in seconds; the real CLI is driven from a browser in tests/e2e/test_ui_browser.py.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from honellm.errors import HoneError  # noqa: E402
from honellm.ui import catalog  # noqa: E402
from honellm.ui.app import create_app  # noqa: E402
from honellm.ui.config import UIConfig  # noqa: E402
from honellm.ui.jobs import StartRequest, build_argv  # noqa: E402

BASE = "http://127.0.0.1"

# Stands in for `python -m honellm ...`: writes config.yaml and metrics.jsonl into --out like a training run, then
# sleeps FAKE_HONE_SLEEP seconds (so a test can cancel it) and finishes. Records its argv and whether it saw a key.
FAKE_HONE = r'''
import json, os, sys, time
args = sys.argv[3:]  # after "-m honellm"
with open(os.environ["FAKE_HONE_LOG"], "a") as log:
    log.write(json.dumps({"argv": args, "key": os.environ.get("HONE_API_KEY")}) + "\n")
if args[0] == "serve":
    time.sleep(float(os.environ.get("FAKE_HONE_SLEEP", "0")))
    sys.exit(0)
out = args[args.index("--out") + 1]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "config.yaml"), "w") as f:
    f.write("method: lora\ntask: tiny-sentiment\ntask_source: %s\nconfig: {}\n" % args[1])
event = "resume" if "--resume" in args else "start"
with open(os.path.join(out, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"time": time.time(), "step": 0, "event": event, "total_steps": 2}) + "\n")
    f.flush()
    print("training", flush=True)
    if event == "start":
        time.sleep(float(os.environ.get("FAKE_HONE_SLEEP", "0")))
    f.write(json.dumps({"time": time.time(), "step": 1, "loss": 2.0}) + "\n")
    f.write(json.dumps({"time": time.time(), "step": 2, "loss": 1.5}) + "\n")
    f.write(json.dumps({"time": time.time(), "event": "done", "val_accuracy": 0.75}) + "\n")
'''


def wait_for(check, timeout: float = 60.0):
    """Poll `check()` until it returns something truthy (a bound on waiting, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, tmp_path_factory):
    """Two adapters with different random weights on the tiny model (nothing trained)."""
    from honellm.serve.testing import make_lora_artifact

    root = tmp_path_factory.mktemp("ui-artifacts")
    return (make_lora_artifact(tiny_model_dir, root / "a", seed=1, name="left-adapter"),
            make_lora_artifact(tiny_model_dir, root / "b", seed=2, name="right-adapter"))


@pytest.fixture
def workspace(tmp_path, tiny_model_dir, artifacts):
    """A folder as `hone ui` sees it: examples/ with the tiny task, and runs/ with one tune run and one compare run."""
    import shutil

    from honellm.compare.results import CompareRun, MethodResult
    from honellm.testing import make_tiny_task

    task = make_tiny_task(tmp_path / "examples", tiny_model_dir)
    runs = tmp_path / "runs"
    tune = runs / "tiny-sentiment" / "lora-20260101-000000"
    tune.mkdir(parents=True)
    (tune / "config.yaml").write_text(f"method: lora\ntask: tiny-sentiment\ntask_source: {task}\nconfig: {{}}\n")
    rows = [{"time": 1.0, "step": 0, "event": "start", "total_steps": 4},
            *({"time": 1.0 + s, "step": s, "loss": 3.0 - 0.5 * s} for s in range(1, 5)),
            {"time": 6.0, "step": 4, "event": "eval", "val_loss": 1.2, "val_accuracy": 0.8},
            {"time": 7.0, "event": "done", "val_accuracy": 0.8}]
    (tune / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tune / "log.txt").write_text("bar  10%\rbar  50%\rbar 100%\ndone\n")
    shutil.copytree(artifacts[0], tune / "artifact")
    manifest = json.loads((tune / "artifact" / "hone.json").read_text())
    manifest.update(task={"name": "tiny-sentiment", "source": str(task), "config": {"metric": "accuracy"}},
                    metrics={"val_accuracy": 0.8, "val_loss": 1.2}, cost={"train_seconds": 3.0, "trainable_params": 10})
    (tune / "artifact" / "hone.json").write_text(json.dumps(manifest))

    compare = runs / "tiny-sentiment" / "compare-20260101-000000"
    shutil.copytree(artifacts[1], compare / "lora" / "artifact")
    manifest = json.loads((compare / "lora" / "artifact" / "hone.json").read_text())
    manifest.update(task={"name": "tiny-sentiment", "config": {"metric": "accuracy"}}, metrics={"val_accuracy": 0.7})
    (compare / "lora" / "artifact" / "hone.json").write_text(json.dumps(manifest))
    run = CompareRun(compare, {"name": "tiny-sentiment", "source": str(task), "metric": "accuracy"},
                     ["zero-shot", "lora", "dpo"], "test", 60.0, None)
    run.results = {
        "zero-shot": MethodResult("zero-shot", "prompting", "done", metric="accuracy", score=0.5, ci_low=0.3,
                                  ci_high=0.7, n=10),
        "lora": MethodResult("lora", "tuning", "done", metric="accuracy", score=0.9, ci_low=0.7, ci_high=1.0, n=10,
                             artifact=str(compare / "lora" / "artifact"), train_seconds=5.0),
        "dpo": MethodResult("dpo", "reward", "skipped", reason="no preference pairs"),
    }
    run.recommendation = {"method": "lora", "family": "tuning", "reasons": ["best score"]}
    run.save()
    return tmp_path


@pytest.fixture
def fake_hone(tmp_path, monkeypatch):
    script = tmp_path / "fake_hone.py"
    script.write_text(FAKE_HONE)
    wrapper = tmp_path / "fake-python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "fake-hone.log"
    monkeypatch.setenv("FAKE_HONE_LOG", str(log))
    monkeypatch.delenv("HONE_API_KEY", raising=False)
    return wrapper, log


def client_for(workspace: Path, **config) -> TestClient:
    app = create_app(UIConfig(runs=str(workspace / "runs"), **config), cwd=workspace)
    return TestClient(app, base_url=BASE)


# ------------------------------------------------------------------------------------------------ browsing


def test_lists_tasks_runs_and_artifacts(workspace):
    with client_for(workspace) as client:
        page = client.get("/")
        assert page.status_code == 200 and "/static/app.js" in page.text
        assert client.get("/static/app.js").status_code == 200

        tasks = {(t["name"], t["kind"]) for t in client.get("/api/tasks").json()["tasks"]}
        assert {("intents", "built-in"), ("support_prefs", "built-in"), ("tiny-sentiment", "example")} <= tasks

        runs = {r["id"]: r for r in client.get("/api/runs").json()["runs"]}
        tune = runs["tiny-sentiment/lora-20260101-000000"]
        assert (tune["kind"], tune["status"], tune["score"], tune["metric"]) == ("train", "done", 0.8, "accuracy")
        assert tune["artifact"] == "tiny-sentiment/lora-20260101-000000/artifact"
        assert tune["progress"] == {"done": 4, "total": 4}
        compare = runs["tiny-sentiment/compare-20260101-000000"]
        assert (compare["kind"], compare["recommended"], compare["score"]) == ("compare", "lora", 0.9)
        assert compare["artifact"] == "tiny-sentiment/compare-20260101-000000/lora/artifact"
        assert not any(r.startswith("tiny-sentiment/compare-20260101-000000/") for r in runs)  # listed inside it

        names = {a["name"] for a in client.get("/api/artifacts").json()["artifacts"]}
        assert names == {"left-adapter", "right-adapter"}
        methods = client.get("/api/methods").json()
        assert "lora" in methods["tune"] and "dpo" in methods["align"]


def test_run_detail_streams_metrics_from_an_offset(workspace):
    with client_for(workspace) as client:
        first = client.get("/api/runs/tiny-sentiment/lora-20260101-000000").json()
        assert len(first["metrics"]) == first["metrics_next"] == 7
        assert first["log"].splitlines()[0] == "bar 100%"  # progress-bar redraws collapse to the last one
        assert first["artifact_info"]["name"] == "left-adapter"

        run = workspace / "runs" / "tiny-sentiment" / "lora-20260101-000000" / "metrics.jsonl"
        with open(run, "a") as handle:
            handle.write(json.dumps({"step": 5, "loss": 0.5}) + "\n")
        more = client.get("/api/runs/tiny-sentiment/lora-20260101-000000", params={"since": 7}).json()
        assert more["metrics"] == [{"step": 5, "loss": 0.5}] and more["metrics_next"] == 8


def test_compare_leaderboard_and_reports(workspace):
    with client_for(workspace) as client:
        detail = client.get("/api/runs/tiny-sentiment/compare-20260101-000000").json()
        board = detail["leaderboard"]
        assert [r["method"] for r in board["rows"]] == ["lora", "zero-shot", "dpo"]  # best first, skipped last
        assert board["recommendation"]["method"] == "lora"
        report = client.get("/api/runs/tiny-sentiment/compare-20260101-000000/report")
        assert report.status_code == 200 and "Hone report: tiny-sentiment" in report.text
        assert (workspace / "runs" / "tiny-sentiment" / "compare-20260101-000000" / "report.html").exists()
        assert client.get("/api/runs/tiny-sentiment/lora-20260101-000000/report").status_code == 404

        task_report = client.get("/api/tasks/tiny-sentiment/report")
        assert task_report.status_code == 200
        assert "lora-20260101-000000" in task_report.text and "compare-20260101-000000/lora" in task_report.text
        missing = client.get("/api/tasks/nothing/report")
        assert missing.status_code == 400 and "no finished run" in missing.json()["error"]["message"]


def test_paths_outside_the_runs_folder_are_refused(workspace):
    root = workspace / "runs"
    with pytest.raises(HoneError, match="outside the runs folder"):
        catalog.inside(root, "../examples")
    with pytest.raises(HoneError, match="outside the runs folder"):
        catalog.inside(root, "/etc")
    with client_for(workspace) as client:
        response = client.get("/api/runs/..%2Fexamples")
        assert response.status_code == 400 and "outside the runs folder" in response.json()["error"]["message"]
        chat = client.post("/api/chat", json={"artifacts": ["../examples"], "messages": [{"role": "user",
                                                                                         "content": "hi"}]})
        assert chat.status_code == 400


def test_api_key_is_checked_like_hone_serve(workspace):
    with client_for(workspace, api_key="s3cret") as client:
        assert client.get("/").status_code == 200  # the page itself holds nothing; it asks for the key
        missing = client.get("/api/runs")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
        wrong = client.get("/api/runs", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_foreign_hosts_and_non_json_posts_are_refused(workspace):
    with client_for(workspace) as client:
        rebound = client.get("/api/runs", headers={"Host": "evil.example:7860"})
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "bad_host"
        assert client.get("/api/runs", headers={"Host": "localhost:7860"}).status_code == 200
        assert client.get("/api/runs", headers={"Host": "[::1]:7860"}).status_code == 200
        form = client.post("/api/jobs", content=b"verb=tune", headers={"Content-Type": "text/plain"})
        assert form.status_code == 415
        bad = client.post("/api/jobs", json={"verb": "rm", "task": "intents"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "verb"


# ------------------------------------------------------------------------------------------------ jobs


def test_build_argv_for_each_verb(tmp_path):
    root = tmp_path / "runs"
    argv, run_dir = build_argv(StartRequest(verb="tune", task="t.yaml", method="lora", budget_seconds=90,
                                            overrides=["r=8"]), "my task", root)
    assert argv == ["tune", "t.yaml", "r=8", "--method", "lora", "--out", str(run_dir), "max_seconds=90"]
    assert run_dir.parent == root / "my-task" and run_dir.name.startswith("lora-")
    argv, run_dir = build_argv(StartRequest(verb="compare", task="intents", methods="zero-shot,lora",
                                            budget_seconds=600, limit=50), "intents", root)
    assert argv == ["compare", "intents", "--out", str(run_dir), "--methods", "zero-shot,lora", "--budget", "600s",
                    "--limit", "50"]
    argv, run_dir = build_argv(StartRequest(verb="prompt", task="intents", search=8, budget_seconds=120),
                               "intents", root)
    assert argv == ["prompt", "intents", "--search", "8", "--max-minutes", "2"] and run_dir is None
    argv, _ = build_argv(StartRequest(verb="align", task="support_prefs", method="dpo"), "support_prefs", root)
    assert argv[:4] == ["align", "support_prefs", "--method", "dpo"]
    with pytest.raises(HoneError, match="needs a method"):
        build_argv(StartRequest(verb="tune", task="intents"), "intents", root)
    with pytest.raises(HoneError, match="not a key=value override"):
        build_argv(StartRequest(verb="tune", task="intents", method="lora", overrides=["--force"]), "intents", root)


def test_start_cancel_and_resume_a_run(workspace, fake_hone, monkeypatch):
    python, log = fake_hone
    monkeypatch.setenv("FAKE_HONE_SLEEP", "60")
    with client_for(workspace, python=str(python)) as client:
        started = client.post("/api/jobs", json={"verb": "tune", "task": "examples/task.yaml", "method": "lora",
                                                 "overrides": ["max_steps=2"]}).json()
        assert started["state"] == "running" and started["task"] == "tiny-sentiment"
        assert started["run"].startswith("tiny-sentiment/lora-")
        job = wait_for(lambda: (j := client.get(f"/api/jobs/{started['id']}").json()).get("detail") and "training"
                       in j["output"] and j)
        assert job["detail"]["metrics"][0]["event"] == "start" and job["detail"]["status"] == "incomplete"
        assert any(r.get("job") and r["job"]["id"] == started["id"] for r in client.get("/api/runs").json()["runs"])
        run_page = client.get(f"/api/runs/{started['run']}").json()
        assert run_page["job"]["id"] == started["id"] and "training" in run_page["output"]

        client.post(f"/api/jobs/{started['id']}/cancel", json={})
        cancelled = wait_for(lambda: (j := client.get(f"/api/jobs/{started['id']}").json())["state"] != "running"
                             and j)
        assert cancelled["state"] == "cancelled" and cancelled["resumable"]

        resumed = client.post(f"/api/jobs/{started['id']}/resume", json={}).json()
        assert resumed["run"] == started["run"] and resumed["command"].endswith("--resume")
        done = wait_for(lambda: (j := client.get(f"/api/jobs/{resumed['id']}").json())["state"] != "running" and j)
        assert done["state"] == "finished", done["output"]
        events = [r.get("event") for r in done["detail"]["metrics"]]
        assert events == ["start", "resume", None, None, "done"]
    calls = [json.loads(line)["argv"] for line in log.read_text().splitlines()]
    assert calls[0][:3] == ["tune", "examples/task.yaml", "max_steps=2"]
    assert calls[1] == [*calls[0], "--resume"]


def test_prompt_jobs_cannot_resume_and_closing_stops_jobs(workspace, fake_hone, monkeypatch):
    python, _ = fake_hone
    monkeypatch.setenv("FAKE_HONE_SLEEP", "60")
    app = create_app(UIConfig(runs=str(workspace / "runs"), python=str(python)), cwd=workspace)
    with TestClient(app, base_url=BASE) as client:
        job = client.post("/api/jobs", json={"verb": "tune", "task": "intents", "method": "lora"}).json()
        process = app.state.hone.jobs.get(job["id"]).process
        refused = client.post(f"/api/jobs/{job['id']}/resume", json={})
        assert refused.status_code == 400 and "still running" in refused.json()["error"]["message"]
    assert process.poll() is not None  # the app's shutdown stopped its process group
    assert client.get("/api/jobs/nope").status_code == 404


def test_serve_the_winner_with_the_same_key(workspace, fake_hone, monkeypatch):
    python, log = fake_hone
    monkeypatch.setenv("FAKE_HONE_SLEEP", "30")
    headers = {"Authorization": "Bearer k3y"}
    with client_for(workspace, python=str(python), api_key="k3y") as client:
        artifact = "tiny-sentiment/compare-20260101-000000/lora/artifact"
        server = client.post("/api/serve", json={"artifact": artifact}, headers=headers).json()
        assert server["kind"] == "server" and server["url"].startswith("http://127.0.0.1:")
        wait_for(lambda: log.exists() and log.read_text())
        call = json.loads(log.read_text().splitlines()[0])
        assert call["argv"][:2] == ["serve", str(workspace / "runs" / artifact)]
        assert call["key"] == "k3y" and "k3y" not in call["argv"]  # in the environment, never on the command line
        client.post(f"/api/jobs/{server['id']}/cancel", json={}, headers=headers)
        wait_for(lambda: client.get(f"/api/jobs/{server['id']}", headers=headers).json()["state"] == "cancelled")
        bad = client.post("/api/serve", json={"artifact": "tiny-sentiment"}, headers=headers)
        assert bad.status_code == 404 and bad.json()["error"]["code"] == "artifact_not_found"


# ------------------------------------------------------------------------------------------------ chat


def test_chat_side_by_side_matches_each_artifact_alone(workspace):
    left = "tiny-sentiment/lora-20260101-000000/artifact"
    right = "tiny-sentiment/compare-20260101-000000/lora/artifact"
    messages = [{"role": "user", "content": "Review: a warm film"}]
    with client_for(workspace) as client:
        both = client.post("/api/chat", json={"artifacts": [left, right], "messages": messages, "max_tokens": 6})
        assert both.status_code == 200, both.text
        answers = both.json()["answers"]
        assert [a["name"] for a in answers] == ["left-adapter", "right-adapter"]
        assert all(a["completion_tokens"] >= 1 for a in answers)
        # Two adapters on one loaded base, switched per request, answer as each does alone (merged, greedy).
        alone = [client.post("/api/chat", json={"artifacts": [a], "messages": messages, "max_tokens": 6}).json()
                 ["answers"][0]["text"] for a in (left, right)]
        assert [a["text"] for a in answers] == alone
        assert alone[0] != alone[1]  # different adapters, different text: the switch really happened
        bad = client.post("/api/chat", json={"artifacts": [left], "messages": [{"role": "robot", "content": "x"}]})
        assert bad.status_code == 400


def test_cli_registers_hone_ui():
    from typer.testing import CliRunner

    from honellm.cli.app import app

    result = CliRunner().invoke(app, ["ui", "--help"], env={**os.environ, "COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--host", "--port", "--runs", "--api-key"):
        assert option in result.output



def test_a_taken_port_is_a_clear_error():
    import socket

    from honellm.ui import _check_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(HoneError, match="cannot listen on 127.0.0.1"):
            _check_port("127.0.0.1", taken.getsockname()[1])
