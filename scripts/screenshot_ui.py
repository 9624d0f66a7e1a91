#!/usr/bin/env python3
"""Start `hone ui` on a tiny random model, make a few runs through it, and save a PNG of each page.

    python scripts/screenshot_ui.py OUT_DIR [--runs RUNS_DIR] [--width 1280]

Without --runs it builds a throwaway workspace (the tiny model and task of honellm/testing.py) and starts, through
the UI's own API, a `hone tune` (loss curves), a `hone prompt --search` (search trials) and a `hone compare`
(leaderboard, report); with --runs it shows that runs folder as it is. Then it opens every page in headless
Chromium (Debian: `apt-get install chromium`; driven by Playwright on that binary, nothing downloaded) and writes
OUT_DIR/<page>.png. Takes a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from honellm.testing import find_chromium  # noqa: E402
from honellm.ui.jobs import free_port  # noqa: E402


def call(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def wait_job(base: str, job_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = call(f"{base}/api/jobs/{job_id}")
        if job["state"] != "running":
            if job["state"] != "finished":
                sys.exit(f"the job {job['command']} ended {job['state']}:\n{job.get('output', '')[-3000:]}")
            return job
        time.sleep(1)
    sys.exit(f"the job {job_id} did not finish in {timeout:.0f} s")


def make_workspace(folder: Path) -> None:
    from honellm.testing import make_tiny_model, make_tiny_task

    model = make_tiny_model(folder / "model")
    make_tiny_task(folder / "examples", model, n_train=64, n_validation=16)


def make_runs(base: str) -> dict:
    """A tune, a prompt search and a compare on the tiny task, started from the UI's API as the page would."""
    task = "examples/task.yaml"
    started = {
        "tune": call(f"{base}/api/jobs", {"verb": "tune", "task": task, "method": "lora",
                                          "overrides": ["max_steps=8", "eval_every=2", "lr=5e-3"]}),
        "prompt": call(f"{base}/api/jobs", {"verb": "prompt", "task": task, "search": 4}),
    }
    done = {name: wait_job(base, job["id"]) for name, job in started.items()}
    compare = call(f"{base}/api/jobs", {"verb": "compare", "task": task, "methods": "zero-shot,few-shot,lora",
                                        "budget_seconds": 60, "overrides": []})
    done["compare"] = wait_job(base, compare["id"])
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for the PNGs")
    parser.add_argument("--runs", type=Path, default=None, help="show this runs folder instead of making runs")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        sys.exit("Chromium not found: install it (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("Playwright is not installed: pip install playwright (never `playwright install`: the system "
                 "Chromium is used)")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hone-ui-shots-"))
    runs = args.runs.resolve() if args.runs else work / "runs"
    if args.runs is None:
        make_workspace(work)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("HONE_API_KEY", None)
    ui = subprocess.Popen([sys.executable, "-m", "honellm", "ui", "--port", str(port), "--runs", str(runs)],
                          cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                call(f"{base}/health")
                break
            except OSError:
                time.sleep(0.2)
        jobs = make_runs(base) if args.runs is None else {}
        shoot(sync_playwright, chromium, base, jobs, args.out, args.width)
    finally:
        ui.send_signal(signal.SIGINT)
        try:
            ui.wait(30)
        except subprocess.TimeoutExpired:
            ui.kill()
        if args.runs is None:
            shutil.rmtree(work, ignore_errors=True)


def shoot(sync_playwright, chromium: str, base: str, jobs: dict, out: Path, width: int) -> None:
    runs = call(f"{base}/api/runs")["runs"]
    compare = next((r for r in runs if r["kind"] == "compare"), None)
    train = next((r for r in runs if r["kind"] == "train"), None)
    search = next((r for r in runs if r["kind"] == "prompt"), None)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": 900})

        def snap(name: str, hash_: str, ready: str) -> None:
            page.goto(f"{base}/#{hash_}")
            page.wait_for_selector(ready, timeout=120_000)
            page.wait_for_timeout(800)  # one more poll, so the page shows its settled state
            page.screenshot(path=str(out / f"{name}.png"), full_page=True)
            print(out / f"{name}.png")

        snap("runs", "/", "#runs-table")
        snap("new-run", "/new", "#start-form")
        if "tune" in jobs:
            snap("job-tune", f"/job/{jobs['tune']['id']}", "[data-chart]")
        if train:
            snap("run-tune", f"/run/{train['id']}", "[data-chart]")
        if search:
            snap("run-prompt-search", f"/run/{search['id']}", "#trials")
        if compare:
            snap("run-compare", f"/run/{compare['id']}", "#leaderboard")
            snap("report-compare", f"/report/run/{compare['id']}", "#report")
        if train:
            snap("report-task", f"/report/task/{train['task']}", "#report")
        snap("tasks", "/tasks", "#tasks")
        snap("artifacts", "/artifacts", "#artifacts")
        artifacts = call(f"{base}/api/artifacts")["artifacts"]
        if artifacts:
            a = artifacts[0]["id"]
            b = artifacts[1]["id"] if len(artifacts) > 1 else a
            page.goto(f"{base}/#/chat?a={a}&b={b}")
            page.fill("#prompt", "Review: a warm, funny film")
            page.fill("#max-tokens", "12")
            page.click("#send")
            page.wait_for_selector(".answer", timeout=300_000)
            page.screenshot(path=str(out / "chat.png"), full_page=True)
            print(out / "chat.png")
            winner = (compare or {}).get("artifact") or a
            call(f"{base}/api/serve", {"artifact": winner})
            page.goto(f"{base}/#/servers")
            page.wait_for_selector('#servers-table [data-state="ready"]', timeout=300_000)
            page.screenshot(path=str(out / "servers.png"), full_page=True)
            print(out / "servers.png")
        browser.close()


if __name__ == "__main__":
    main()
