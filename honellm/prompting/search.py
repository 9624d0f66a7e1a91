"""Prompt building and prompt search -> a prompt Artifact.

`build_prompt` makes one program: the task's system message and template, k demonstrations chosen by a
selector (one fixed set, or per query from a pool saved with the artifact), and optionally contextual
calibration offsets.

`search_prompt` tries candidate programs and keeps the best, in the spirit of DSPy's
BootstrapFewShotWithRandomSearch and MIPRO (Khattab et al. 2023; Opsahl-Ong et al. 2024), locally, for any
causal LM, and with labelled demonstrations taken straight from the training data (no bootstrapped traces):

1. instructions: the task's system message, its `prompt.instructions`, and (when the task lists none, or
   `propose` > 0) instructions the model writes itself after reading training examples; each scored zero-shot;
2. demonstrations: with the best instruction, (shots x selector) combinations in a seeded random order;
   then, budget left, with the second-best instruction;
3. calibration: for tasks with choices every candidate is scored uncalibrated and with each calibration
   method (content-free and batch, see calibration.py) from one forward pass over the validation records:
   calibration only adds per-label offsets after it, so the calibrated predictions are derived from the same
   log-likelihoods, exactly as the evaluator derives them.

Every candidate is scored on the validation split, never on test (the search does not read it), on at most
`max_examples` records, until `candidates` were tried or `max_seconds` passed. The table of everything tried
is printed and written to the run folder (`candidates.csv`). The best program's validation score is stored in
the artifact's manifest; `hone eval ARTIFACT --split validation` (with the same `--limit` when one was used)
reproduces it exactly.
"""

from __future__ import annotations

import csv
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from honellm.config import Config
from honellm.errors import HoneError
from honellm.program import PromptProgram, SelectorSpec
from honellm.tracking import ReportTo, Tracking, parse_report_to, report_to_field


class PromptSearchConfig(Config):
    """What `hone prompt --search N` tries, and its budget."""

    candidates: int = Field(16, ge=1, description="candidate programs to score (each also with every calibration)")
    shots: list[int] = Field(default_factory=lambda: [2, 4, 8], description="numbers of demonstrations to try")
    fixed_selectors: list[str] = Field(default_factory=lambda: ["random", "balanced"],
                                       description="selectors tried as one fixed set for all queries (shared KV prefix)")
    per_query_selectors: list[str] = Field(default_factory=lambda: ["bm25", "embedding", "mmr"],
                                           description="selectors tried per query, from the training pool")
    calibrations: list[str] = Field(default_factory=lambda: ["content_free", "batch"],
                                    description="calibration methods each candidate is also scored with (tasks with choices)")
    calibration_inputs: int = Field(64, ge=1, description="training inputs batch calibration averages over")
    instructions: list[str] = Field(default_factory=list,
                                    description="instruction candidates (default: the task's system and prompt.instructions)")
    propose: int | None = Field(None, ge=0, description="instructions the model proposes from training examples "
                                                       "(default: 3 when the task lists no alternatives, else 0)")
    max_examples: int = Field(100, ge=1, description="validation records scored per candidate (the first N)")
    max_seconds: float = Field(1800.0, gt=0, description="wall-time cap: no new candidate starts after it")
    pool_size: int = Field(1000, ge=1, description="training records in the demonstration pool (seeded sample)")
    seed: int = Field(0, description="seed of the candidate order, random selection and proposals")
    batch_size: int = Field(16, ge=1, description="sequences per forward pass")
    report_to: ReportTo = report_to_field()


@dataclass
class Candidate:
    """One program tried: where its instruction came from, its demonstrations, calibration, and its score."""

    id: int
    instruction_id: str  # "task", "task.1", "proposed.0", ...
    instruction: str | None
    shots: int
    selector: str | None
    per_query: bool
    calibration: str | None  # None, "content_free" or "batch"
    score: float = float("nan")
    ci95: tuple[float, float] = (float("nan"), float("nan"))
    n: int = 0
    prompt_tokens_per_example: float = 0.0
    seconds: float = 0.0
    program: PromptProgram | None = field(default=None, repr=False)


