"""`hone compare TASK --methods ...`: every method on the same task, split, metric and budget, one leaderboard.

Read top to bottom: plan (which methods apply to this task's data, and why the others are skipped), run each
method into its own folder under the compare run (resumable: finished methods are reused), evaluate every
artifact on the same split with the same evaluator, measure serving latency the same way for all, then rank
and recommend (honellm/compare/recommend.py).

`--budget` is the wall-clock training (or search) time each method gets; evaluation is not counted, so every
method is judged on the same examples whatever its budget.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from pathlib import Path

from honellm.compare.recommend import recommend
from honellm.compare.results import CompareRun, MethodResult
from honellm.errors import HoneError
from honellm.methods.catalog import all_methods, method_config, run_method
from honellm.methods.registry import Method
from honellm.runtime.apply import ArtifactRuntime
from honellm.runtime.tasks import load_task
from honellm.task import Task

log = logging.getLogger("honellm.compare")

DEFAULT_METHODS = ("zero-shot", "few-shot", "prompt-search", "lora", "dora", "ia3", "dpo", "grpo")
LATENCY_REQUESTS = 5
# compare's own starting settings for a method (a --set METHOD:KEY=VALUE wins): a shorter prompt search
DEFAULT_SETTINGS = {"prompt-search": ["candidates=12"]}


def _settings(spec: Method, overrides: list[str], budget: float | None, search_trials: int = 0) -> list[str]:
    """The method's settings: compare's defaults, the user's --set, and the budget as max_seconds where the
    method's config has it (training and search; zero- and few-shot take no time to make).

    Under `--search N` the prompt search is prompting's own search (instructions, then demonstrations, each
    candidate scored with every calibration from one pass: a structured search that a sampler over the same
    choices does worse at, measured on SST-2), given 3N candidates: a candidate costs one validation pass,
    a tuning trial a training run, and the budget bounds both."""
    search = [f"candidates={max(12, 3 * search_trials)}"] if search_trials and spec.name == "prompt-search" else []
    settings = [*DEFAULT_SETTINGS.get(spec.name, []), *search, *overrides]
    if budget is not None and "max_seconds" in spec.config.model_fields \
            and not any(o.startswith("max_seconds=") for o in overrides):
        settings.append(f"max_seconds={budget}")
    return settings


# ----------------------------------------------------------------------------------------------- running


def compare(task_path: str, methods: list[str] | None = None, overrides: list[str] | None = None, *,
            budget_seconds: float | None = None, split: str | None = None, limit: int | None = None,
            out: str | Path | None = None, resume: bool = False, force: bool = False,
            method_overrides: dict[str, list[str]] | None = None, progress: bool = True,
            search_trials: int = 0, seeds: int = 1) -> CompareRun:
    """Run `methods` on the task and evaluate each on the same split; returns the finished CompareRun.

    `search_trials`: each method with a search space (honellm.search.spaces) first searches its settings on
    validation in that many trials within its budget (docs/search.md) and is judged by its best trial's artifact;
    with `seeds` > 1 its best settings are then re-run with seeds 1, 2, ... (as many as the budget left allows) and
    judged on the same split, and the recommendation treats methods whose seed spreads overlap as tied.
    """
    from honellm.search.compose import COMPOSITIONS

    task = load_task(task_path, overrides or [])
    available = {**all_methods(), **COMPOSITIONS}  # the one registry of methods (every family), and compositions
    names = list(methods or DEFAULT_METHODS)
    unknown = [m for m in names if m not in available]
    if unknown:
        import difflib

        hints = [f"{m!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(m, available, n=1)) else "")
                 for m in unknown]
        raise HoneError(f"unknown method{'s' if len(unknown) > 1 else ''}: {', '.join(hints)}", where="--methods",
                        fix=f"methods: {', '.join(available)}")
    held_out = None
    if split is None:
        split = "test"
        if not task.has_split("test"):
            # Judge every method on records none of them trained on, searched with or selected checkpoints by.
            held_out = task.hold_out("test", source="train", seed=0)
            log.info("compare: task %s has no test split; held out %d train records as its test split",
                     task.name, held_out["records"])
    if not task.has_split(split):
        raise HoneError(f"task {task.name!r} has no {split} split to compare on", where=task.source,
                        fix="add data.test (or data.file with data.split), or pass --split validation")

    run_dir = _compare_dir(task, out, resume, force)
    previous = CompareRun.load(run_dir) if (run_dir / "compare.json").exists() else None
    run = CompareRun(run_dir, _task_summary(task) | ({"held_out": held_out} if held_out else {}), names, split,
                     budget_seconds, limit)
    if previous is not None:
        if (previous.split, previous.limit) != (split, limit):
            raise HoneError(f"the run in {run_dir} compared on split={previous.split} limit={previous.limit}",
                            where=str(run_dir), fix="resume with the same --split and --limit, or use --force")
        run.results = {k: v for k, v in previous.results.items() if v.done and v.artifact and Path(v.artifact).exists()}
    run.save()

    # Compositions run after the methods, so they can build on their rows (lora+prompt-search on the lora row).
    for name in [m for m in names if m not in COMPOSITIONS] + [m for m in names if m in COMPOSITIONS]:
        if name in run.results:
            log.info("compare: %s already done, reused", name)
            continue
        spec = available[name]
        missing = spec.missing(task)
        if missing:
            run.results[name] = MethodResult(name, spec.family, "skipped", reason=missing[0])
            run.save()
            continue
        parts = _composition_inputs(spec, run, method_overrides or {}, budget_seconds) \
            if name in COMPOSITIONS else None
        run.results[name] = _run_one(task, spec, run_dir / name, budget_seconds, split, limit,
                                     (method_overrides or {}).get(name, []), progress, search_trials=search_trials,
                                     seeds=seeds, parts=parts)
        run.save()

    run.recommendation = recommend(list(run.results.values()))
    run.save()
    return run


def _composition_inputs(spec, run: CompareRun, method_overrides: dict[str, list[str]], budget) -> tuple[dict, dict]:
    """(each part's settings, the finished rows it reuses) for a composition's row: a part runs with its method's
    settings in this comparison and an equal share of the budget; a reused row is charged at its row's cost."""
    import json

    from honellm.artifact import Artifact

    methods = all_methods()
    reused = {}
    for part in spec.reuses:
        row = run.results.get(part)
        if row is not None and row.done and row.artifact and Path(row.artifact).exists():
            artifact = Artifact.load(row.artifact, verify_base=False)
            artifact.manifest.cost = {**(artifact.manifest.cost or {}), "train_seconds": row.train_seconds}
            reused[part] = artifact
            folder = Path(row.run_dir or "")
            if (folder / "seeds" / "seeds.json").exists():  # its best settings' other seeds (--search --seeds)
                seeds = json.loads((folder / "seeds" / "seeds.json").read_text())
                reused[f"{part}:seeds"] = {s: Artifact.load(a, verify_base=False) for s, a in
                                           zip(seeds["seeds"], seeds["artifacts"], strict=True) if Path(a).exists()}
            if (folder / "search" / "best.json").exists():  # the settings its search found
                reused[f"{part}:overrides"] = json.loads((folder / "search" / "best.json").read_text())[
                    "best_overrides"]
    share = None if budget is None else budget / max(1, sum(p not in reused for p in spec.parts))
    settings = {p: _settings(methods[p], method_overrides.get(p, []), share) for p in spec.parts}
    return settings, reused


def _run_one(task, spec: Method, out: Path, budget, split, limit, overrides, progress, *, search_trials: int = 0,
             seeds: int = 1, parts: tuple[dict, dict] | None = None) -> MethodResult:
    import torch

    from honellm.artifact import Artifact
    from honellm.evaluation.cost import PeakMemory, making_seconds
    from honellm.evaluation.evaluate import evaluate

    out.mkdir(parents=True, exist_ok=True)
    result = MethodResult(spec.name, spec.family, "failed", run_dir=str(out))
    started = time.perf_counter()
    # This method's own peak (training or search, then evaluation): the high-water mark is reset first, so
    # methods run earlier in this process do not count.
    with PeakMemory("cuda" if torch.cuda.is_available() else "cpu") as meter:
        try:
            from honellm.search.spaces import SPACES

            others = None
            if parts is not None:  # a composition (honellm.search.compose.COMPOSITIONS): its parts, then it
                artifact = spec.make(task, *parts, out)
            elif search_trials and spec.name in SPACES and spec.family != "prompting":  # a settings search
                artifact, others = _run_search(task, out, budget, overrides, progress, method=spec.name,
                                       trials=search_trials, seeds=seeds, split=split, limit=limit)
            else:
                _, config = method_config(spec.name, None, _settings(spec, overrides, budget, search_trials))
                artifact = run_method(task, spec, config, out=out, force=True)
        except HoneError as err:
            result.reason = err.render().split("\n")[0]
            return result
        except Exception as err:  # noqa: BLE001 - one method's crash must not lose the others' results
            (out / "error.txt").write_text(traceback.format_exc())
            result.reason = f"{type(err).__name__}: {err} (traceback in {out / 'error.txt'})"
            return result
        make_seconds = time.perf_counter() - started
        art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
        model, tokenizer = art.load_model()
        evaluation = evaluate(art, task, split, limit, model=model, tokenizer=tokenizer, progress=progress)
    evaluation.save(out / "eval.json")
    cost = art.manifest.cost or {}
    result.status = "done"
    result.metric, result.score, result.n = evaluation.metric, evaluation.score, evaluation.n
    result.ci_low, result.ci_high = evaluation.ci95
    result.artifact = str(art.path) if art.path else None
    result.eval_path = str(out / "eval.json")
    # all the work of making it (rollouts, reference passes, a whole search), as the user pays it
    result.train_seconds = making_seconds(cost, default=0.0 if spec.name == "zero-shot" else make_seconds)
    result.train_tokens = int(cost.get("train_tokens", 0))
    result.trainable_params = int(cost.get("trainable_params", 0))
    result.peak_memory_mb = round(meter.mb, 1) if meter.mb is not None else evaluation.cost.peak_memory_mb
    result.prompt_tokens = evaluation.cost.prompt_tokens_per_example
    result.latency_ms = measure_latency(art, task, model, tokenizer)
    result.extra = {"eval_mode": evaluation.mode, "extras": evaluation.extras}
    if others is not None:  # compare --search --seeds N: this row's score and the best settings' other seeds
        result.extra["seed_scores"] = [result.score, *others.scores]
        result.extra["seeds"] = seeds_row(evaluation, others)
    return result


def seeds_row(evaluation, others) -> dict:
    """The leaderboard's seed figures: the row's own run (seed 0) and the other seeds' `SeedSummary`, together:
    their mean, spread (min-max, std) and the bootstrap interval of the seed-averaged per-example scores."""
    from honellm.search.seeds import summarize_seeds

    per_example = [[float(e.score) for e in evaluation.records], *others.per_example]
    both = summarize_seeds(others.method, [0, *others.seeds], [evaluation.score, *others.scores], per_example,
                           split=evaluation.split, metric=evaluation.metric)
    row = {k: v for k, v in both.to_dict().items() if k in ("seeds", "scores", "mean", "std", "low", "high", "ci95")}
    row["ci95"] = [None if math.isnan(v) else v for v in row["ci95"]]  # compare.json stays strict JSON
    return row


def _run_search(task, out: Path, budget, overrides, progress, *, method: str, trials: int, seeds: int = 1,
                split: str = "test", limit: int | None = None):
    from honellm.search import search
    from honellm.search.seeds import run_seeds, seeds_for_budget

    # The budget covers the search and the seeds: the search leaves room for seeds - 1 runs of its longest trial.
    result = search(task, method, n_trials=trials, budget_seconds=budget, base_overrides=overrides,
                    out=out / "search", force=True, reserve_runs=max(0, seeds - 1), progress=progress)
    artifact = result.artifact
    best_seconds = next((t.seconds for t in result.trials
                         if artifact.path is not None and Path(t.run_dir) == artifact.path.parent), result.seconds)
    left = None if budget is None else budget - result.seconds
    extra = seeds_for_budget(left, best_seconds, wanted=seeds) - 1 if seeds > 1 else 0
    if extra > 0:
        # The best settings with other seeds, judged on the compare split (the search itself never reads it).
        others = run_seeds(task, method, result.best_overrides, seeds=tuple(range(1, extra + 1)), out=out / "seeds",
                           split=split, limit=limit, progress=progress)
        artifact.manifest.metrics = {**(artifact.manifest.metrics or {}), "other_seed_scores": others.scores}
    else:
        others = None
    # The cost of making it is the whole search (every trial), as the user pays it.
    artifact.manifest.cost = {**(artifact.manifest.cost or {}), "train_seconds": round(result.seconds, 2),
                              "making_seconds": round(result.seconds, 2),
                              "best_trial_train_seconds": (artifact.manifest.cost or {}).get("train_seconds"),
                              "search_trials": len(result.trials), "search_pruned": result.pruned}
    return artifact, others


def measure_latency(artifact, task, model, tokenizer, requests: int = LATENCY_REQUESTS) -> float | None:
    """Mean wall time of one request at batch 1 (the artifact's runtime applied: its program, per-query
    demonstrations and inference settings such as best-of-n; the task's max_new_tokens, greedy): what a user of
    the served artifact waits. The same prompts for every method."""
    from honellm.data.chat import render_prompt
    from honellm.generation import SamplingParams

    split = "validation" if task.has_split("validation") else task.available_splits()[0]
    records = task.split(split)[:requests]
    if not records:
        return None
    runtime = ArtifactRuntime.load(artifact, task, model=model, tokenizer=tokenizer, batch_size=1)
    demos = runtime.demonstrations(records) or [None] * len(records)
    prompts = [render_prompt(tokenizer, artifact.program.messages(task, r, d)) for r, d in zip(records, demos, strict=True)]
    generator = runtime.generator
    context = getattr(generator, "takes_context", False)  # best-of-n: rewards may read the record
    params = SamplingParams(max_new_tokens=task.config.generation.max_new_tokens, temperature=0.0,
                            stop=tuple(task.config.generation.stop))
    generator.generate(prompts[:1], params, **({"records": records[:1]} if context else {}))  # warm-up
    started = time.perf_counter()
    for prompt, record in zip(prompts, records, strict=True):
        generator.generate([prompt], params, **({"records": [record]} if context else {}))
    return (time.perf_counter() - started) / len(prompts) * 1000


def _compare_dir(task: Task, out, resume: bool, force: bool) -> Path:
    from honellm.runs import _safe, runs_root

    if out is not None:
        path = Path(out)
        if path.exists() and any(path.iterdir()) and not (resume or force):
            raise HoneError("the compare folder already exists", where=str(path),
                            fix="pass --resume to reuse its finished methods, --force to start over, or another --out")
        if force and not resume and path.exists():
            import shutil

            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return path
    root = runs_root() / _safe(task.name)
    if resume:
        found = sorted(root.glob("compare-*"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    path = root / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _task_summary(task: Task) -> dict:
    return {"name": task.name, "source": task.source, "model": task.config.model, "metric": task.metric,
            "kind": task.kind, "format": task.format, "choices": task.config.choices,
            "splits": {s: len(task.split(s)) for s in task.available_splits()}}
