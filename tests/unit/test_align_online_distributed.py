"""The online recipes under torchrun with two CPU processes (DDP over gloo): each process samples for its own
prompts, the held-out check is sharded and gathered, every process agrees with the guard, rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from honellm.runs import read_metrics
from honellm.testing import make_tiny_reward_task

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["max_steps=2", "prompts_per_step=2", "group_size=2", "max_new_tokens=4", "guard_prompts=4", "eval_every=1",
        "r=4", "batch_size=2"]


@pytest.mark.slow  # two torchrun processes per method: ~1 min on 2 cores
@pytest.mark.parametrize(("method", "port"), [("grpo", 29531), ("ppo", 29533)])
def test_two_processes_train_and_check_together(tiny_model_dir, tmp_path, method, port):
    task = make_tiny_reward_task(tmp_path / "task", tiny_model_dir)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HONE_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "honellm", "align", str(task), "--method", method, *ARGS, "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert next(r for r in rows if r.get("event") == "start")["processes"] == 2
    assert [r["step"] for r in rows if r.get("kind") == "train"] == [1, 2]  # rank 0 writes, once per step
    assert [r["step"] for r in rows if r.get("kind") == "guard"] == [0, 1, 2]
    train = [r for r in rows if r.get("kind") == "train"][0]
    assert train["tokens"] > 0 and train["units"] > 0
    assert (out / "artifact" / "adapter" / "adapter_model.safetensors").exists()
