"""What a settings search costs and what pruning saves: one LoRA run at the defaults, then an N-trial search.

On the tiny random model of `honellm.testing` by default (the figures in docs/search.md), or on a task YAML
(`--task examples/sst2.yaml`, the embedded model). Prints one JSON object: the default run's seconds and
validation score, the search's total seconds, each trial (settings, state, score, the step it was pruned at,
seconds), and the training steps pruning stopped. It asserts nothing.

    python bench/bench_search.py [--trials 6] [--steps 8] [--task TASK.yaml] [--out /tmp/bench-search]
    python bench/bench_search.py --from-compare runs/sst2/compare-...   # the searches of a `compare --search` run

`--from-compare` trains nothing: it reads every `<method>/search/` (and `<method>/seeds/`) of a finished
`hone compare --search N --seeds K` folder and prints, per method, a table row: trials (pruned), the search's
seconds, one run at the method's defaults (trial 0, the defaults, when it completed), the search over that run
(the time the search adds), the seeds' seconds, and what pruning saved: each pruned trial's shortfall from the
mean complete trial, as a share of what the search would have taken without it.
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
    parser.add_argument("--from-compare", default=None, help="report the searches of a finished compare folder")
    args = parser.parse_args()
    if args.from_compare:
        report_compare(Path(args.from_compare))
        return

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


def report_compare(folder: Path) -> None:
    from honellm.runs import read_metrics

    print("| method | trials (pruned) | search | one run at the defaults | search / one run | seeds | pruning saved |")
    print("|---|---|---|---|---|---|---|")
    for log in sorted(folder.glob("*/search/metrics.jsonl")):
        method = log.parent.parent.name
        trials = [r for r in read_metrics(log) if r.get("event") == "trial" and not r.get("repeat_of")]
        if not trials:
            continue
        seconds = sum(r["seconds"] for r in trials)
        complete = [r["seconds"] for r in trials if r["state"] == "complete"]
        mean = sum(complete) / max(1, len(complete))
        saved = sum(max(0.0, mean - r["seconds"]) for r in trials if r["state"] == "pruned")
        default = trials[0]["seconds"] if trials[0]["state"] == "complete" else None
        seeds = 0.0
        for manifest in sorted((log.parent.parent / "seeds").glob("seed-*/artifact/hone.json")):
            cost = json.loads(manifest.read_text()).get("cost") or {}
            seeds += cost.get("wall_seconds") or cost.get("train_seconds") or 0.0
        pruned = sum(r["state"] == "pruned" for r in trials)
        print(f"| {method} | {len(trials)} ({pruned}) | {seconds:,.0f} s | "
              + (f"{default:,.0f} s | {seconds / default:.1f}x" if default else "- | -")
              + f" | {seeds:,.0f} s | {saved:,.0f} s ({saved / (seconds + saved):.0%}) |")


if __name__ == "__main__":
    main()
