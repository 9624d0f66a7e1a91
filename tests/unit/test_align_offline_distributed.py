"""The offline align recipes under torchrun with two CPU processes (DDP over gloo) follow one process with the same
global batch: the sharded reference pass, the gathered validation scores and KTO's global z agree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from honellm.runs import read_metrics
from honellm.testing import make_tiny_preference_task

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["max_steps=4", "eval_every=2", "lr=1e-2", "batch_size=4", "precision=fp32", "r=4"]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HONE_QUIET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow  # two torchrun processes plus one plain run per method
@pytest.mark.parametrize(("method", "port"), [("dpo", "29541"), ("kto", "29542"), ("reward_model", "29543")])
def test_two_ddp_processes_follow_one_process(tiny_model_dir, tmp_path, method, port):
    task = make_tiny_preference_task(tmp_path / "task", tiny_model_dir)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _run([sys.executable, "-m", "honellm", "align", str(task), "--method", method, *ARGS, "grad_accum=2",
          "--out", str(single)])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
          "-m", "honellm", "align", str(task), "--method", method, *ARGS, "--out", str(ddp)])

    one, two = read_metrics(single / "metrics.jsonl"), read_metrics(ddp / "metrics.jsonl")
    assert next(r for r in two if r.get("event") == "start")["processes"] == 2
    one_steps, two_steps = [r for r in one if "loss" in r], [r for r in two if "loss" in r]
    assert [r["step"] for r in two_steps] == [1, 2, 3, 4]
    for a, b in zip(one_steps, two_steps, strict=True):
        assert (a["tokens"], a["units"]) == (b["tokens"], b["units"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        # (accuracies compare rewards that are equal up to rounding at the first step: not compared here)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=1e-3, abs=1e-5)
        if method == "kto":
            assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-6)
    evals = [[v for r in rows if r.get("event") == "eval" for v in (r["val_accuracy"], r["val_loss"])]
             for rows in (one, two)]
    assert len(evals[0]) == 4 and evals[1] == pytest.approx(evals[0], rel=1e-4)
    a = load_file(single / "artifact" / "adapter" / "adapter_model.safetensors")
    b = load_file(ddp / "artifact" / "adapter" / "adapter_model.safetensors")
    # to 1e-3 of each tensor's largest entry: Adam divides each gradient by its own running size, so an entry whose
    # gradient is near zero moves by up to lr in either direction on a rounding difference (lr=1e-2 here)
    for name in a:
        assert (b[name] - a[name]).abs().max().item() <= 1e-3 * a[name].abs().max().item(), name
