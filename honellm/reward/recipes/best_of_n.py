"""Best-of-n at inference: sample n answers, keep the one the reward scores highest -> Artifact.

No weights change. The artifact is the policy it samples from (the task's base model, or any artifact: its adapter
and prompt program are copied) plus an `inference` entry in its manifest:

    "inference": {"best_of_n": {"n": 4, "temperature": 0.8, "top_p": 1.0, "task_rewards": true,
                                "reward_model": null, "reward_model_weight": 1.0}}

The hook: whoever generates for an artifact (the evaluator; the server) wraps its `Generator` with
`inference_generator(artifact, generator, task=...)`, which returns the generator itself for ordinary artifacts and
a `BestOfNGenerator` for these. `BestOfNGenerator.generate` takes the same arguments as `Generator.generate` plus
optional `records=` (the task records, for reward functions that read record fields such as `target`) and
`messages=` (the conversations, for a reward model); it advertises this with `takes_context = True`, which the
evaluator checks before passing them.

Which reward: a reward model (`reward_model=ARTIFACT`) is the usual choice, as in the papers (Nakano et al.,
WebGPT, https://arxiv.org/abs/2112.09332; Gao et al., https://arxiv.org/abs/2210.10760). The task's reward
functions can be used too, but a function that reads the reference answer (numeric_match on `target`) makes
best-of-n an oracle: its score is then pass@n, an upper bound, not what a server without the answer can do; the
manifest records `uses_references` when the task's rewards are used, and a server without records refuses such
functions with the missing-field error of the reward.

The completion returned carries `completion_tokens` summed over all n samples, so the evaluator's cost figures
show what best-of-n costs per request.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from pydantic import Field

from honellm.artifact import Artifact
from honellm.config import Config
from honellm.errors import HoneError
from honellm.reward.recipes import AlignMethod, register_align_method
from honellm.reward.rollout import RewardSource, load_reward_model_artifact
from honellm.tracking import ReportTo, report_to_field


class BestOfNConfig(Config):
    """Best-of-n sampling settings (stored in the artifact and applied at inference)."""

    n: int = Field(4, ge=1, description="answers sampled per request")
    temperature: float = Field(0.8, gt=0, description="sampling temperature of the n answers")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass of the n answers")
    policy: str | None = Field(None, description="an artifact folder to sample from (its adapter and prompt "
                                                 "program); None: the task's base model, zero-shot")
    task_rewards: bool = Field(True, description="score the answers with the task's reward functions")
    reward_model: str | None = Field(None, description="a reward-model artifact folder scoring the answers")
    reward_model_weight: float = Field(1.0, description="weight of the reward model's score")
    eval_split: str = Field("validation", description="split the new artifact is evaluated on (its metrics)")
    eval_limit: int | None = Field(32, ge=0, description="records evaluated (0: skip the evaluation; None: all)")
    seed: int = Field(0, description="seed of the evaluation's sampling")
    report_to: ReportTo = report_to_field()


INFERENCE_KEYS = ("n", "temperature", "top_p", "task_rewards", "reward_model", "reward_model_weight")


def best_of_n(task, config: BestOfNConfig | None = None, *, out: str | Path | None = None, resume: bool = False,
              force: bool = False) -> Artifact:
    """Make the best-of-n artifact of `config.policy` (or the base model) on `task`, evaluate it, save it."""
    config = config or BestOfNConfig()
    from honellm.training.run_folder import open_run
    from honellm.training.setup import setup_accelerator

    if resume:
        raise HoneError("best-of-n trains nothing, so there is nothing to resume", where="--resume",
                        fix="run it again without --resume (it takes as long as its evaluation)")
    if not config.task_rewards and not config.reward_model:
        raise HoneError("best-of-n needs a reward to choose with", where="task_rewards / reward_model",
                        fix="set task_rewards=true (the task's rewards) or reward_model=ARTIFACT")
    if config.task_rewards and not task.config.rewards and not config.reward_model:
        raise HoneError(f"task {task.name!r} has no reward functions to choose with", where=task.source,
                        fix="add `rewards:` to the task, or pass reward_model=ARTIFACT")
    accelerator = setup_accelerator()
    run = open_run(task, "best_of_n", config, out=out, resume=False, force=force, accelerator=accelerator)

    # --- the policy sampled from: an artifact, or the base model zero-shot
    policy = Artifact.load(config.policy) if config.policy else Artifact.zero_shot(task.config.model, task)
    settings = {k: getattr(config, k) for k in INFERENCE_KEYS}
    artifact = Artifact.create(name=f"{task.name}-best_of_{config.n}", method="best_of_n", kind=policy.kind,
                               base_model=policy.base_model, program=policy.program, task=task,
                               config={"method": "best_of_n", **config.model_dump(mode="json")},
                               run_dir=str(run.path))
    artifact.manifest.inference = {"best_of_n": settings,  # type: ignore[attr-defined]
                                   "uses_references": bool(config.task_rewards and task.config.rewards),
                                   "policy": policy.name}
    folder = run.path / "artifact"
    extra = {}
    if policy.adapter_dir is not None:
        extra["adapter"] = policy.adapter_dir
    if policy.weights_dir is not None:
        extra["model"] = policy.weights_dir
    pool = policy.pool() or None
    if accelerator.is_main_process:
        artifact.save(folder, force=True, extra_files=extra, pool=pool)

    # --- evaluate it (and record the score in its manifest), unless asked not to; its cost is the evaluation's
    artifact = Artifact.load(folder)
    model, tokenizer = artifact.load_model()
    total_params = sum(p.numel() for p in model.parameters())
    cost = {"trainable_params": 0, "total_params": total_params, "processes": 1, "device": str(next(
            model.parameters()).device.type), "precision": str(next(model.parameters()).dtype).removeprefix("torch."),
            "train_steps": 0, "train_tokens": 0, "train_seconds": 0.0, "tokens_per_second": 0.0,
            "peak_memory_bytes": 0, "samples_per_request": config.n}
    metrics = {}
    if config.eval_limit != 0 and task.has_split(config.eval_split) and accelerator.is_main_process:
        from honellm.evaluation.evaluate import evaluate, record_in_manifest

        result = evaluate(artifact, task, config.eval_split, config.eval_limit, model=model, tokenizer=tokenizer,
                          seed=config.seed, progress=False)
        record_in_manifest(artifact, result)
        metrics = {f"val_{result.metric}": result.score, "eval_n": result.n}
        cost |= {"peak_memory_bytes": int((result.cost.peak_memory_mb or 0) * 2**20),
                 "completion_tokens_per_request": result.cost.completion_tokens_per_example,
                 "requests_per_second": result.cost.examples_per_second}
        run.log_metrics(event="eval", split=config.eval_split, **metrics)
    if accelerator.is_main_process:
        artifact.update_manifest(metrics={**artifact.manifest.metrics, **metrics}, cost=cost)
        run.log_metrics(event="done", n=config.n)
        run.close()
    accelerator.wait_for_everyone()
    return artifact


# ---------------------------------------------------------------------------------------------------------------
# The inference hook


def inference_generator(artifact: Artifact, generator, *, task=None):
    """The generator to use for `artifact`: `generator` itself, or a `BestOfNGenerator` around it when the
    artifact's manifest asks for best-of-n sampling."""
    inference = (artifact.manifest.model_extra or {}).get("inference") or {}
    settings = inference.get("best_of_n")
    if not settings:
        return generator
    task = task if task is not None else _artifact_task(artifact)
    where = f"{artifact.path or artifact.name} (inference.best_of_n)"
    functions = None
    if settings.get("task_rewards", True):
        if task is None:
            raise HoneError("this best-of-n artifact scores answers with its task's rewards, and its task cannot be "
                            "found", where=where, fix="pass the task (hone eval --task / hone serve --task)")
        if task.config.rewards:
            functions = task.reward()
    model = None
    if settings.get("reward_model"):
        model = load_reward_model_artifact(settings["reward_model"], where=where)
    if functions is None and model is None:
        raise HoneError("this best-of-n artifact has no reward to choose with", where=where,
                        fix="re-create it with task_rewards=true on a task with rewards, or reward_model=ARTIFACT")
    reward = RewardSource(functions, model, float(settings.get("reward_model_weight", 1.0)))
    return BestOfNGenerator(generator, reward, n=int(settings["n"]), temperature=float(settings["temperature"]),
                            top_p=float(settings.get("top_p", 1.0)), task=task, program=artifact.program)