@dataclass
class SearchResult:
    best: Candidate
    candidates: list[Candidate]
    pool: list[dict]
    seconds: float


# ------------------------------------------------------------------------------------------------ one program


def demonstration_pool(task, size: int = 1000, seed: int = 0) -> list[dict]:
    """Training records to draw demonstrations from (a seeded sample of `size` when there are more)."""
    if not task.has_split("train"):
        raise HoneError(f"task {task.name!r} has no train split to take demonstrations from", where=task.source,
                        fix="add data.train (or data.file with data.split), or use --shots 0")
    records = list(task.split("train"))
    if len(records) > size:
        records = random.Random(seed).sample(records, size)
    return records


def build_prompt(task, model, tokenizer, *, system: str | None = None, shots: int = 0, selector: str = "balanced",
                 per_query: bool | None = None, calibration: str | None = None, pool: list[dict] | None = None,
                 seed: int = 0, batch_size: int = 16, encoder=None, selector_params: dict | None = None) -> PromptProgram:
    """One prompt program for `task` (see the module docstring). `per_query` defaults to True for the
    similarity selectors (bm25, embedding, mmr) and False for random and balanced. `calibration` names a
    method of runtime/calibration.py (content_free, batch) or None."""
    from honellm.runtime.calibration import calibrate
    from honellm.runtime.selectors import get_selector, select_fixed_demonstrations

    base = PromptProgram.from_task(task)
    program = base.model_copy(update={"system": system if system is not None else base.system})
    if shots > 0:
        get_selector(selector)
        per_query = (selector not in ("random", "balanced")) if per_query is None else per_query
        spec = SelectorSpec(name=selector, k=shots, per_query=per_query, params=selector_params or {})
        if pool is None:
            pool = demonstration_pool(task, seed=seed)
        program = program.model_copy(update={"selector": spec})
        if not per_query:
            demos = select_fixed_demonstrations(spec, task, program, pool, model=model, tokenizer=tokenizer, seed=seed,
                                                encoder=encoder)
            program = program.model_copy(update={"demonstrations": demos})
    if calibration:
        offsets = calibrate(calibration, task, program, model, tokenizer, pool=pool, seed=seed, batch_size=batch_size,
                            encoder=encoder)
        program = program.model_copy(update={"calibration": offsets, "calibration_method": calibration})
    return program


# ------------------------------------------------------------------------------------------------ instructions


def propose_instructions(task, model, tokenizer, n: int, *, seed: int = 0, examples: int = 5) -> list[str]:
    """Instructions the model writes after reading a few training examples (MIPRO's proposal step, simplified:
    one meta-prompt, sampled n times). For tasks with choices the label set is appended, so that a proposal
    cannot leave the answer format unsaid."""
    from honellm.data.chat import render_prompt
    from honellm.generation import Generator, SamplingParams

    if n <= 0:
        return []
    program = PromptProgram.from_task(task)
    records = random.Random(seed).sample(list(task.split("train")), min(examples, len(task.split("train"))))
    shown = "\n\n".join(f"Input: {program.query(task, r)}\nOutput: {task.target(r)}" for r in records)
    request = (f"Here are examples of a task.\n\n{shown}\n\nWrite one short instruction that tells an assistant "
               "how to do this task. Reply with the instruction only.")
    prompt = render_prompt(tokenizer, [{"role": "user", "content": request}])
    generator = Generator(model, tokenizer)
    proposals: list[str] = []
    for i in range(n * 2):  # a few spare draws, since some come back empty or repeated
        params = SamplingParams(max_new_tokens=60, temperature=0.8, top_p=0.95, seed=seed + i)
        text = generator.generate([prompt], params)[0].text
        line = next((s.strip() for s in text.splitlines() if s.strip()), "")
        line = line.removeprefix("Instruction:").strip().strip('"').strip()
        if task.config.choices and line:
            line = f"{line} Answer with one of: {', '.join(task.config.choices)}."
        if len(line) >= 10 and line not in proposals:
            proposals.append(line)
        if len(proposals) == n:
            break
    return proposals


