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
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from honellm.compare.recommend import recommend
from honellm.compare.results import CompareRun, MethodResult
from honellm.errors import HoneError
from honellm.runtime.tasks import load_task
from honellm.task import Task

log = logging.getLogger("honellm.compare")

DEFAULT_METHODS = ("zero-shot", "few-shot", "prompt-search", "lora", "dora", "ia3", "dpo", "grpo")
LATENCY_REQUESTS = 5
ONLINE = ("grpo", "rloo", "ppo", "rft", "best_of_n")  # methods that sample and score their own answers
PROMPT_SETTINGS = {"shots": int, "selector": str, "per_query": lambda v: v.lower() in ("1", "true", "yes"),
                   "calibration": str, "max_examples": int, "search": int, "propose": int, "seed": int}


@dataclass(frozen=True)
class CompareMethod:
    """How compare runs one method: its family, whether the task's data supports it, and how to make it."""

    name: str
    family: str
    applicable: Callable[[Task], str | None]  # None, or why the method cannot run on this task
    run: Callable[..., object]  # (task, out: Path, budget_seconds, overrides, progress) -> Artifact


# ----------------------------------------------------------------------------------------------- the methods


def _needs_targets(task: Task) -> str | None:
    if task.kind in ("sft", "reference", "preference"):
        return None
    return f"needs records with answers; this task has {task.kind} records"


def _needs_train_targets(task: Task) -> str | None:
    reason = _needs_targets(task)
    if reason:
        return reason
    return None if task.has_split("train") else "needs a train split"


def _run_zero_shot(task, out: Path, budget, overrides, progress):
    from honellm.artifact import Artifact

    art = Artifact.zero_shot(task.config.model, task)
    art.save(out / "artifact", force=True)
    return art


def _run_prompt(task, out: Path, budget, overrides, progress, *, search: bool):
    from honellm.prompting.search import make_prompt_artifact

    # few-shot: one demonstration per label, fixed for every query (its KV prefix is shared), or 4 BM25
    # neighbours per query for tasks without labels; the search tries shots, selectors and calibration itself.
    choices = task.config.choices
    settings = {"search": 12} if search else {"shots": len(choices) if choices else 4,
                                             "selector": "balanced" if choices else "bm25", "per_query": not choices}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in PROMPT_SETTINGS:
            raise HoneError(f"unknown prompting setting {key!r}", where=f"--set {item}",
                            fix=f"settings: {', '.join(PROMPT_SETTINGS)}")
        settings[key] = PROMPT_SETTINGS[key](value)
    result = make_prompt_artifact(task, None, run_dir=out, out=out / "artifact", force=True,
                                  max_seconds=budget or 1800.0, progress=progress, **settings)
    return result.artifact


def _run_tune(task, out: Path, budget, overrides, progress, *, method: str):
    from honellm.tuning import method_config, tune

    spec, config = method_config(method, None, _budget_overrides(overrides, budget))
    return tune(task, spec.name, config, out=out, force=True)


def _run_align(task, out: Path, budget, overrides, progress, *, method: str):
    from honellm.reward.recipes import align, align_config

    spec, config = align_config(method, None, _budget_overrides(overrides, budget))
    return align(task, spec.name, config, out=out, force=True)


def _with_search(spec: CompareMethod, trials: int, *, seeds: int = 1, split: str = "test",
                 limit: int | None = None) -> CompareMethod:
    """`spec` made by a settings search (honellm.search), where the method has a search space."""
    from dataclasses import replace
    from functools import partial

    from honellm.search.spaces import SPACES

    if spec.name not in SPACES:
        return spec
    return replace(spec, run=partial(_run_search, method=spec.name, trials=trials, seeds=seeds, split=split,
                                     limit=limit))


def _run_search(task, out: Path, budget, overrides, progress, *, method: str, trials: int, seeds: int = 1,
                split: str = "test", limit: int | None = None):
    from honellm.search import search
    from honellm.search.seeds import run_seeds, seeds_for_budget

    result = search(task, method, n_trials=trials, budget_seconds=budget, base_overrides=overrides,
                    out=out / "search", force=True, progress=progress)
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
    # The cost of making it is the whole search (every trial), as the user pays it.
    artifact.manifest.cost = {**(artifact.manifest.cost or {}), "train_seconds": round(result.seconds, 2),
                              "best_trial_train_seconds": (artifact.manifest.cost or {}).get("train_seconds"),
                              "search_trials": len(result.trials), "search_pruned": result.pruned}
    return artifact


def _budget_overrides(overrides: list[str], budget: float | None) -> list[str]:
    if budget is None or any(o.startswith("max_seconds=") for o in overrides):
        return list(overrides)
    return [*overrides, f"max_seconds={budget}"]


