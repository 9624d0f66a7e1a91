"""What the UI browses, read from disk: tasks, run folders, artifacts, and leaderboards.

Nothing here loads a model or a data set: tasks are read as YAML (name, model, metric), runs from their
`config.yaml`, `metrics.jsonl`, `log.txt` and `compare.json`, artifacts from `hone.json`. Every path a client
names is resolved inside the runs folder (or refused), so the UI never reads files outside it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from honellm.errors import HoneError
from honellm.runs import read_metrics

MAX_DEPTH = 4  # runs/<task>/compare-<time>/<method>/artifact: deep enough for every layout Hone writes
LOG_TAIL_BYTES = 16_000


class NotFound(HoneError):
    """A run, artifact or job that is not there (the API answers 404)."""


# ----------------------------------------------------------------------------------------------------- paths


def inside(root: Path, relative: str) -> Path:
    """`root/relative`, refused unless it stays inside `root` (no `..`, no absolute paths, no symlinks out)."""
    base = root.resolve()
    path = (base / relative).resolve()
    if path != base and base not in path.parents:
        raise HoneError(f"{relative!r} is outside the runs folder", where=str(root),
                        fix="name a run by its path relative to the runs folder, as the run list gives it")
    return path


def run_id(root: Path, path: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def _walk(root: Path, depth: int = MAX_DEPTH):
    """Folders under `root` (not root itself), breadth first, skipping hidden ones and checkpoints."""
    if not root.is_dir():
        return
    level = [root]
    for _ in range(depth):
        nxt = []
        for folder in level:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir())
            except OSError:
                continue
            for child in children:
                if child.name.startswith(".") or child.name in ("checkpoints", "adapter", "model"):
                    continue
                yield child
                nxt.append(child)
        level = nxt


# ----------------------------------------------------------------------------------------------------- tasks


def _task_summary(path: Path, kind: str) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(data, dict) or "name" not in data:
        return None
    return {"name": str(data["name"]), "source": str(path), "kind": kind, "model": data.get("model"),
            "metric": data.get("metric"), "description": data.get("description") or "",
            "choices": data.get("choices")}


def list_tasks(runs_root: Path, examples: Path | None) -> list[dict]:
    """Built-in tasks, the example YAMLs, and the tasks the runs in `runs_root` were made on (each once)."""
    from honellm.builtin import BUILTIN_TASKS, builtin_task_path

    tasks, seen = [], set()

    def add(summary: dict | None, ident: str) -> None:
        if summary is not None and ident not in seen:
            seen.add(ident)
            tasks.append(summary)

    for name in BUILTIN_TASKS:
        path = builtin_task_path(name)
        if path is not None:
            summary = _task_summary(path, "built-in")
            if summary:
                summary["source"] = name  # the CLI takes a built-in task by name
            add(summary, name)
    if examples is not None and examples.is_dir():
        for path in sorted(examples.glob("*.y*ml")):
            add(_task_summary(path, "example"), str(path.resolve()))
    for run in list_runs(runs_root):
        source = run.get("task_source")
        if source and source not in seen:
            path = Path(source)
            if path.exists():
                add(_task_summary(path, "from a run"), str(path.resolve()))
            elif builtin_task_path(source):
                continue  # a built-in, listed above
    return tasks


# ------------------------------------------------------------------------------------------------------ runs


def _yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_run(path: Path) -> bool:
    return any((path / name).exists() for name in ("compare.json", "metrics.jsonl", "config.yaml"))


def artifact_score(manifest: dict) -> tuple[str | None, float | None]:
    """(metric, validation score) an artifact's manifest records, whichever recipe wrote it."""
    metric = ((manifest.get("task") or {}).get("config") or {}).get("metric")
    metrics = manifest.get("metrics") or {}
    validation = metrics.get("validation")
    if isinstance(validation, dict) and isinstance(validation.get("score"), (int, float)):
        return validation.get("metric") or metric, float(validation["score"])
    for key in ([f"val_{metric}"] if metric else []) + sorted(k for k in metrics if k.startswith("val_")):
        if isinstance(metrics.get(key), (int, float)) and key != "val_loss":
            return key[4:], float(metrics[key])
    if isinstance(metrics.get("val_loss"), (int, float)):
        return "loss", float(metrics["val_loss"])
    return metric, None