def instruction_candidates(task, config: PromptSearchConfig, model, tokenizer) -> list[tuple[str, str | None]]:
    """(id, instruction) pairs: the configured ones, else the task's system and alternatives, then proposals."""
    if config.instructions:
        found = [(f"given.{i}", text) for i, text in enumerate(config.instructions)]
    else:
        found = [("task", task.config.prompt.system)]
        found += [(f"task.{i + 1}", text) for i, text in enumerate(task.config.prompt.instructions)]
    propose = config.propose if config.propose is not None else (3 if len(found) <= 1 else 0)
    found += [(f"proposed.{i}", text) for i, text in enumerate(
        propose_instructions(task, model, tokenizer, propose, seed=config.seed))]
    return found


# ------------------------------------------------------------------------------------------------ search


def search_prompt(task, model, tokenizer, config: PromptSearchConfig | None = None, *, run=None,
                  progress: bool = True) -> SearchResult:
    """Try candidate programs on the validation split and return the best (see the module docstring)."""
    from honellm.artifact import Artifact
    from honellm.evaluation.bootstrap import bootstrap_ci
    from honellm.evaluation.evaluate import evaluate
    from honellm.progress import progress as progress_bar
    from honellm.runtime.calibration import calibrate
    from honellm.runtime.embeddings import TextEncoder

    config = config or PromptSearchConfig()
    if not task.has_split("validation"):
        raise HoneError(f"prompt search scores candidates on the validation split, and task {task.name!r} has none",
                        where=task.source, fix="add data.validation (or data.file with data.split); the search "
                                               "never scores on test")
    started = time.perf_counter()
    pool = demonstration_pool(task, config.pool_size, config.seed)
    encoder = TextEncoder(model, tokenizer)
    base = Artifact.create(name=f"{task.name}-prompt-candidate", method="prompt", base_model=_model_name(model, task),
                           program=PromptProgram.from_task(task), task=task)
    methods = list(config.calibrations) if task.config.choices and task.metric != "choice_accuracy" else []
    instructions = instruction_candidates(task, config, model, tokenizer)
    plan = [(iid, text, 0, None, False) for iid, text in instructions][:config.candidates]
    bar = progress_bar(total=config.candidates, desc="prompt search", unit="cand", disable=None if progress else True)
    tried: list[Candidate] = []

    def run_candidate(iid, text, shots, selector, per_query) -> None:
        t0 = time.perf_counter()
        program = build_prompt(task, model, tokenizer, system=text, shots=shots, selector=selector or "random",
                               per_query=per_query, pool=pool, seed=config.seed, batch_size=config.batch_size,
                               encoder=encoder)
        result = evaluate(Artifact(base.manifest, program), task, "validation", config.max_examples, model=model,
                          tokenizer=tokenizer, batch_size=config.batch_size, progress=False, seed=config.seed,
                          pool=pool, encoder=encoder)
        common = dict(instruction_id=iid, instruction=text, shots=shots, selector=selector, per_query=per_query,
                      n=result.n, prompt_tokens_per_example=result.cost.prompt_tokens_per_example)
        rows = [Candidate(id=len(tried), calibration=None, score=result.score, ci95=result.ci95, program=program,
                          seconds=time.perf_counter() - t0, **common)]
        for method in methods:
            t1 = time.perf_counter()
            sizes = {"size": config.calibration_inputs} if method == "batch" else {}
            offsets = calibrate(method, task, program, model, tokenizer, pool=pool, seed=config.seed,
                                batch_size=config.batch_size, encoder=encoder, **sizes)
            scores = scores_with_offsets(task, result, offsets)
            rows.append(Candidate(id=len(tried) + len(rows), calibration=method, score=float(np.mean(scores)),
                                  ci95=bootstrap_ci(scores, seed=config.seed),
                                  program=program.model_copy(update={"calibration": offsets,
                                                                     "calibration_method": method}),
                                  seconds=rows[0].seconds + time.perf_counter() - t1, **common))
        tried.extend(rows)
        if run is not None:
            for c in rows:
                run.log_metrics(**_row(c))
        bar.update(1)
        bar.set_postfix(best=f"{max(c.score for c in tried):.3f}")

    try:
        for step in plan:
            if tried and time.perf_counter() - started > config.max_seconds:
                break
            run_candidate(*step)
        ranked = _rank_instructions(tried)
        for rank, (iid, text) in enumerate(ranked[:2]):
            combos = [(k, s, False) for k in config.shots for s in config.fixed_selectors]
            combos += [(k, s, True) for k in config.shots for s in config.per_query_selectors]
            random.Random(config.seed + rank).shuffle(combos)
            for shots, selector, per_query in combos:
                evaluated = len({(c.instruction_id, c.shots, c.selector, c.per_query) for c in tried})
                if evaluated >= config.candidates or time.perf_counter() - started > config.max_seconds:
                    break
                if shots > 0:
                    run_candidate(iid, text, shots, selector, per_query)
    finally:
        bar.close()
    best = max(tried, key=lambda c: (c.score, -c.prompt_tokens_per_example, -c.id))
    return SearchResult(best=best, candidates=tried, pool=pool, seconds=time.perf_counter() - started)