def _artifact_task(artifact: Artifact):
    from honellm.task import Task

    reference = artifact.manifest.task or {}
    source = reference.get("source")
    if source and Path(source).exists():
        return Task.load(source)
    if reference.get("config"):
        return Task.from_config(reference["config"])
    return None


class BestOfNGenerator:
    """A `Generator` that samples `n` answers per prompt and returns the one `reward` scores highest.

    Ties go to the first sample; answers no reward could score count as the lowest. Everything else
    (`score_continuations`, `tokenizer`, `eos_ids`, ...) is the wrapped generator's.
    """

    takes_context = True  # generate() accepts records= and messages= (the evaluator checks this)

    def __init__(self, generator, reward: RewardSource, *, n: int, temperature: float, top_p: float = 1.0,
                 task=None, program=None):
        self.generator = generator
        self.reward = reward
        self.n = n
        self.temperature = temperature
        self.top_p = top_p
        self.task = task
        self.program = program

    def __getattr__(self, name):
        return getattr(self.generator, name)

    def generate(self, prompts, params=None, *, shared_prefix=None, progress: bool = False, records=None,
                 messages=None) -> list:
        from honellm.generation import SamplingParams

        params = params or SamplingParams()
        sample = dataclasses.replace(params, temperature=self.temperature, top_p=self.top_p, top_k=0)
        repeated = [p for p in prompts for _ in range(self.n)]
        completions = self.generator.generate(repeated, sample, shared_prefix=shared_prefix, progress=progress)
        texts = [p if isinstance(p, str) else self.generator.tokenizer.decode(p) for p in prompts]
        if records is None:
            records = [{} for _ in prompts]
        if messages is None:
            if self.reward.reward_model is not None and (self.task is None or not any(records)):
                raise HoneError("best-of-n with a reward model needs each request's conversation",
                                where="BestOfNGenerator.generate", fix="pass messages= (a list per prompt)")
            messages = [self.program.messages(self.task, r) if self.program is not None and r else [] for r in records]
        eos = set(self.generator.eos_ids)
        scores = self.reward.score(
            self.task, [r for r in records for _ in range(self.n)], [m for m in messages for _ in range(self.n)],
            [t for t in texts for _ in range(self.n)], [c.text for c in completions],
            [c.token_ids[:-1] if c.token_ids and c.token_ids[-1] in eos else c.token_ids for c in completions])
        chosen = []
        for i in range(len(prompts)):
            group = range(i * self.n, (i + 1) * self.n)
            best = max(group, key=lambda j: (_finite(scores.total[j]), -j))
            spent = sum(completions[j].completion_tokens for j in group)
            chosen.append(dataclasses.replace(completions[best], completion_tokens=spent))
        return chosen

    def stream(self, prompt, params=None):
        """Best-of-n cannot stream: the answer is known only when all n are scored; yields it whole."""
        text = self.generate([prompt], params)[0].text
        if text:
            yield text


def _finite(value: float) -> float:
    return value if not math.isnan(value) else -math.inf


register_align_method(AlignMethod("best_of_n", BestOfNConfig, best_of_n, "best-of-n at inference: sample n answers, "
                                  "serve the one the reward scores highest (no training)",
                                  "https://arxiv.org/abs/2112.09332", ("reference", "sft")))
