"""Kill -9 in the middle of a run, resume it, and end at exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from honellm.runs import read_metrics
from honellm.testing import make_tiny_task

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["max_steps=60", "save_every=10", "eval_every=25", "lr=1e-2", "batch_size=4", "dropout=0.1"]


def _hone(*args, **popen):
    # One thread each: the same arithmetic in every run, and no spinning OpenMP threads fighting over the cores.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HONE_QUIET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "honellm", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _finish(proc):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err


@pytest.mark.slow  # three CLI subprocesses: ~15 s on a quiet 2-core machine
def test_resume_after_sigkill_ends_at_the_same_weights(tiny_model_dir, tmp_path):
    task = make_tiny_task(tmp_path / "task", tiny_model_dir)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # Every run in a subprocess started the same way (dropout on, so the RNG state matters too), one at a time.
    _finish(_hone("tune", task, "--method", "lora", *ARGS, "--out", straight))
    victim = _hone("tune", task, "--method", "lora", *ARGS, "--out", killed)
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        steps = [int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("step-*")]
        if steps and max(steps) >= 20:
            break
        time.sleep(0.005)
    assert victim.poll() is None, f"the run ended before it could be killed: {victim.communicate()}"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done_before = [r["step"] for r in read_metrics(killed / "metrics.jsonl") if "loss" in r]
    assert 20 <= max(done_before) < 60 and not (killed / "artifact").exists()

    _finish(_hone("tune", task, "--method", "lora", *ARGS, "--out", killed, "--resume"))
    rows = read_metrics(killed / "metrics.jsonl")
    resume_event = next(r for r in rows if r.get("event") == "resume")
    assert resume_event["step"] >= 20 and resume_event["step"] % 10 == 0

    a = load_file(straight / "artifact" / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "artifact" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the steps redone after the resume have exactly the losses of the uninterrupted run
    straight_loss = {r["step"]: r["loss"] for r in read_metrics(straight / "metrics.jsonl") if "loss" in r}
    redone = [r for r in rows[rows.index(resume_event):] if "loss" in r]
    assert redone and all(r["loss"] == straight_loss[r["step"]] for r in redone)
