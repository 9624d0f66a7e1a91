"""evaluate(): one artifact (or model) on one task split -> the metric with its 95% interval, and the cost.

Read top to bottom: resolve the task and artifact, load the model unless one is passed in, pick the
records, select demonstrations per query when the program asks for it, score the records in the mode the
metric needs (see scoring.py), then attach the bootstrap interval and the cost.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from honellm.errors import HoneError
from honellm.evaluation.bootstrap import bootstrap_ci
from honellm.evaluation.cost import PeakMemory
from honellm.evaluation.metrics import METRICS
from honellm.evaluation.result import EvalCost, EvalResult, ExampleResult
from honellm.evaluation.scoring import SCORING_MODES, EvalContext, count_tokens, scoring_mode

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
    from honellm.artifact import Artifact
    from honellm.task import Task

    task = task if isinstance(task, Task) else Task.load(task)
    artifact = artifact_or_model if isinstance(artifact_or_model, Artifact) else Artifact.resolve(artifact_or_model, task)
    metric = METRICS[task.metric]
    mode = scoring_mode(task, metric)
    records = task.split(split)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise HoneError(f"the {split} split of task {task.name!r} has no records to evaluate", where=task.source,
                        fix="check the data file, or choose another --split")
    if model is None:
        model, tokenizer = artifact.load_model()
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")

    from honellm.generation import Generator
    from honellm.progress import progress as progress_bar

    generator = Generator(model, tokenizer, batch_size=batch_size)
    if (artifact.manifest.model_extra or {}).get("inference"):  # sampling at inference, e.g. best-of-n
        from honellm.reward.recipes.best_of_n import inference_generator

        generator = inference_generator(artifact, generator, task=task)
    if task.config.tools:  # tool episodes: the answer is each episode's final text
        from honellm.generation.tools import ToolEnvironment, ToolGenerator, load_tools

        tools = load_tools(task.config.tools, task.base_dir, where=f"{task.source} (tools)")
        generator = ToolGenerator(generator, ToolEnvironment(tools, tokenizer, max_turns=task.config.tool_turns))
    was_training = getattr(model, "training", False)
    model.eval()
    bar = progress_bar(total=len(records), desc=f"eval {task.name}/{split}", unit="ex", disable=None if progress else True)
    started = time.perf_counter()
    try:
        with PeakMemory(_device_of(model)) as memory:
            demonstrations = _select_demonstrations(artifact, task, records, model, tokenizer, seed, pool, encoder)
            ctx = EvalContext(task=task, program=artifact.program, artifact=artifact, model=model, tokenizer=tokenizer,
                              generator=generator, records=records, demonstrations=demonstrations,
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
    from honellm.prompting.selectors import query_text

    examples = [
        ExampleResult(index=i, prompt=scored.prompts[i], prediction=scored.predictions[i],
                      reference=scored.references[i], score=scores[i],
                      query=query_text(task, artifact.program, records[i]),
                      details=(scored.details[i] if scored.details else {}) | {"where": getattr(records[i], "where", None)})
        for i in range(len(records))
    ]
    return EvalResult(
        task=task.name, split=split, metric=metric.name, score=score, ci95=(low, high), n=len(records), mode=mode,
        higher_is_better=metric.higher_is_better, extras=scored.extras, cost=cost,
        artifact={"name": artifact.name, "path": str(artifact.path) if artifact.path else None,
                  "method": artifact.manifest.method, "kind": artifact.kind, "base_model": artifact.base_model},
        config={"limit": limit, "seed": seed, "batch_size": batch_size, "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
                "task_source": task.source},
        records=examples, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def _select_demonstrations(artifact, task, records, model, tokenizer, seed: int, pool: list[dict] | None, encoder):
    """Per-query demonstrations from the artifact's pool, when its program has a per-query selector."""
    spec = artifact.program.selector
    if spec is None or not spec.per_query:
        return None
    pool = pool if pool is not None else artifact.pool()
    if not pool:
        raise HoneError(f"the prompt program selects demonstrations per query ({spec.name}), but the artifact has "
                        "no demonstration pool", where=str(artifact.path) if artifact.path else artifact.name,
                        fix="re-create the artifact with `hone prompt` (it saves pool.jsonl beside the program)")
    from honellm.prompting.selectors import select_demonstrations

    return select_demonstrations(spec, task, artifact.program, records, pool, model=model, tokenizer=tokenizer,
                                 seed=seed, encoder=encoder)


def _device_of(model):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return "cpu"


def evaluate_to_folder(artifact_text: str, task_text: str | None = None, overrides: list[str] | None = None, *,
                       split: str = "test", limit: int | None = None, out: str | Path | None = None,
                       force: bool = False, batch_size: int = 16, seed: int = 0,
                       progress: bool = True) -> tuple[EvalResult, Path]:
    """What `hone eval` does: evaluate, write eval.json, and record the score in the artifact's manifest.

    eval.json goes to `out`, else into the artifact's folder, else into a new run folder
    `runs/<task>/eval-<timestamp>/`; an existing eval.json is kept unless `force` (checked before any work).
    """
    from honellm.artifact import Artifact
    from honellm.evaluation.result import EVAL_FILE

    artifact_path = Path(artifact_text)
    saved = (artifact_path / "hone.json").exists()
    artifact = Artifact.load(artifact_path) if saved else None
    task = _resolve_task(task_text, overrides or [], artifact)
    if artifact is None:
        artifact = Artifact.resolve(artifact_text, task)
    if out is not None:
        folder = Path(out)
    elif artifact.path is not None:
        folder = Path(artifact.path)
    else:
        folder = None
    if folder is not None and (folder / EVAL_FILE).exists() and not force:
        raise HoneError(f"{EVAL_FILE} already exists", where=str(folder / EVAL_FILE),
                        fix="pass --force to replace it, or --out DIR to write elsewhere")
    result = evaluate(artifact, task, split, limit, batch_size=batch_size, progress=progress, seed=seed)
    if folder is None:
        from honellm.runs import RunDir

        with RunDir.create(task.name, "eval") as run:
            run.write_config({"artifact": artifact_text, "task": task.source, "overrides": overrides or [],
                              "split": split, "limit": limit, "batch_size": batch_size, "seed": seed})
            run.log_metrics(**{result.metric: result.score, "ci_low": result.ci95[0], "ci_high": result.ci95[1],
                               "n": result.n})
            folder = run.path
    target = result.save(folder)
    if artifact.path is not None:
        record_in_manifest(artifact, result)
    return result, target


def record_in_manifest(artifact, result: EvalResult) -> None:
    """Keep the score in hone.json under its split (what `hone show` and compare read)."""
    metrics = dict(artifact.manifest.metrics)
    summary = result.summary()
    metrics[result.split] = {"task": result.task, "metric": result.metric, "score": summary["score"],
                             "ci95": summary["ci95"], "n": result.n, "limit": result.config.get("limit")}
    artifact.update_manifest(metrics=metrics)


def _resolve_task(task_text: str | None, overrides: list[str], artifact):
    """The task named on the command line, else the one the artifact was made for."""
    from honellm.task import Task

    if task_text:
        return Task.load(task_text, overrides)
    reference = (artifact.manifest.task or {}) if artifact is not None else {}
    source = reference.get("source")
    if source and Path(source).exists():
        return Task.load(source, overrides)
    raise HoneError("no task given" + (" and the artifact records none that can be found" if artifact else ""),
                    fix="pass --task TASK (a task YAML or a built-in task name)")