def scores_with_offsets(task, result, offsets: dict[str, float]) -> list[float]:
    """Per-example scores of `result` (an uncalibrated choices evaluation) had the program carried `offsets`:
    the same float64 sum and first-maximum argmax as the evaluator's, so a saved program scores exactly this."""
    from honellm.evaluation.metrics import METRICS

    choices = list(task.config.choices)
    shift = np.array([float(offsets.get(c, 0.0)) for c in choices])
    predictions = []
    for r in result.records:
        raw = np.array([r.details["choice_logprobs"][c] for c in choices], dtype=np.float64)
        predictions.append(choices[int((raw + shift).argmax())])
    return METRICS[task.metric].fn(predictions=predictions, references=[r.reference or "" for r in result.records])


def _rank_instructions(tried: list[Candidate]) -> list[tuple[str, str | None]]:
    """Instructions by their best zero-shot score (calibrated or not)."""
    best: dict[str, tuple[float, str | None]] = {}
    for c in tried:
        if c.instruction_id not in best or c.score > best[c.instruction_id][0]:
            best[c.instruction_id] = (c.score, c.instruction)
    return [(iid, text) for iid, (_, text) in sorted(best.items(), key=lambda kv: -kv[1][0])]


def _model_name(model, task) -> str:
    return getattr(model.config, "hone_model_id", None) or task.config.model


def _row(c: Candidate) -> dict[str, Any]:
    row = asdict(c)
    row.pop("program")
    row["ci_low"], row["ci_high"] = row.pop("ci95")
    return row


def write_candidates(path: str | Path, candidates: list[Candidate]) -> Path:
    """The table of every candidate tried, as CSV (full instruction text included)."""
    path = Path(path)
    rows = [_row(c) for c in candidates]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------------ the command


@dataclass
class PromptRun:
    """What `hone prompt` made: the saved artifact, its run folder, the search (if any), its validation score."""

    artifact: Any
    path: Path
    run_dir: Path
    search: SearchResult | None
    validation: dict[str, Any] | None


