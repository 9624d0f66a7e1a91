"""What a settings search costs and what pruning saves: one LoRA run at the defaults, then an N-trial search.

On the tiny random model of `honellm.testing` by default (the figures in docs/search.md), or on a task YAML
(`--task examples/sst2.yaml`, the embedded model). Prints one JSON object: the default run's seconds and
validation score, the search's total seconds, each trial (settings, state, score, the step it was pruned at,
seconds), and the training steps pruning stopped. It asserts nothing.

    python bench/bench_search.py [--trials 6] [--steps 8] [--task TASK.yaml] [--out /tmp/bench-search]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--task", default=None, help="a task YAML (default: the tiny task on the tiny model)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from honellm.methods.catalog import method_config, run_method
    from honellm.search import Choice, Float, search
    from honellm.task import Task
    from honellm.testing import make_tiny_model, make_tiny_task

    root = Path(args.out or tempfile.mkdtemp(prefix="bench-search-"))
    if args.task is None:
        task_path = make_tiny_task(root / "task", make_tiny_model(root / "model"))
    else:
        task_path = args.task
    task = Task.load(str(task_path))
    for name in ("single", "search"):
        shutil.rmtree(root / name, ignore_errors=True)
    base = [f"max_steps={args.steps}", "batch_size=8"]
    every = max(1, args.steps // 4)

    started = time.perf_counter()
    _, config = method_config("lora", None, [*base, f"eval_every={every}"])
    single = run_method(task, "lora", config, out=root / "single", force=True)
    single_seconds = time.perf_counter() - started

    started = time.perf_counter()
    result = search(task, "lora", n_trials=args.trials, base_overrides=base, out=root / "search", progress=False,
                    space=[Float("lr", 1e-5, 5e-1, log=True), Choice("r", (4, 8, 16))])
    total = time.perf_counter() - started
    from honellm.runs import read_metrics

    rows = read_metrics(root / "search" / "metrics.jsonl")
    trials = [r for r in rows if r.get("event") == "trial"]
    complete = [r["seconds"] for r in trials if r["state"] == "complete" and not r.get("repeat_of")]
    print(json.dumps({
        "default_run_seconds": round(single_seconds, 1), "default_val": single.manifest.metrics,
        "search_seconds": round(total, 1), "best_params": result.best_params, "best_score": result.best_score,
        "trials": [{k: r[k] for k in ("trial", "params", "state", "score", "pruned_at_step", "seconds")} for r in trials],
        "steps_planned": args.steps * len(trials),
        "steps_pruned": sum(args.steps - r["pruned_at_step"] for r in trials
                            if r["state"] == "pruned" and r["pruned_at_step"]),
        "mean_complete_trial_seconds": round(sum(complete) / max(1, len(complete)), 1),
    }, indent=1, default=str))


if __name__ == "__main__":
    main()
