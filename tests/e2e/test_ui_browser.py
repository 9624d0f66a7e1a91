"""`hone ui` in a real headless Chromium (Debian's `chromium`), driven by Playwright.

The real CLI serves the UI on a free loopback port; from the page the test starts a tiny-model `hone tune`, sees
it finish with its loss curve, opens the task's report (Hone's report page, leaderboard included) and chats with
the artifact. Playwright drives the system Chromium through `executable_path` (no `playwright install`, nothing
downloaded); its locators wait for the live page by themselves, so the test has no sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from honellm.testing import CHROMIUM_NAMES, find_chromium
from honellm.ui.jobs import free_port
from tests.e2e.helpers import ROOT


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium binary found (looked for " + ", ".join(CHROMIUM_NAMES)
                    + "); install Debian's: apt-get install -y chromium")
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install playwright "
                                                      "(the dev extra has it)")
    return path



def write_guarded_run(folder):
    """An online-RL run folder as GRPO writes it: training rows, the guard's held-out checks and one alarm."""
    import json

    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("method: grpo\ntask: arithmetic\ntask_source: arithmetic\nconfig: {}\n")
    rows = [{"step": 0, "event": "start", "total_steps": 6}]
    for step in range(1, 7):
        rows.append({"step": step, "kind": "train", "loss": 1.0 / step, "reward": 0.1 * step, "kl": 0.01 * step})
        if step % 2 == 0:
            rows.append({"step": step, "kind": "guard", "proxy": 0.2 * step, "gold": 0.5 - 0.05 * step,
                         "kl": 0.02 * step})
    rows.append({"step": 6, "kind": "alarm", "alarm": "proxy_gold_divergence",
                 "message": "proxy reward rose while the gold signal fell"})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def ui_server(tmp_path, tiny_model_dir):
    """`hone ui` from a folder with examples/task.yaml (the tiny sentiment task); yields its URL."""
    from honellm.testing import make_tiny_task

    make_tiny_task(tmp_path / "examples", tiny_model_dir)
    write_guarded_run(tmp_path / "runs" / "arithmetic" / "grpo-20260101-000000")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HONE_QUIET": "1"}
    env.pop("HONE_API_KEY", None)
    log = open(tmp_path / "ui.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "honellm", "ui", "--port", str(port), "--runs",
                                str(tmp_path / "runs")], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail("hone ui did not start:\n" + (tmp_path / "ui.log").read_text()[-3000:])
            time.sleep(0.2)
    yield url
    process.send_signal(signal.SIGINT)  # as Ctrl-C: uvicorn shuts down and the UI stops the jobs it started
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def test_start_a_run_watch_it_read_the_report_and_chat(chromium, ui_server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        try:
            # Start a short tune from the form.
            page.goto(ui_server + "/#/new")
            page.select_option("#verb", "tune")
            page.select_option("#task", label="tiny-sentiment (example, accuracy)")
            page.select_option("#method", "lora")
            page.fill("#overrides", "max_steps=2 eval_every=2")
            page.click("#start")

            # Watch it live until it finishes: the state badge, the progress, the loss curve, the artifact.
            expect(page.locator("#command")).to_contain_text("hone tune")
            expect(page.locator("h1 .badge")).to_have_attribute("data-state", "finished", timeout=180_000)
            expect(page.locator("#progress-text")).to_have_text("steps 2 of 2")
            expect(page.locator('[data-chart="loss"] polyline').first).to_be_visible()
            expect(page.locator("#artifact-info")).to_contain_text("tiny-sentiment-lora")

            # Its report: Hone's report page with the leaderboard, in a sandboxed frame.
            page.click("#open-report")
            report = page.frame_locator("#report")
            expect(report.locator("h1")).to_contain_text("Hone report: tiny-sentiment", timeout=60_000)
            expect(report.locator("table").first).to_contain_text("lora-")

            # The run list shows it done.
            page.goto(ui_server + "/#/")
            expect(page.locator("#runs-table")).to_contain_text("tiny-sentiment/lora-")
            expect(page.locator("#runs-table .badge").first).to_have_attribute("data-state", "done")

            # An online-RL run's curves: reward and the reward-hacking guard's signals, with its alarm.
            page.goto(ui_server + "/#/run/arithmetic/grpo-20260101-000000")
            expect(page.locator('[data-chart="reward"] polyline')).to_be_visible()
            expect(page.locator('[data-chart="guard: gold"] polyline')).to_be_visible()
            expect(page.locator(".alarm")).to_contain_text("proxy_gold_divergence")

            # Chat with the artifact.
            page.goto(ui_server + "/#/")
            page.click("#runs-table >> text=chat")
            page.select_option("#right", "")  # one side only: the run made one artifact
            page.fill("#prompt", "Review: a warm film")
            page.fill("#max-tokens", "8")
            page.click("#send")
            answer = page.locator(".answer").first
            expect(answer).to_contain_text("tiny-sentiment-lora", timeout=120_000)
            expect(answer).to_contain_text("tokens")
            assert not errors, errors
        finally:
            browser.close()
