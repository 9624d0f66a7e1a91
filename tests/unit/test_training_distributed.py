"""The same recipe under torchrun with two CPU processes (DDP over gloo) follows the loss curve of one process with
the same global batch (batch_size=4 x 2 processes against batch_size=4 x grad_accum=2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from honellm.runs import read_metrics
from honellm.testing import make_tiny_task

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["max_steps=8", "eval_every=4", "lr=1e-2", "batch_size=4", "precision=fp32"]
# fp32; the only differences are orders of summation: DDP's all-reduce against local accumulation, and a
# micro-batch's shared prefix (honellm.core.fastpath) summing the gradients of 2 sequences rather than 4
LOSS_RTOL = 1e-5


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HONE_QUIET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow  # two torchrun processes plus one plain run: ~30 s on 2 cores
def test_two_ddp_processes_follow_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path):
    task = make_tiny_task(tmp_path / "task", tiny_model_dir)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _run([sys.executable, "-m", "honellm", "tune", str(task), "--method", "lora", *ARGS, "grad_accum=2",
          "--out", str(single)])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
          "-m", "honellm", "tune", str(task), "--method", "lora", *ARGS, "--out", str(ddp)])

    one, two = read_metrics(single / "metrics.jsonl"), read_metrics(ddp / "metrics.jsonl")
    start = next(r for r in two if r.get("event") == "start")
    assert start["processes"] == 2
    one_steps, two_steps = [r for r in one if "loss" in r], [r for r in two if "loss" in r]
    assert [r["step"] for r in two_steps] == list(range(1, 9))  # one line per step: only rank 0 writes
    for a, b in zip(one_steps, two_steps, strict=True):
        assert (a["tokens"], a["units"]) == (b["tokens"], b["units"])  # the same examples in every step
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
    evals = [[r["val_loss"] for r in rows if r.get("event") == "eval"] for rows in (one, two)]
    assert evals[1] == pytest.approx(evals[0], rel=1e-4)
    a = load_file(single / "artifact" / "adapter" / "adapter_model.safetensors")
    b = load_file(ddp / "artifact" / "adapter" / "adapter_model.safetensors")
    # to 1e-3 of each tensor's largest entry: Adam divides each gradient by its own running size, so an entry whose
    # gradient is near zero moves by up to lr in either direction on a rounding difference (lr=1e-2 here)
    for name in a:
        assert (b[name] - a[name]).abs().max().item() <= 1e-3 * a[name].abs().max().item(), name
