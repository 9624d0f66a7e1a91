"""evaluate(): one artifact (or model) on one task split -> the metric with its 95% interval, and the cost.

Read top to bottom: resolve the task and artifact, apply the artifact's runtime to the model (loading it unless
one is passed in: the prompt program, per-query demonstrations, the inference settings such as best-of-n; see
honellm/runtime, the same code `hone serve` runs), pick the records, score them in the mode the metric needs
(see scoring.py), then attach the bootstrap interval and the cost.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from honellm.artifact import Artifact
from honellm.core.support import fast_path_support
from honellm.errors import HoneError
from honellm.evaluation.bootstrap import bootstrap_ci
from honellm.evaluation.cost import PeakMemory
from honellm.evaluation.metrics import METRICS
from honellm.evaluation.preference import score_preferences  # noqa: F401 - registers the "preference" mode
from honellm.evaluation.result import EvalCost, EvalResult, ExampleResult
from honellm.evaluation.scoring import SCORING_MODES, EvalContext, count_tokens, scoring_mode
from honellm.progress import progress as progress_bar
from honellm.runs import RunDir
from honellm.runtime.apply import ArtifactRuntime
from honellm.runtime.tasks import load_task

BOOTSTRAP_RESAMPLES = 1000


def evaluate(artifact_or_model, task, split: str = "test", limit: int | None = None, *, model=None, tokenizer=None,
             batch_size: int = 16, progress: bool = True, seed: int = 0, pool: list[dict] | None = None,
             encoder=None) -> EvalResult:
    """Evaluate an Artifact, an artifact folder, or a model name/path (its zero-shot artifact) on `task`.

    `model`/`tokenizer` evaluate a model already in memory (a training loop's, adapter attached) instead of
    loading the artifact's; the model is put in eval mode for the evaluation and restored after. `limit` takes
    the first N records of the split (the same N every time, so scores are comparable). `pool` gives the
    demonstration pool of an artifact not saved yet (default: the artifact's pool.jsonl); `encoder` a
    `TextEncoder` to reuse (the prompt search embeds the pool once for all its candidates). `seed` seeds
    sampling, random demonstration selection and the bootstrap.
    """
    task = load_task(task)
    artifact = artifact_or_model if isinstance(artifact_or_model, Artifact) else Artifact.resolve(artifact_or_model, task)
    metric = METRICS[task.metric]
    mode = scoring_mode(task, metric)
    records = task.split(split)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise HoneError(f"the {split} split of task {task.name!r} has no records to evaluate", where=task.source,
                        fix="check the data file, or choose another --split")
    runtime = ArtifactRuntime.load(artifact, task, model=model, tokenizer=tokenizer, batch_size=batch_size)
    model, tokenizer = runtime.model, runtime.tokenizer
    runner = getattr(runtime.generator, "runner_name", None) or getattr(
        getattr(runtime.generator, "generator", None), "runner_name", None)  # through a wrapper (best-of-n, tools)
    paths = f"{runner} runner; {fast_path_support(model).summary()}"  # honellm.core.support
    was_training = getattr(model, "training", False)
    model.eval()
    bar = progress_bar(total=len(records), desc=f"eval {task.name}/{split}", unit="ex", disable=None if progress else True)
    started = time.perf_counter()
    try:
        with PeakMemory(_device_of(model)) as memory:
            demonstrations = runtime.demonstrations(records, seed=seed, pool=pool, encoder=encoder)
            ctx = EvalContext(task=task, program=artifact.program, artifact=artifact, model=model, tokenizer=tokenizer,
                              generator=runtime.generator, records=records, demonstrations=demonstrations,
                              batch_size=batch_size, seed=seed, bar=bar)
            scored = SCORING_MODES[mode](ctx, metric)
    finally:
        bar.close()
        if was_training:
            model.train()
    wall = time.perf_counter() - started

    scores = [float(s) for s in scored.scores]
    score = sum(scores) / len(scores)
    low, high = bootstrap_ci(scores, resamples=BOOTSTRAP_RESAMPLES, seed=seed)
    prompt_tokens = count_tokens(tokenizer, scored.prompts)
    cost = EvalCost(
        prompt_tokens_per_example=round(sum(prompt_tokens) / len(prompt_tokens), 2),
        completion_tokens_per_example=(round(sum(scored.completion_tokens) / len(scored.completion_tokens), 2)
                                       if scored.completion_tokens else None),
        shared_prefix_tokens=count_tokens(tokenizer, [scored.shared_prefix])[0] if scored.shared_prefix else 0,
        examples_per_second=round(len(records) / wall, 3) if wall > 0 else math.inf,
        wall_seconds=round(wall, 3),
        peak_memory_mb=round(memory.mb, 1) if memory.mb is not None else None,
        memory_kind=memory.kind,
    )
    examples = [
        ExampleResult(index=i, prompt=scored.prompts[i], prediction=scored.predictions[i],
                      reference=scored.references[i], score=scores[i],
                      query=runtime.query(records[i]),
                      details=(scored.details[i] if scored.details else {}) | {"where": getattr(records[i], "where", None)})
        for i in range(len(records))
    ]
    return EvalResult(
        task=task.name, split=split, metric=metric.name, score=score, ci95=(low, high), n=len(records), mode=mode,
        higher_is_better=metric.higher_is_better, extras=scored.extras, cost=cost,
        artifact={"name": artifact.name, "path": str(artifact.path) if artifact.path else None,
                  "method": artifact.manifest.method, "kind": artifact.kind, "base_model": artifact.base_model},
        config={"limit": limit, "seed": seed, "batch_size": batch_size, "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
                "task_source": task.source, "model_paths": paths},
        records=examples, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def _device_of(model):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return "cpu"


def evaluate_to_folder(artifact_text: str, task_text: str | None = None, overrides: list[str] | None = None, *,
                       split: str = "test", limit: int | None = None, out: str | Path | None = None,
                       force: bool = False, batch_size: int = 16, seed: int = 0,
                       progress: bool = True, data: str | Path | None = None,
                       skip_invalid: bool = False) -> tuple[EvalResult, Path]:
    """What `hone eval` does: evaluate, write eval.json, and record the score in the artifact's manifest.

    eval.json goes to `out`, else into the artifact's folder, else into a new run folder
    `runs/<task>/eval-<timestamp>/`; an existing eval.json is kept unless `force` (checked before any work).

    `data`: a held-out JSONL (or CSV, Parquet) file in the task's format, evaluated as the task's test split
    (`data.test=FILE`, on any task, including one that splits a single `file:`); its records are checked as the
    task's are (a bad record is an error naming file:line; `skip_invalid` skips and counts them). The result is
    `eval-<file stem>.json` and the manifest keeps it under `file:<file name>`, so the task's own test score stays.
    """
    from honellm.evaluation.result import EVAL_FILE

    artifact_path = Path(artifact_text)
    saved = (artifact_path / "hone.json").exists()
    artifact = Artifact.load(artifact_path) if saved else None
    eval_file = EVAL_FILE
    if data is not None:
        data = Path(data).expanduser().resolve()
        if not data.is_file():
            raise HoneError("the held-out data file does not exist", where=f"--data {data}",
                            fix="give a JSONL file with records in the task's format")
        if split != "test":
            raise HoneError(f"--data is evaluated as the test split, not {split!r}", where="--split",
                            fix="leave --split out when you pass --data")
        overrides = [*(overrides or []), f"data.test={data}"]
        eval_file = f"eval-{data.stem}.json"
    task = _resolve_task(task_text, overrides or [], artifact, skip_invalid=skip_invalid)
    if artifact is None:
        artifact = Artifact.resolve(artifact_text, task)
    if out is not None:
        folder = Path(out)
    elif artifact.path is not None:
        folder = Path(artifact.path)
    else:
        folder = None
    if folder is not None and (folder / eval_file).exists() and not force:
        raise HoneError(f"{eval_file} already exists", where=str(folder / eval_file),
                        fix="pass --force to replace it, or --out DIR to write elsewhere")
    result = evaluate(artifact, task, split, limit, batch_size=batch_size, progress=progress, seed=seed)
    if data is not None:
        result.config["data"] = str(data)
    if folder is None:
        with RunDir.create(task.name, "eval") as run:
            run.write_config({"artifact": artifact_text, "task": task.source, "overrides": overrides or [],
                              "split": split, "limit": limit, "batch_size": batch_size, "seed": seed,
                              "data": str(data) if data is not None else None})
            run.log_metrics(**{result.metric: result.score, "ci_low": result.ci95[0], "ci_high": result.ci95[1],
                               "n": result.n})
            folder = run.path
    target = result.save(Path(folder) / eval_file)
    if artifact.path is not None:
        record_in_manifest(artifact, result, key=f"file:{data.name}" if data is not None else None)
    return result, target


def record_in_manifest(artifact, result: EvalResult, key: str | None = None) -> None:
    """Keep the score in hone.json under its split, or `key` (what `hone show` and compare read)."""
    metrics = dict(artifact.manifest.metrics)
    summary = result.summary()
    metrics[key or result.split] = {"task": result.task, "metric": result.metric, "score": summary["score"],
                                    "ci95": summary["ci95"], "n": result.n, "limit": result.config.get("limit")}
    if result.config.get("data"):
        metrics[key or result.split]["data"] = result.config["data"]
    artifact.update_manifest(metrics=metrics)


def _resolve_task(task_text: str | None, overrides: list[str], artifact, *, skip_invalid: bool = False):
    """The task named on the command line, else the one the artifact was made for."""

    if task_text:
        return load_task(task_text, overrides, skip_invalid=skip_invalid)
    reference = (artifact.manifest.task or {}) if artifact is not None else {}
    source = reference.get("source")
    if source and Path(source).exists():
        return load_task(source, overrides, skip_invalid=skip_invalid)
    raise HoneError("no task given" + (" and the artifact records none that can be found" if artifact else ""),
                    fix="pass --task TASK (a task YAML or a built-in task name)")