def compare_methods() -> dict[str, CompareMethod]:
    """Every method compare can run: prompting, every registered tuning method, every align method."""
    from functools import partial

    from honellm.reward.recipes import all_align_methods
    from honellm.tuning import all_methods

    methods = {
        "zero-shot": CompareMethod("zero-shot", "prompting", lambda t: None, _run_zero_shot),
        "few-shot": CompareMethod("few-shot", "prompting", _needs_train_targets, partial(_run_prompt, search=False)),
        "prompt-search": CompareMethod(
            "prompt-search", "prompting",
            lambda t: _needs_train_targets(t) or (None if t.has_split("validation") else "needs a validation split"),
            partial(_run_prompt, search=True)),
    }
    for name in all_methods():
        methods[name] = CompareMethod(name, "tuning", _needs_train_targets, partial(_run_tune, method=name))
    for name, spec in all_align_methods().items():
        kinds = spec.data

        def applicable(task, kinds=kinds, name=name):
            if task.kind not in kinds:
                return f"trains on {' or '.join(kinds)} data; this task has {task.kind} records"
            if name in ONLINE and not task.config.rewards:
                from honellm.reward.rollout import metric_reward

                if metric_reward(task) is None:
                    return (f"needs a reward: the task's `rewards:`, or a metric that checks generated answers "
                            f"({task.metric} does not)")
            return None

        methods[name] = CompareMethod(name, "reward", applicable, partial(_run_align, method=name))
    return methods


# ----------------------------------------------------------------------------------------------- running


def compare(task_path: str, methods: list[str] | None = None, overrides: list[str] | None = None, *,
            budget_seconds: float | None = None, split: str | None = None, limit: int | None = None,
            out: str | Path | None = None, resume: bool = False, force: bool = False,
            method_overrides: dict[str, list[str]] | None = None, progress: bool = True,
            search_trials: int = 0, seeds: int = 1) -> CompareRun:
    """Run `methods` on the task and evaluate each on the same split; returns the finished CompareRun.

    `search_trials`: each method with a search space first searches its settings on validation in that many
    trials within its budget (docs/search.md) and is judged by its best trial's artifact; with `seeds` > 1 its
    best settings are then re-run with seeds 1, 2, ... (as many as the budget left allows) and judged on the same
    split, their scores beside the main one in the row's `extra["seed_scores"]` (the recommendation's tie rule).
    """
    task = load_task(task_path, overrides or [])
    available = compare_methods()
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

    for name in names:
        if name in run.results:
            log.info("compare: %s already done, reused", name)
            continue
        spec = available[name]
        if search_trials:
            spec = _with_search(spec, search_trials, seeds=seeds, split=split, limit=limit)
        reason = spec.applicable(task)
        if reason:
            run.results[name] = MethodResult(name, spec.family, "skipped", reason=reason)
            run.save()
            continue
        run.results[name] = _run_one(task, spec, run_dir / name, budget_seconds, split, limit,
                                     (method_overrides or {}).get(name, []), progress)
        run.save()

    run.recommendation = recommend(list(run.results.values()))
    run.save()
    return run


def _run_one(task, spec: CompareMethod, out: Path, budget, split, limit, overrides, progress) -> MethodResult:
    import torch

    from honellm.artifact import Artifact
    from honellm.evaluation.cost import PeakMemory
    from honellm.evaluation.evaluate import evaluate

    out.mkdir(parents=True, exist_ok=True)
    result = MethodResult(spec.name, spec.family, "failed", run_dir=str(out))
    started = time.perf_counter()
    # This method's own peak (training or search, then evaluation): the high-water mark is reset first, so
    # methods run earlier in this process do not count.
    with PeakMemory("cuda" if torch.cuda.is_available() else "cpu") as meter:
        try:
            artifact = spec.run(task, out, budget, overrides, progress)
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
    result.train_seconds = float(cost.get("train_seconds", 0.0 if spec.name == "zero-shot" else make_seconds))
    result.train_tokens = int(cost.get("train_tokens", 0))
    result.trainable_params = int(cost.get("trainable_params", 0))
    result.peak_memory_mb = round(meter.mb, 1) if meter.mb is not None else evaluation.cost.peak_memory_mb
    result.prompt_tokens = evaluation.cost.prompt_tokens_per_example
    result.latency_ms = measure_latency(art, task, model, tokenizer)
    result.extra = {"eval_mode": evaluation.mode, "extras": evaluation.extras}
    others = (art.manifest.metrics or {}).get("other_seed_scores")
    if others:  # compare --search --seeds N: this row's score and the best settings' other seeds
        result.extra["seed_scores"] = [result.score, *others]
    return result


def measure_latency(artifact, task, model, tokenizer, requests: int = LATENCY_REQUESTS) -> float | None:
    """Mean wall time of one request at batch 1 (the prompt program applied, the task's max_new_tokens, greedy):
    what a user of the served artifact waits. The same prompts for every method."""
    from honellm.data.chat import render_prompt
    from honellm.generation import Generator, SamplingParams

    split = "validation" if task.has_split("validation") else task.available_splits()[0]
    records = task.split(split)[:requests]
    if not records:
        return None
    spec = artifact.program.selector
    if spec is not None and spec.per_query:
        from honellm.runtime.selectors import select_demonstrations

        demos = select_demonstrations(spec, task, artifact.program, records, artifact.pool(), model=model,
                                      tokenizer=tokenizer)
    else:
        demos = [None] * len(records)
    prompts = [render_prompt(tokenizer, artifact.program.messages(task, r, d)) for r, d in zip(records, demos, strict=True)]
    generator = Generator(model, tokenizer, batch_size=1)
    params = SamplingParams(max_new_tokens=task.config.generation.max_new_tokens, temperature=0.0,
                            stop=tuple(task.config.generation.stop))
    generator.generate(prompts[:1], params)  # warm-up (first-call allocations, kernels)
    started = time.perf_counter()
    for prompt in prompts:
        generator.generate([prompt], params)
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