def make_prompt_artifact(task_text, overrides: list[str] | None = None, *, search: int | None = None,
                         shots: int = 0, selector: str = "balanced", per_query: bool | None = None,
                         calibration: str | None = None, model_name: str | None = None, out: str | Path | None = None,
                         force: bool = False, max_examples: int = 100, max_seconds: float = 1800.0,
                         propose: int | None = None, seed: int = 0, batch_size: int = 16,
                         search_config: PromptSearchConfig | None = None, run_dir: str | Path | None = None,
                         progress: bool = True, report_to: list[str] | None = None) -> PromptRun:
    """What `hone prompt` does: build one program (or search for the best), score it on validation, save the
    Artifact (with pool.jsonl when it selects per query) and the run folder (config, metrics.jsonl,
    candidates.csv). `search_config` sets every knob of the search (`search` and the caps then only fill in
    what it leaves at defaults: it wins). `run_dir` names the run folder (default: a new one under the runs
    root); it is replaced when it exists."""
    from honellm.artifact import Artifact
    from honellm.evaluation.evaluate import evaluate
    from honellm.models import load
    from honellm.runs import RunDir
    from honellm.runtime.selectors import get_selector
    from honellm.runtime.tasks import load_task

    task = load_task(task_text, overrides or [])
    model_name = model_name or task.config.model
    if shots > 0 and not search:
        get_selector(selector)  # a misspelt name fails now, not after the model has loaded
    if calibration and not task.config.choices:
        raise HoneError(f"--calibrate needs label choices, and task {task.name!r} has none", where=task.source,
                        fix="add `choices: [...]` to the task, or drop --calibrate")
    if calibration and not search:
        from honellm.runtime.calibration import CALIBRATIONS

        if calibration not in CALIBRATIONS:
            raise HoneError(f"unknown calibration {calibration!r}", where="--calibration",
                            fix=f"use one of: {', '.join(CALIBRATIONS)}")
    if search and not task.has_split("validation"):
        raise HoneError(f"prompt search scores candidates on the validation split, and task {task.name!r} has none",
                        where=task.source, fix="add data.validation (or data.file with data.split); the search "
                                               "never scores on test")
    if out is not None and Path(out).exists() and not force:
        raise HoneError("the artifact folder already exists", where=str(out),
                        fix="choose another --out, or pass --force to replace it")
    run = RunDir.create(task.name, "prompt-search" if search else "prompt", out=run_dir, force=run_dir is not None)
    settings = {"task": task.source, "task_name": task.name, "overrides": overrides or [], "model": model_name, "search": search,
                "shots": shots, "selector": selector, "per_query": per_query, "calibration": calibration,
                "max_examples": max_examples, "max_seconds": max_seconds, "propose": propose, "seed": seed,
                "batch_size": batch_size}
    run.write_config(settings)
    if report_to is None:
        report_to = search_config.report_to if search_config else []
    run.tracking = Tracking.start(parse_report_to(report_to), project=task.name, run_dir=run.path, config=settings)
    try:
        model, tokenizer = load(model_name)
        found = None
        if search:
            config = search_config or PromptSearchConfig(candidates=search, max_examples=max_examples,
                                                         max_seconds=max_seconds, propose=propose, seed=seed,
                                                         batch_size=batch_size)
            max_examples = config.max_examples
            found = search_prompt(task, model, tokenizer, config, run=run, progress=progress)
            write_candidates(run.path / "candidates.csv", found.candidates)
            program, pool = found.best.program, found.pool
            best = found.best
            validation = {"score": best.score, "ci95": list(best.ci95), "n": best.n}
        else:
            pool = demonstration_pool(task, seed=seed) if shots > 0 else None
            program = build_prompt(task, model, tokenizer, shots=shots, selector=selector, per_query=per_query,
                                   calibration=calibration, pool=pool, seed=seed, batch_size=batch_size)
            validation = None
            if task.has_split("validation"):
                result = evaluate(Artifact(Artifact.zero_shot(model_name, task).manifest, program), task, "validation",
                                  max_examples, model=model, tokenizer=tokenizer, batch_size=batch_size,
                                  progress=progress, seed=seed, pool=pool)
                validation = {"score": result.score, "ci95": list(result.ci95), "n": result.n}
        if validation is not None:
            n_validation = len(task.split("validation"))
            validation = {"task": task.name, "metric": task.metric, **validation,
                          "limit": max_examples if n_validation > max_examples else None}
            run.log_metrics(validation_score=validation["score"], n=validation["n"])
        per_query_pool = program.selector is not None and program.selector.per_query
        artifact = Artifact.create(
            name=f"{task.name}-prompt", method="prompt", base_model=model_name, program=program, task=task,
            config={"search": search, "shots": len(program.demonstrations) or (program.selector.k if program.selector else 0),
                    "selector": program.selector.name if program.selector else None,
                    "per_query": per_query_pool, "calibration": program.calibration_method, "seed": seed,
                    "max_examples": max_examples},
            metrics={"validation": validation} if validation else {}, run_dir=str(run.path))
        path = artifact.save(out if out is not None else run.path / "artifact", force=force,
                             pool=[dict(r) for r in pool] if per_query_pool and pool else None)
    finally:
        run.close()
    return PromptRun(artifact, path, run.path, found, validation)
