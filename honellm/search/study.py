"""`search(task, method, n_trials=...)`: a method's best settings inside a budget, with Optuna.

Read top to bottom: open the run folder and the study (an Optuna JournalStorage file in it, so a second call
with `resume=True` continues the same study after a crash); then one trial after another until `n_trials` are
done or `budget_seconds` is spent: Optuna's TPE sampler proposes the settings (the method's defaults are the
first trial, so a search never ends below them), the method's recipe runs into `trials/trial-NNN/`, every
validation row it logs is reported to the trial (`honellm.runs.observe_metrics`), and a successive-halving
pruner stops a trial whose intermediate validation score is poor. The trial's score is the validation score of
the artifact it made. Trials of a preference method share their reference log-probs (`reference-cache/`: the
reference does not depend on the searched beta or learning rate), so only the first computes them. Every trial (settings, score, state, seconds, the step it was pruned at) is a line of the
search's `metrics.jsonl`; `best.json` names the best one and its artifact.

The test split is never read: while the search runs, reading it raises (`_no_test`).

Optuna is the established tool for this (TPE, successive halving, a crash-safe journal); Hone adds only the
glue: the spaces (`spaces.py`), running a trial through the method's own recipe, and the run folder.
Trials run one after another in this process (the pruning hook needs the recipe to log on this process).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from honellm.atomic import atomic_write_text
from honellm.errors import HoneError
from honellm.runs import RunDir, observe_metrics

log = logging.getLogger("honellm.search")

STUDY_FILE = "study.journal"
STUDY_NAME = "search"
EVALS_PER_TRIAL = 4  # validation evaluations per trial, so the pruner has rungs to act on
PROMPTING = ("prompt-search",)
TIE_BREAK = 1e-6  # weight of the validation loss in the intermediate value (breaks ties on the score only)


@dataclass
class TrialRecord:
    number: int
    params: dict[str, Any]
    state: str  # complete, pruned, failed
    score: float | None
    seconds: float
    run_dir: str
    pruned_at_step: int | None = None
    repeat_of: int | None = None  # the sampler proposed settings already tried: that trial's outcome, not rerun
    error: str | None = None


@dataclass
class SearchResult:
    """The best trial's settings (as `key=value` overrides and as values), its validation score and artifact."""

    method: str
    best_params: dict[str, Any]
    best_overrides: list[str]
    best_score: float
    artifact: Any  # the best trial's Artifact
    trials: list[TrialRecord] = field(default_factory=list)
    run_dir: Path | None = None
    seconds: float = 0.0

    @property
    def pruned(self) -> int:
        return sum(t.state == "pruned" for t in self.trials)


# ----------------------------------------------------------------------------------------------- the search


