"""bench/bench_gpu.py --smoke: the prepared GPU benchmark runs end to end on a CPU (tiny shapes, a few steps), every
phase on both sides (Hone and TRL), and reports what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_gpu_smoke_runs_every_phase_on_both_sides():
    pytest.importorskip("trl")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HONE_QUIET": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--smoke", "--budget", "1200"],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH_GPU "))
    found = json.loads(line[len("BENCH_GPU "):])
    assert found["smoke"] is True
    phases = {p["phase"]: p for p in found["phases"]}
    assert set(phases) == {"sft-lora-135m", "sft-full-135m", "dpo-135m", "grpo-135m"}  # one per kind, tiny shape
    for name, phase in phases.items():
        for side in ("hone", "trl"):
            assert "error" not in phase[side], (name, side, phase[side].get("error"))
            assert phase[side]["tokens_per_second"] > 0 and phase[side]["peak_memory_bytes"] > 0
        assert phase["ratio"] > 0
        if name.startswith("sft"):  # the first losses of both sides, printed for the loss-curve comparison
            assert phase["hone"]["losses"] and phase["trl"]["losses"]
            # TRL is given Hone's token sequences in Hone's batches: the same tokens, the same first batch (its
            # loss is taken before any update, so the sides' first losses are equal up to the kernels' rounding)
            assert phase["hone"]["tokens"] == phase["trl"]["tokens"], name
            assert phase["trl"]["settings"]["hone_batches"] is True, name
            assert phase["hone"]["losses"][0] == pytest.approx(phase["trl"]["losses"][0], rel=1e-4), name
        if name.startswith("dpo"):  # TRL's DPO side trains on Hone's batches too (in its own tokenization)
            assert phase["trl"]["settings"]["hone_batches"] is True
    assert "Hone / TRL:" in done.stdout and "first losses" in done.stdout
    assert "targets (issue 22)" in done.stdout and found["targets"]  # each phase against the targets


def test_bench_gpu_compares_loss_curves_by_their_quarters():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    falling, flat = [4.0 - 0.4 * i for i in range(8)], [1.0, 1.2, 0.9, 1.1, 1.0, 1.3, 1.1, 1.2]
    line = bench.trend_line(falling, [x + 0.1 for x in falling])
    assert "Hone 3.8000 -> 1.4000, TRL 3.9000 -> 1.5000: same trend" in line
    assert bench.trend_line(falling, flat).endswith("different trends")
    same = bench.trend_line(falling, [x * 1.1 for x in falling], same_batches=True)
    assert "the losses differ by 9.1% a step on average: same trend" in same
    assert "too few steps" in bench.trend_line(falling[:2], falling)
    lines = bench.target_lines([{"phase": "sft-lora-135m", "kind": "sft-lora", "shape": "135m", "ratio": 2.0,
                                 "hone": {"losses": falling}, "trl": {"losses": [x * 1.01 for x in falling]}}], None)
    assert lines[0] == "sft-lora-135m: 2.00x TRL (target 1.5x): met"
    assert lines[1].endswith("agree") and lines[2].endswith("same trend")


@pytest.mark.parametrize("recipe", ["sft", "dpo"])
def test_bench_launches_counts_both_sides_operations(recipe):
    pytest.importorskip("trl")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HONE_QUIET": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_launches.py"), "--recipe", recipe, "--shape",
                           "tiny", "--steps", "2", "--batch-size", "4"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = {side: line for side in ("hone", "trl") for line in done.stdout.splitlines()
              if line.strip().startswith(f"{side}: [")}
    assert set(counts) == {"hone", "trl"}, done.stdout
    for line in counts.values():  # two steps counted, each a real step's worth of operations, and its waits
        steps = json.loads(line.split(":", 1)[1].split("(")[0])
        waits = json.loads(line.rsplit(":", 1)[1])
        assert len(steps) == 2 and all(n > 100 for n in steps)
        assert len(waits) == 2 and all(n >= 1 for n in waits)  # at least a step's read-back of its loss
    assert "Hone / TRL:" in done.stdout


def test_bench_launches_times_both_sides_steps():
    """`--time`: each side's milliseconds per step and from step to step, and their ratio (tiny shape, a CPU)."""
    pytest.importorskip("trl")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HONE_QUIET": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_launches.py"), "--time", "--shape", "tiny",
                           "--steps", "4", "--batch-size", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for side in ("hone", "trl"):
        line = next(line for line in done.stdout.splitlines() if line.strip().startswith(f"{side}: step "))
        step, gap = (float(part.split()[-2]) for part in line.split("(")[0].split(",")[:2])
        steps = [float(t) for t in line.split("(steps: ")[1].rstrip(")").split(", ")]
        assert step > 0 and gap >= step * 0.5 and len(steps) == 4, line
    assert "Hone / TRL:" in done.stdout and "time from step to step" in done.stdout


def test_bench_launches_counts_a_rollouts_decoding_steps():
    """`--recipe rollout`: operations per decoding step of a LoRA policy, Hone's engine against model.generate."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HONE_QUIET": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_launches.py"), "--recipe", "rollout", "--shape",
                           "tiny", "--steps", "1", "--batch-size", "4"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = {}
    for line in done.stdout.splitlines():
        if line.strip().startswith(("hone (engine):", "model.generate (PEFT):")):
            name, value = line.split(":", 1)
            counts[name.strip()] = float(value.replace(",", ""))
    assert set(counts) == {"hone (engine)", "model.generate (PEFT)"} and all(n > 10 for n in counts.values())
    assert counts["hone (engine)"] < counts["model.generate (PEFT)"]  # merged adapters: fewer operations a step
    assert "Hone / model.generate:" in done.stdout
