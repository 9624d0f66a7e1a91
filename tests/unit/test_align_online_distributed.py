"""The online recipes under torchrun with two CPU processes (DDP over gloo): each process samples for its own
prompts, the held-out check is sharded and gathered, every process agrees with the guard, rank 0 writes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from honellm.runs import read_metrics
from honellm.testing import make_tiny_reward_task

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["max_steps=2", "prompts_per_step=2", "group_size=2", "max_new_tokens=4", "guard_prompts=4", "eval_every=1",
        "r=4", "batch_size=2"]


# A reward that varies (so that the adapter trains) and records, per process, the prompts it scored.
RECORDING = """import json, os
from pathlib import Path

LOG = Path(__file__).with_name("calls.jsonl")


def varied(prompts, completions, completion_ids, **kwargs):
    with open(LOG, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "prompts": sorted(set(prompts))}) + "\\n")
    return [0.1 * (sum(ids) % 11) for ids in completion_ids]
"""


def _unique_questions(folder: Path) -> None:
    """Every prompt different, so that which process scored which prompt can be told apart."""
    for split, (start, n) in {"train": (0, 32), "validation": (100, 8)}.items():
        rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(start, start + n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow  # two torchrun processes per method: ~1 min on 2 cores
@pytest.mark.parametrize(("method", "port"), [("grpo", 29531), ("ppo", 29533)])
def test_two_processes_train_and_check_together(tiny_model_dir, tmp_path, method, port):
    task = make_tiny_reward_task(tmp_path / "task", tiny_model_dir, reward_code=RECORDING,
                                 rewards=[{"python": "rewards.py:varied"}])
    _unique_questions(tmp_path / "task")
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
    train = [r for r in rows if r.get("kind") == "train"]
    assert all(r["tokens"] > 0 and r["units"] > 0 and math.isfinite(r["loss"]) for r in train)
    # Each process scored its own prompts: call for call (the processes run the same sequence of rollouts and
    # guard checks), the two processes' prompts never overlap.
    calls = [json.loads(line) for line in (tmp_path / "task" / "calls.jsonl").read_text().splitlines()]
    by_rank = {rank: [c["prompts"] for c in calls if c["rank"] == rank] for rank in (0, 1)}
    assert by_rank[0] and len(by_rank[0]) == len(by_rank[1])
    for mine, theirs in zip(by_rank[0], by_rank[1], strict=True):
        assert mine and theirs and not set(mine) & set(theirs)
    # The saved weights load, are finite, and differ from the base: PEFT starts every B at zero.
    adapter = load_file(out / "artifact" / "adapter" / "adapter_model.safetensors")
    b_matrices = [v for k, v in adapter.items() if "lora_B" in k]
    assert b_matrices and all(torch.isfinite(v).all() for v in adapter.values())
    assert any(v.abs().sum() > 0 for v in b_matrices)
