"""`hone demo`: the main job on the embedded model, in minutes on a laptop CPU.

One `compare` per built-in task, each with methods from the three classes that its data supports, under
settings sized so that the whole demo finishes in under 10 minutes on 2 CPU cores (bf16):

- intents (six-way classification of customer messages): zero-shot, few-shot (one fixed demonstration per
  label, its KV prefix shared), LoRA;
- support_prefs (preference pairs: the reply that routes the customer to the right team): zero-shot, DPO.

`--tasks arithmetic` adds word problems with a checkable number: zero-shot against GRPO on the task's reward
functions. It is not in the default plan: online RL samples every answer it learns from, and on 2 CPU cores a
GRPO step (64 sampled answers of up to 48 tokens, then the update) takes ~40 s, so 12 steps alone take ~8 min.

Then one HTML report for all three (leaderboards, quality against cost, learning curves, the reward-hacking
guard's panels, disagreements, recommendations).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from honellm.errors import HoneError


@dataclass(frozen=True)
class DemoTask:
    task: str
    methods: tuple[str, ...]
    sets: dict[str, list[str]] = field(default_factory=dict)
    limit: int | None = None  # examples judged per method (None: the whole test split)


DEMO_TASKS = (
    DemoTask("intents", ("zero-shot", "few-shot", "lora"),
             {"lora": ["epochs=2", "batch_size=16", "lr=5e-4", "eval_every=0", "save_every=0"]}),
    DemoTask("support_prefs", ("zero-shot", "dpo"),
             {"dpo": ["max_steps=20", "batch_size=8", "lr=5e-4", "eval_every=0", "save_every=0"]}),
    DemoTask("arithmetic", ("zero-shot", "grpo"),
             {"grpo": ["max_steps=12", "eval_every=4", "save_every=0"]}, limit=50),
)
DEFAULT_TASKS = ("intents", "support_prefs")


def run_demo(out: str | Path | None = None, *, tasks: list[str] | None = None, limit: int | None = None,
             force: bool = False, progress: bool = True, echo=print) -> tuple[Path, list, Path]:
    """Run the demo; returns (demo folder, the compare runs, the report path)."""

    from honellm.compare.compare import compare
    from honellm.compare.report import write_combined_report
    from honellm.compare.results import summary_text
    from honellm.runs import runs_root

    plan = [d for d in DEMO_TASKS if d.task in (tasks or DEFAULT_TASKS)]
    unknown = sorted(set(tasks or []) - {d.task for d in DEMO_TASKS})
    if unknown:
        raise HoneError(f"no demo task named {', '.join(unknown)}", where="--tasks",
                        fix=f"demo tasks: {', '.join(d.task for d in DEMO_TASKS)}")
    root = Path(out) if out else runs_root() / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    if root.exists() and any(root.iterdir()) and not force:
        raise HoneError("the demo folder already exists", where=str(root),
                        fix="pass --force to replace it, or choose another --out")
    started = time.perf_counter()
    runs = []
    for demo in plan:
        echo(f"\n== {demo.task}: {', '.join(demo.methods)}")
        run = compare(demo.task, list(demo.methods), out=root / demo.task, force=True,
                      limit=limit if limit is not None else demo.limit, method_overrides=demo.sets, progress=progress)
        echo(summary_text(run))
        runs.append(run)
    minutes = (time.perf_counter() - started) / 60
    report = write_combined_report([r.path for r in runs], root / "report.html", title="Hone demo",
                                   intro=f"The built-in tasks on the embedded model, {minutes:.1f} minutes.")
    return root, runs, report
