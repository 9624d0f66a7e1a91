"""The prompting methods, registered like every other method: zero-shot, few-shot and prompt search.

Each has a typed config (every field described, unknown keys rejected with the closest name) and runs through
`prompt_run` into an Artifact whose prompt program the runtime applies (honellm/runtime). Calibration (contextual
or batch) is a setting of zero-shot and few-shot (`calibration=content_free`), and one of the axes the search
tries; best-of-n at inference is registered with the reward-based methods (it needs a reward).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from honellm.artifact import Artifact
from honellm.config import Config
from honellm.errors import HoneError
from honellm.methods.registry import Method, register_method
from honellm.prompting.search import PromptRun, PromptSearchConfig, make_prompt_artifact
from honellm.runtime.tasks import load_task
from honellm.task import Task

Calibration = Literal["content_free", "batch"]


class ZeroShotConfig(Config):
    """The task's own instruction and template, no demonstrations."""

    calibration: Calibration | None = Field(None, description="calibrate the label choices: content_free (Zhao "
                                                              "et al. 2021) or batch (Zhou et al. 2024); tasks "
                                                              "with choices only")
    max_examples: int = Field(100, ge=1, description="validation records scored (the first N)")
    seed: int = Field(0, description="seed of selection and calibration inputs")
    batch_size: int = Field(16, ge=1, description="sequences per forward pass")


class FewShotConfig(ZeroShotConfig):
    """Demonstrations from the training split, fixed for every query or selected per query."""

    shots: int | None = Field(None, ge=1, description="demonstrations per query (default: one per label for "
                                                      "tasks with choices, else 4)")
    selector: str | None = Field(None, description="example selector: random, balanced, bm25, embedding, mmr "
                                                   "(default: balanced for tasks with choices, else bm25)")
    per_query: bool | None = Field(None, description="select for each query, or one fixed set for all (default: "
                                                     "per query for bm25/embedding/mmr, fixed for random/balanced)")


def prompt_run(task: Task | str, config: Config, *, overrides: list[str] | None = None, model_name: str | None = None,
               out: str | Path | None = None, run_dir: str | Path | None = None, force: bool = False,
               progress: bool = True, report_to: str | list[str] | None = None) -> PromptRun:
    """Build the program `config` asks for (or search for the best), score it on validation, save the artifact
    (`out`) and its run folder (`run_dir`): what `hone prompt` prints from."""
    task = load_task(task, overrides)  # a path or built-in name from `hone prompt`; a Task from the registry
    common = {"model_name": model_name, "out": out, "run_dir": run_dir, "force": force, "progress": progress,
              "report_to": report_to}
    if isinstance(config, PromptSearchConfig):
        return make_prompt_artifact(task, overrides, search=config.candidates, search_config=config, **common)
    if isinstance(config, FewShotConfig):
        choices = task.config.choices
        shots = config.shots if config.shots is not None else (len(choices) if choices else 4)
        selector = config.selector or ("balanced" if choices else "bm25")
        per_query = config.per_query if config.per_query is not None else (None if config.selector else not choices)
    elif isinstance(config, ZeroShotConfig):
        shots, selector, per_query = 0, "balanced", None
    else:
        raise TypeError(f"not a prompting config: {type(config).__name__}")
    return make_prompt_artifact(task, overrides, shots=shots, selector=selector, per_query=per_query,
                                calibration=config.calibration, max_examples=config.max_examples, seed=config.seed,
                                batch_size=config.batch_size, **common)


def run_prompting(task: Task, config: Config, *, out: str | Path | None = None, resume: bool = False,
                  force: bool = False):
    """The registry's entry: the run folder is `out` (default: a new one under runs/), the artifact its
    artifact/ folder, as for every other method."""
    if resume:
        raise HoneError("a prompting method trains nothing, so there is nothing to resume", where="--resume",
                        fix="run it again without --resume")
    run = prompt_run(task, config, run_dir=out, out=Path(out) / "artifact" if out is not None else None, force=force)
    return run.artifact


def run_zero_shot(task: Task, config: ZeroShotConfig, *, out: str | Path | None = None, resume: bool = False,
                  force: bool = False):
    """Zero-shot needs no model to make (unless calibrated): the task's program, saved as it is."""
    if config.calibration is not None:
        return run_prompting(task, config, out=out, resume=resume, force=force)
    artifact = Artifact.zero_shot(task.config.model, task)
    if out is not None:
        artifact.save(Path(out) / "artifact", force=force)
    return artifact


register_method(Method("zero-shot", "prompting", ZeroShotConfig, run_zero_shot,
                       "the task's instruction and template, no demonstrations (optionally calibrated)"))
register_method(Method("few-shot", "prompting", FewShotConfig, run_prompting,
                       "demonstrations from the training split: random, label-balanced, BM25, embedding or MMR "
                       "selection, per query or fixed (shared KV prefix); optionally calibrated",
                       "https://arxiv.org/abs/2005.14165", needs=("answers", "train")))
register_method(Method("prompt-search", "prompting", PromptSearchConfig, run_prompting,
                       "search over instructions (listed or proposed by the model), shots, selectors and "
                       "calibration on the validation split; keeps the best", "https://arxiv.org/abs/2211.01910",
                       needs=("answers", "train", "validation")))