def search(task, method: str, *, n_trials: int = 8, budget_seconds: float | None = None,
           base_overrides: list[str] | None = None, out: str | Path | None = None, resume: bool = False,
           force: bool = False, space: list | None = None, seed: int = 0, pruner=None,
           enqueue: list[dict] | None = None, enqueue_defaults: bool = True, reserve_runs: int = 0,
           progress: bool = True) -> SearchResult:
    """Search `method`'s settings on `task` (a loaded Task) by validation score; return the best and its artifact.

    `base_overrides` set the method's other options for every trial (`max_steps=100`, `batch_size=4`); `space`
    replaces the method's search space (`honellm.search.spaces.SPACES`). `budget_seconds`: no trial starts
    after it, and each trial may use only what is left of it (its recipe's `max_seconds`). `enqueue`: settings
    to try first (then the method's defaults, when `enqueue_defaults` and they lie in the space).
    `reserve_runs`: keep that many runs of the longest finished trial out of the budget (the seeds that re-run
    the best settings afterwards): no trial starts, nor runs, into that reserve.
    """
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    from honellm.progress import progress as progress_bar
    from honellm.search.spaces import space_for

    family = method_family(method)
    space = space if space is not None else space_for(method)
    base_overrides = list(base_overrides or [])
    if not task.has_split("validation"):
        raise HoneError(f"a search scores trials on the validation split, and task {task.name!r} has none",
                        where=task.source, fix="add data.validation (or data.file with data.split); the search "
                                               "never scores on test")
    if resume and out is None:
        raise HoneError("resuming a search needs its folder", fix="pass --out DIR naming the search to continue")
    run = RunDir.create(task.name, f"{method}-search", out=out, force=force, resume=resume)
    # Every trial evaluates on validation at the same steps (about EVALS_PER_TRIAL times at the base settings),
    # so the pruner compares trials at the same points; the first evaluation is its first rung.
    if family != "prompting" and not any(o.split("=", 1)[0].strip() == "eval_every" for o in base_overrides):
        base_overrides.append(f"eval_every={_eval_every(task, _method_config(family, method, base_overrides))}")
    first_rung = next((int(o.split("=", 1)[1]) for o in base_overrides if o.split("=", 1)[0].strip() == "eval_every"),
                      1) or 1
    run.write_config({"method": method, "task": task.name, "task_source": task.source, "n_trials": n_trials,
                      "budget_seconds": budget_seconds, "base_overrides": base_overrides, "seed": seed,
                      "space": [_describe(p) for p in space]})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(run.path / STUDY_FILE)))
    higher = _higher_is_better(task)
    study = optuna.create_study(
        storage=storage, study_name=STUDY_NAME, load_if_exists=resume, direction="maximize" if higher else "minimize",
        sampler=optuna.samplers.TPESampler(seed=seed + len(_trials_of(storage)),
                                           n_startup_trials=max(1, min(10, n_trials // 3))),
        pruner=pruner or optuna.pruners.SuccessiveHalvingPruner(min_resource=first_rung, reduction_factor=3))
    # A trial left running by a crash is failed and its settings tried again first.
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)
        study.enqueue_trial(frozen.params, skip_if_exists=False)
        run.log_metrics(event="trial_lost", trial=frozen.number, params=frozen.params)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if not study.get_trials(deepcopy=False):
        for params in enqueue or []:
            study.enqueue_trial(params)
        defaults = default_params(method, space, base_overrides) if enqueue_defaults else {}
        if defaults:
            study.enqueue_trial(defaults, skip_if_exists=True)
    records = [_record_of(t, run.path) for t in finished]

    started = time.perf_counter()
    bar = progress_bar(total=n_trials, desc=f"search {method}", unit="trial", initial=len(finished),
                       disable=None if progress else True)
    try:
        with _no_test(task):
            failed = 0
            while len(finished) < n_trials and failed < n_trials:  # every trial failing ends the search too
                reserve = reserve_runs * max((r.seconds for r in records if r.state == "complete"), default=0.0)
                left = None if budget_seconds is None else budget_seconds - (time.perf_counter() - started) - reserve
                # A trial given less than the shortest one so far (a pruned trial: its first evaluation) is
                # cut before it shows anything, and its overhead runs into the seeds' reserve: none starts.
                shortest = min((r.seconds for r in records if r.state in ("complete", "pruned") and r.seconds > 0),
                               default=0.0)
                if left is not None and left <= shortest:
                    run.log_metrics(event="time_budget", budget_seconds=budget_seconds, trials=len(finished),
                                    reserved_seconds=round(reserve, 1), left_seconds=round(max(0.0, left), 1))
                    break
                trial = study.ask()
                params = {p.name: p.suggest(trial) for p in space}
                record = (_repeat(study, trial, params, run.path)
                          or _run_trial(study, trial, task, method, family, params, base_overrides, run.path, left,
                                        seed, progress))
                records.append(record)
                run.log_metrics(event="trial", trial=record.number, params=record.params, state=record.state,
                                score=record.score, seconds=round(record.seconds, 2),
                                pruned_at_step=record.pruned_at_step, repeat_of=record.repeat_of,
                                error=record.error)
                if record.state != "failed":
                    finished.append(record)
                else:
                    failed += 1
                bar.update(1)
                best = _best_completed(study)
                if best is not None:
                    bar.set_postfix(best=f"{best.value:.4f}", pruned=sum(r.state == "pruned" for r in records),
                                    refresh=False)
    finally:
        bar.close()

    best = _best_completed(study)
    if best is None:
        run.close()
        raise HoneError(f"no {method} trial finished", where=str(run.path),
                        fix="see the trials' errors in metrics.jsonl; give a larger budget or fewer trials pruned")
    from honellm.artifact import Artifact

    best_dir = Path(best.user_attrs.get("run_dir", _trial_dir(run.path, best.number)))
    artifact = Artifact.load(best_dir / "artifact", verify_base=False)
    overrides = [*base_overrides, *(f"{k}={_plain(v)}" for k, v in best.params.items())]
    result = SearchResult(method, dict(best.params), overrides, float(best.user_attrs.get("score", best.value)),
                          artifact,
                          sorted(records, key=lambda r: r.number), run.path, time.perf_counter() - started)
    summary = {"method": method, "best_trial": best.number, "best_score": result.best_score,
               "best_params": result.best_params, "best_overrides": overrides,
               "artifact": str(best_dir / "artifact"), "trials": len(result.trials), "pruned": result.pruned,
               "search_seconds": round(sum(r.seconds for r in result.trials), 2)}
    atomic_write_text(run.path / "best.json", json.dumps(summary, indent=2, default=str) + "\n")
    run.log_metrics(event="done", **{k: v for k, v in summary.items() if k != "method"})
    run.close()
    return result


# ----------------------------------------------------------------------------------------------- one trial


def _run_trial(study, trial, task, method: str, family: str, params: dict, base_overrides: list[str], root: Path,
               left: float | None, seed: int, progress: bool) -> TrialRecord:
    import optuna
    from optuna.trial import TrialState

    from honellm.reward.recipes.common import share_reference_logps

    out = _trial_dir(root, trial.number)
    trial.set_user_attr("run_dir", str(out))
    seen: dict[str, Any] = {"run": None, "step": None}
    key = _score_key(task, family)
    higher = _higher_is_better(task)

    def report(run, record: dict) -> None:
        seen["run"] = run  # the trial's run folder, closed here if the trial stops early
        # Validation rows: the SFT and preference recipes' `event: eval`, online RL's held-out checks
        # (`kind: guard`: the gold reward where the task has one, else the proxy reward).
        if "step" not in record or not (record.get("event") == "eval" or record.get("kind") == "guard"):
            return
        keys = key if record.get("event") == "eval" else ("gold", "proxy")
        value = next((record[k] for k in keys if record.get(k) is not None), None)
        if value is None or not math.isfinite(value):
            return
        # Ties on the score are broken by the lower validation loss, as the recipes' best-checkpoint rule does
        # (a few dozen validation records give a coarse accuracy; the loss separates trials early).
        trial.report(_objective(float(value), record.get("val_loss"), higher), int(record["step"]))
        if trial.should_prune():
            seen["step"] = int(record["step"])
            raise optuna.TrialPruned()

    started = time.perf_counter()
    try:
        with observe_metrics(report), share_reference_logps(root / "reference-cache"):
            score = run_method(task, method, family, params, base_overrides, out, max_seconds=left, seed=seed,
                               progress=progress)
    except optuna.TrialPruned:
        if seen["run"] is not None:
            seen["run"].log_metrics(event="pruned", step=seen["step"])
            seen["run"].close()  # the recipe stopped mid-run: close its files and log handler
        study.tell(trial, state=TrialState.PRUNED)
        return TrialRecord(trial.number, params, "pruned", None, time.perf_counter() - started, str(out),
                           pruned_at_step=seen["step"])
    except HoneError as err:
        if seen["run"] is not None:
            seen["run"].close()
        study.tell(trial, state=TrialState.FAIL)
        return TrialRecord(trial.number, params, "failed", None, time.perf_counter() - started, str(out),
                           error=err.render().split("\n")[0])
    trial.set_user_attr("score", score)
    study.tell(trial, _objective(score, _kept_loss(out), higher))
    return TrialRecord(trial.number, params, "complete", score, time.perf_counter() - started, str(out))


def _repeat(study, trial, params: dict, root: Path) -> TrialRecord | None:
    """The outcome of an earlier trial with the same settings, told again rather than trained again."""
    from optuna.trial import TrialState

    for earlier in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if earlier.params == params:
            trial.set_user_attr("run_dir", earlier.user_attrs.get("run_dir", str(_trial_dir(root, earlier.number))))
            trial.set_user_attr("repeat_of", earlier.number)
            if earlier.state == TrialState.COMPLETE:
                score = earlier.user_attrs.get("score", earlier.value)
                trial.set_user_attr("score", score)
                study.tell(trial, earlier.value)
                return TrialRecord(trial.number, params, "complete", score, 0.0,
                                   str(_trial_dir(root, earlier.number)), repeat_of=earlier.number)
            study.tell(trial, state=TrialState.PRUNED)
            return TrialRecord(trial.number, params, "pruned", None, 0.0, str(_trial_dir(root, earlier.number)),
                               pruned_at_step=earlier.last_step, repeat_of=earlier.number)
    return None


def run_method(task, method: str, family: str, params: dict, base_overrides: list[str], out: Path, *,
               max_seconds: float | None = None, seed: int = 0, progress: bool = True) -> float:
    """Make `method`'s artifact with `params` into `out/artifact`; return its validation score."""
    overrides = [*base_overrides, *(f"{k}={_plain(v)}" for k, v in params.items())]
    if family == "prompting":
        return _run_prompting(task, params, out, max_seconds=max_seconds, seed=seed, progress=progress)
    set_keys = {o.split("=", 1)[0].strip() for o in overrides}
    if max_seconds is not None and "max_seconds" not in set_keys:
        overrides.append(f"max_seconds={max(1.0, max_seconds):.1f}")
    if "seed" not in set_keys:
        overrides.append(f"seed={seed}")
    config = _method_config(family, method, overrides)
    if "eval_every" not in set_keys:
        config = _method_config(family, method, [*overrides, f"eval_every={_eval_every(task, config)}"])
    from honellm.methods.catalog import run_method

    artifact = run_method(task, method, config, out=out, force=True)
    return validation_score(task, artifact, family)


def _run_prompting(task, params: dict, out: Path, *, max_seconds, seed: int, progress: bool) -> float:
    from honellm.prompting.search import make_prompt_artifact

    calibration = params.get("calibration")
    calibration = None if calibration in (None, "none") or not task.config.choices else calibration
    shots = int(params.get("shots", 0))
    result = make_prompt_artifact(task, None, shots=shots, selector=params.get("selector", "balanced"),
                                  calibration=calibration, run_dir=out, out=out / "artifact", force=True, seed=seed,
                                  max_seconds=max_seconds or 1800.0, progress=progress)
    return float(result.validation["score"])


def validation_score(task, artifact, family: str) -> float:
    """The validation score the recipe recorded for the weights it kept, or the evaluator's on validation."""
    metrics = artifact.manifest.metrics or {}
    for key in _score_key(task, family):
        if metrics.get(key) is not None:
            return float(metrics[key])
    from honellm.evaluation.evaluate import evaluate

    return float(evaluate(artifact, task, "validation", progress=False).score)


# ----------------------------------------------------------------------------------------------- helpers


def method_family(method: str) -> str:
    """"prompting", "tuning" or "align" (a HoneError naming the methods for an unknown one)."""
    if method in PROMPTING:
        return "prompting"
    from honellm.methods.catalog import all_methods, get_method

    family = get_method(method).family  # a HoneError naming the closest method for an unknown one
    if family == "prompting":
        raise HoneError(f"the settings search runs prompt-search for prompting, not {method!r}", where="--method",
                        fix=f"searchable: {', '.join([*PROMPTING, *all_methods('tuning'), *all_methods('reward')])}")
    return "tuning" if family == "tuning" else "align"


def default_params(method: str, space: list, base_overrides: list[str]) -> dict:
    """The method's own defaults (with `base_overrides`) for the parameters of `space` that can take them."""
    from honellm.search.spaces import Choice

    family = method_family(method)
    if family == "prompting":
        return {}
    config = _method_config(family, method, base_overrides)
    found = {}
    for p in space:
        value = getattr(config, p.name, None)
        if value is None:
            continue
        inside = value in p.choices if isinstance(p, Choice) else p.low <= value <= p.high
        if inside:
            found[p.name] = value
    return found if len(found) == len(space) else {}


def _method_config(family: str, method: str, overrides: list[str]):
    from honellm.methods.catalog import method_config  # the one registry of methods

    return method_config(method, None, overrides)[1]


def _eval_every(task, config) -> int:
    """Steps between validation evaluations so that a trial has about EVALS_PER_TRIAL of them."""
    n = len(task.split("train"))
    if getattr(config, "train_limit", None):
        n = min(n, config.train_limit)
    per_step = getattr(config, "prompts_per_step", None) or config.batch_size * config.grad_accum  # online RL: prompts
    per_epoch = max(1, math.ceil(n / per_step))
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    return max(1, total // EVALS_PER_TRIAL)


def _score_key(task, family: str) -> tuple[str, ...]:
    """The validation row keys that hold the trial's score, in order of preference."""
    return (f"val_{task.metric}", "val_accuracy", "val_score", "val_proxy_reward")


def _objective(score: float, loss, higher: bool) -> float:
    """What the study ranks: the score, ties broken by the lower validation loss, as the recipes' best-checkpoint
    rule does (a few dozen validation records give a coarse accuracy; the loss separates trials early)."""
    if loss is None or not math.isfinite(loss):
        return score
    return score - TIE_BREAK * loss if higher else score + TIE_BREAK * loss


def _kept_loss(out: Path) -> float | None:
    """The validation loss of the weights a trial's artifact kept (None where the recipe records none)."""
    try:
        return json.loads((out / "artifact" / "hone.json").read_text()).get("metrics", {}).get("val_loss")
    except (OSError, ValueError):
        return None


def _higher_is_better(task) -> bool:
    from honellm.evaluation.metrics import METRICS

    metric = METRICS.get(task.metric)
    return True if metric is None else bool(metric.higher_is_better)


@contextmanager
def _no_test(task):
    """Reading the test split inside the block is a bug of the search: it raises."""
    original = task.split

    def guarded(name):
        if name == "test":
            raise AssertionError("the search read the test split: trials are scored on validation only")
        return original(name)

    task.split = guarded
    try:
        yield
    finally:
        del task.split


def _trials_of(storage) -> list:
    try:
        study_id = storage.get_study_id_from_name(STUDY_NAME)
    except KeyError:
        return []
    return storage.get_all_trials(study_id, deepcopy=False)


def _best_completed(study):
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    return study.best_trial


def _record_of(frozen, root: Path) -> TrialRecord:
    seconds = ((frozen.datetime_complete - frozen.datetime_start).total_seconds()
               if frozen.datetime_complete and frozen.datetime_start else 0.0)
    state = "complete" if frozen.value is not None else "pruned"
    return TrialRecord(frozen.number, dict(frozen.params), state, frozen.user_attrs.get("score", frozen.value),
                       seconds,
                       frozen.user_attrs.get("run_dir", str(_trial_dir(root, frozen.number))),
                       pruned_at_step=frozen.last_step if state == "pruned" else None,
                       repeat_of=frozen.user_attrs.get("repeat_of"))


def _trial_dir(root: Path, number: int) -> Path:
    return Path(root) / "trials" / f"trial-{number:03d}"


def _describe(p) -> dict:
    return {"type": type(p).__name__.lower(), **{k: (list(v) if isinstance(v, tuple) else v)
                                                 for k, v in p.__dict__.items()}}


def _plain(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def search_task(task_path: str, method: str | None, overrides: list[str] | None = None, *, n_trials: int = 8,
                budget_seconds: float | None = None, config_file: str | None = None, out: str | None = None,
                resume: bool = False, force: bool = False, skip_invalid: bool = False) -> SearchResult:
    """What `hone tune/align TASK --method M --search N` does: load the task, search M's settings, return the best.

    Overrides whose first key is a task field change the task; the others are the method's base settings for
    every trial (a searched setting given here is searched anyway: the space wins).
    """
    from honellm.runtime.tasks import load_task
    from honellm.task import TaskConfig

    if method is None:
        raise HoneError("--search needs a method", where="--method", fix="pass --method NAME")
    if config_file is not None:
        raise HoneError("--search takes its base settings as key=value overrides, not --config", where="--config",
                        fix="give the settings as key=value, or drop --search")
    task_overrides, method_overrides = [], []
    for text in overrides or []:
        key = text.split("=", 1)[0].strip().lstrip("-")
        (task_overrides if key.split(".")[0] in TaskConfig.model_fields else method_overrides).append(text)
    task = load_task(task_path, task_overrides, skip_invalid=skip_invalid)
    if out is None and not resume:
        from honellm.runs import _safe, runs_root

        out = str(runs_root() / _safe(task.name) / f"{_safe(method)}-search-{time.strftime('%Y%m%d-%H%M%S')}")
    return search(task, method, n_trials=n_trials, budget_seconds=budget_seconds, base_overrides=method_overrides,
                  out=out, resume=resume, force=force)
