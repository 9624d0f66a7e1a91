"""What a compare run records per method, and how it is read back (for the leaderboard, report and resume).

```
runs/<task>/compare-<timestamp>/
  compare.json          the plan: task, methods, budget, split, limit; and each method's result as it finishes
  <method>/             the method's own run folder: config.yaml, metrics.jsonl, log.txt, artifact/, eval.json
  report.html           written by `hone report`
```
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from honellm.atomic import atomic_write_json

FAMILIES = ("prompting", "tuning", "reward")


@dataclass
class MethodResult:
    """One row of the leaderboard: quality with its interval, and every cost beside it."""

    method: str
    family: str
    status: str  # "done" | "skipped" | "failed"
    reason: str | None = None  # why skipped or failed
    metric: str | None = None
    score: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int = 0
    artifact: str | None = None
    run_dir: str | None = None
    eval_path: str | None = None
    train_seconds: float = 0.0
    train_tokens: int = 0
    trainable_params: int = 0
    peak_memory_mb: float | None = None
    prompt_tokens: float | None = None  # per request at inference
    latency_ms: float | None = None  # per request at inference
    extra: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status == "done" and self.score is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MethodResult:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class CompareRun:
    path: Path
    task: dict
    methods: list[str]
    split: str
    budget_seconds: float | None
    limit: int | None
    results: dict[str, MethodResult] = field(default_factory=dict)
    recommendation: dict | None = None

    @property
    def file(self) -> Path:
        return self.path / "compare.json"

    def save(self) -> None:
        atomic_write_json(self.file, {
            "task": self.task, "methods": self.methods, "split": self.split, "budget_seconds": self.budget_seconds,
            "limit": self.limit, "results": {k: v.to_dict() for k, v in self.results.items()},
            "recommendation": self.recommendation,
        })

    @classmethod
    def load(cls, path: str | Path) -> CompareRun:
        from honellm.errors import HoneError

        path = Path(path)
        file = path / "compare.json"
        if not file.exists():
            raise HoneError("not a compare run folder (no compare.json)", where=str(path),
                            fix="pass a folder written by `hone compare` or `hone demo`")
        data = json.loads(file.read_text())
        run = cls(path, data["task"], data["methods"], data["split"], data.get("budget_seconds"), data.get("limit"))
        run.results = {k: MethodResult.from_dict(v) for k, v in data.get("results", {}).items()}
        run.recommendation = data.get("recommendation")
        return run

    def ordered(self) -> list[MethodResult]:
        """Finished methods best first, then failed and skipped ones in plan order."""
        done = sorted((r for r in self.results.values() if r.done), key=lambda r: -r.score)
        rest = [self.results[m] for m in self.methods if m in self.results and not self.results[m].done]
        return done + rest


SEED_COLUMNS = ("seeds", "seed mean", "seed range", "seeds 95% CI")


def seed_cells(r: MethodResult) -> list[str]:
    """A row's seed figures as text (`extra["seeds"]`, from compare --search --seeds): how many seeds, their
    mean score, the range across seeds (min-max) with the standard deviation, and the bootstrap interval of the
    seed-averaged per-example scores; dashes for a method run with one seed."""
    seeds = r.extra.get("seeds") if r.done else None
    if not seeds:
        scores = r.extra.get("seed_scores") if r.done else None
        if not scores or len(scores) < 2:
            return ["1" if r.done else "", "-", "-", "-"]
        seeds = {"scores": scores, "mean": sum(scores) / len(scores), "low": min(scores), "high": max(scores)}
    ci = seeds.get("ci95") or [None, None]
    std = f" (sd {seeds['std']:.3f})" if seeds.get("std") is not None else ""
    return [str(len(seeds["scores"])), f"{seeds['mean']:.3f}", f"{seeds['low']:.3f}-{seeds['high']:.3f}{std}",
            f"[{ci[0]:.3f}, {ci[1]:.3f}]" if None not in ci else "-"]


def has_seeds(results: list[MethodResult]) -> bool:
    """Whether any finished method was run with several seeds (then the leaderboards show the seed columns)."""
    return any(r.done and len(r.extra.get("seed_scores") or []) > 1 for r in results)


def tied_note(run: CompareRun) -> str | None:
    """Which methods the recommendation counts as tied with the best (intervals or seed spreads overlap)."""
    tied = (run.recommendation or {}).get("tied") or []
    if len(tied) < 2:
        return None
    how = ", or its seed range overlaps the best's" if has_seeds(list(run.results.values())) else ""
    return f"tied with the best (its 95% interval reaches the best score{how}): {', '.join(tied)}"


def leaderboard_rows(run: CompareRun) -> list[list[str]]:
    """The leaderboard as text cells, best first: a header row, then one row per method (with the seed columns
    after the interval when some method ran several seeds)."""
    seeds = has_seeds(list(run.results.values()))
    rows = [["method", "family", run.task.get("metric") or "score", "95% CI", *(SEED_COLUMNS if seeds else ()),
             "train time", "train tokens", "trainable", "peak mem", "prompt tok/req", "latency/req"]]
    for r in run.ordered():
        if r.done:
            rows.append([r.method, r.family, f"{r.score:.3f}",
                         f"[{r.ci_low:.3f}, {r.ci_high:.3f}]" if r.ci_low is not None else "-",
                         *(seed_cells(r) if seeds else ()),
                         _seconds(r.train_seconds), f"{r.train_tokens:,}" if r.train_tokens else "-",
                         _count(r.trainable_params), f"{r.peak_memory_mb / 1024:.2f} GiB" if r.peak_memory_mb else "-",
                         f"{r.prompt_tokens:.0f}" if r.prompt_tokens is not None else "-",
                         f"{r.latency_ms:.0f} ms" if r.latency_ms is not None else "-"])
        else:
            rows.append([r.method, r.family, r.status, (r.reason or "")[:110], *([""] * (len(rows[0]) - 4))])
    return rows


def leaderboard_text(run: CompareRun) -> str:
    """The leaderboard as an aligned text table (skipped and failed methods last, with their reason)."""
    rows = leaderboard_rows(run)
    done = [r for r in rows[1:] if r[2] not in ("skipped", "failed")]
    widths = [max(len(r[i]) for r in [rows[0], *done]) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        if row is rows[0] or row in done:
            lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        else:
            lines.append(f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}: {row[3]}")
    return "\n".join(lines)


def summary_text(run: CompareRun) -> str:
    """What `hone compare` and `hone demo` print: the task line, the leaderboard and the recommendation."""
    task = run.task
    held = task.get("held_out")
    lines = [f"task {task['name']} · split {run.split} ({'held out from ' + held['from'] + ', ' if held else ''}"
             f"{next((r.n for r in run.results.values() if r.done), 0)} examples) · model {task['model']}"
             + (f" · budget {run.budget_seconds:.0f} s per method" if run.budget_seconds else ""),
             leaderboard_text(run)]
    note = tied_note(run)
    if note:
        lines.append(note)
    rec = run.recommendation
    if rec:
        lines.append(f"recommended: {rec['method']} ({rec['family']})")
        lines += [f"  - {reason}" for reason in rec["reasons"]]
    return "\n".join(lines)


def _seconds(value: float) -> str:
    if not value:
        return "-"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def _count(value: int) -> str:
    if not value:
        return "0"
    return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value:,}"