def summarize_run(root: Path, path: Path) -> dict:
    """One row of the run list: what ran, on which task, how far it got, and its artifact."""
    compare = _json(path / "compare.json")
    config = _yaml(path / "config.yaml")
    row: dict[str, Any] = {"id": run_id(root, path), "name": path.name, "path": str(path),
                           "modified": _mtime(path), "artifact": None, "score": None, "metric": None}
    if compare:
        task = compare.get("task") or {}
        results = compare.get("results") or {}
        methods = compare.get("methods") or []
        done = [r for r in results.values() if r.get("status") == "done" and r.get("score") is not None]
        recommended = (compare.get("recommendation") or {}).get("method")
        best = results.get(recommended) or max(done, key=lambda r: r["score"], default=None)
        row.update(kind="compare", method="compare", task=task.get("name"), task_source=task.get("source"),
                   status="done" if compare.get("recommendation") is not None or (methods and len(results) >= len(methods))
                   else "incomplete",
                   progress={"done": len(results), "total": len(methods)},
                   recommended=recommended,
                   metric=task.get("metric"), score=best["score"] if best else None,
                   artifact=_artifact_of(root, best) if best else None)
        return row
    metrics = read_metrics(path / "metrics.jsonl")
    start = next((m for m in metrics if m.get("event") in ("start", "resume")), {})
    last_step = max((m["step"] for m in metrics if isinstance(m.get("step"), int)), default=0)
    finished = any(m.get("event") == "done" for m in metrics)
    method = config.get("method") or re.sub(r"-\d{8}-\d{6}(-\d+)?$", "", path.name)
    if "search" in config or "shots" in config:  # a `hone prompt` run records its settings flat
        method = "prompt-search" if config.get("search") else "prompt"
    artifact_path = path / "artifact"
    if (artifact_path / "hone.json").exists():
        manifest = _json(artifact_path / "hone.json")
        row["artifact"] = run_id(root, artifact_path)
        row["metric"], row["score"] = artifact_score(manifest)
        finished = True
    if "task_name" in config:  # `hone prompt` records the task's source as "task" and its name as "task_name"
        task, source = config["task_name"], config.get("task")
    else:
        task, source = config.get("task"), config.get("task_source")
    row.update(kind="prompt" if method.startswith("prompt") else "train", method=method, task=task,
               task_source=source, status="done" if finished else "incomplete",
               progress={"done": last_step, "total": start.get("total_steps")})
    return row


def _artifact_of(root: Path, result: dict) -> str | None:
    path = result.get("artifact")
    if not path:
        return None
    try:
        return run_id(root, Path(path))
    except ValueError:
        return None  # outside the runs folder


def _mtime(path: Path) -> float:
    try:
        return max(os.stat(p).st_mtime for p in (path, path / "metrics.jsonl", path / "compare.json") if p.exists())
    except OSError:
        return 0.0


def list_runs(root: Path) -> list[dict]:
    """Every run folder under `root`, newest first; a compare run's method folders are listed inside it."""
    runs, inner = [], set()
    for path in _walk(root, 3):
        if any(parent in inner for parent in path.parents) or path.name == "artifact":
            continue
        if is_run(path):
            runs.append(summarize_run(root, path))
            inner.add(path)
    return sorted(runs, key=lambda r: -r["modified"])


def metrics_since(path: Path, since: int = 0) -> tuple[list[dict], int]:
    """Rows of `metrics.jsonl` from line `since` on, and the line count (the next call's `since`)."""
    rows = read_metrics(path / "metrics.jsonl")
    return rows[since:], len(rows)


def log_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    """The end of a log, with progress-bar redraws (carriage returns) collapsed to their last state."""
    if not path.exists():
        return ""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - limit))
        text = handle.read().decode("utf-8", errors="replace")
    return "\n".join(line.rsplit("\r", 1)[-1] if line.rstrip("\r") else "" for line in text.split("\n"))


def run_detail(root: Path, path: Path, *, since: int = 0) -> dict:
    """Everything the run page shows: the summary, config, new metrics rows, log tail, artifact, leaderboard."""
    if not path.is_dir() or not is_run(path):
        raise NotFound("no such run folder", where=str(path), fix="pick a run from the run list")
    detail = summarize_run(root, path)
    detail["config"] = (path / "config.yaml").read_text(encoding="utf-8") if (path / "config.yaml").exists() else ""
    detail["metrics"], detail["metrics_next"] = metrics_since(path, since)
    detail["log"] = log_tail(path / "log.txt")
    if detail["kind"] == "compare":
        detail["leaderboard"] = leaderboard(path)
        detail["children"] = [summarize_run(root, p) for p in sorted(path.iterdir())
                              if p.is_dir() and (is_run(p) or (p / "artifact" / "hone.json").exists())]
        detail["report"] = (path / "report.html").exists()
    if detail.get("artifact"):
        detail["artifact_info"] = describe_artifact(root, inside(root, detail["artifact"]))
    return detail


def leaderboard(path: Path) -> dict:
    """A compare run's leaderboard (best first) and recommendation, as compare.json has them now."""
    from honellm.compare.results import CompareRun

    run = CompareRun.load(path)
    return {"metric": run.task.get("metric"), "split": run.split, "budget_seconds": run.budget_seconds,
            "methods": run.methods, "rows": [r.to_dict() for r in run.ordered()],
            "recommendation": run.recommendation}


# ------------------------------------------------------------------------------------------------- artifacts


def describe_artifact(root: Path, path: Path) -> dict:
    manifest = _json(path / "hone.json")
    if not manifest:
        raise NotFound("not a Hone artifact (no readable hone.json)", where=str(path),
                        fix="pick an artifact from the artifact list")
    metric, score = artifact_score(manifest)
    program = _json(path / "prompt.json")
    return {"id": run_id(root, path), "path": str(path), "name": manifest.get("name"),
            "method": manifest.get("method"), "kind": manifest.get("kind"),
            "base_model": (manifest.get("base_model") or {}).get("id"), "task": (manifest.get("task") or {}).get("name"),
            "created_at": manifest.get("created_at"), "metric": metric, "score": score,
            "system": program.get("system"), "demonstrations": len(program.get("demonstrations") or []),
            "metrics": manifest.get("metrics") or {}, "cost": manifest.get("cost") or {},
            "run": run_id(root, path.parent) if is_run(path.parent) else None}


def list_artifacts(root: Path) -> list[dict]:
    """Every artifact (a folder with hone.json) under `root`, newest first."""
    found = []
    for path in _walk(root):
        if (path / "hone.json").exists():
            try:
                found.append(describe_artifact(root, path))
            except HoneError:
                continue
    return sorted(found, key=lambda a: a.get("created_at") or "", reverse=True)


# -------------------------------------------------------------------------------------------- task leaderboard


def task_report(root: Path, task: str) -> str:
    """An HTML report (Hone's own report page) of every finished run of `task`, ranked by validation score.

    Standalone runs (`hone tune`, `hone align`, `hone prompt`) are scored on validation by their recipes, not on
    one shared held-out split, so this is a guide between runs; `hone compare` is the fair comparison."""
    from honellm.compare.report import render_report
    from honellm.compare.results import CompareRun, MethodResult

    results, metric, config = {}, None, {}
    for art in list_artifacts(root):
        if art["task"] != task or art["score"] is None or art["kind"] == "reward_model":
            continue
        cost = art["cost"]
        # the artifact's folder below the task's folder: lora-20261205-1200, or compare-20261205-1200/lora
        label = art["id"].removesuffix("/artifact").split("/", 1)[-1]
        family = "prompting" if art["kind"] == "prompt" else ("reward" if art["method"] in _reward_methods()
                                                               else "tuning")
        metric = metric or art["metric"]
        run_dir = inside(root, art["run"]) if art["run"] else None
        results[label] = MethodResult(
            method=label, family=family, status="done", metric=art["metric"], score=art["score"],
            artifact=art["path"], run_dir=str(run_dir) if run_dir else None,
            train_seconds=float(cost.get("train_seconds") or 0), train_tokens=int(cost.get("train_tokens") or 0),
            trainable_params=int(cost.get("trainable_params") or 0),
            peak_memory_mb=cost["peak_memory_bytes"] / 2**20 if cost.get("peak_memory_bytes") else None)
        config = config or _json(Path(art["path"]) / "hone.json").get("task", {}).get("config", {})
    if not results:
        raise HoneError(f"no finished run of task {task!r} has a validation score", where=str(root),
                        fix="start a run of this task, or open a compare run's report")
    run = CompareRun(root, {**config, "name": task, "metric": metric}, list(results), "validation", None, None,
                     results)
    best = run.ordered()[0]
    run.recommendation = {"method": best.method, "family": best.family, "reasons": [
        f"best validation {metric}: {best.score:.3f} among {len(results)} run(s) of this task",
        "each run was scored on validation by its own recipe; `hone compare` judges methods on one held-out split"]}
    return render_report(run)


def _reward_methods() -> set[str]:
    return set(method_names()["align"])


def method_names() -> dict[str, list[str]]:
    """The method names `hone tune` and `hone align` accept (from their registries), for the start form."""
    from honellm.methods.catalog import all_methods  # the one registry of methods

    names: dict[str, list[str]] = {"tune": sorted(all_methods("tuning")), "align": sorted(all_methods("reward"))}
    return names
