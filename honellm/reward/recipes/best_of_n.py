"""Best-of-n at inference: sample n answers, keep the one the reward scores highest -> Artifact.

No weights change. The artifact is the policy it samples from (the task's base model, or any artifact: its adapter
and prompt program are copied) plus an `inference` entry in its manifest:

    "inference": {"best_of_n": {"n": 4, "temperature": 0.8, "top_p": 1.0, "task_rewards": true,
                                "reward_model": null, "reward_model_weight": 1.0}}

The settings are the typed `honellm.program.BestOfNSettings`; `honellm.runtime.best_of_n` applies them
wherever the artifact runs (`hone eval`, `hone serve`, compare), so it is served as it was scored.

Which reward: a reward model (`reward_model=ARTIFACT`) is the usual choice, as in the papers (Nakano et al.,
WebGPT, https://arxiv.org/abs/2112.09332; Gao et al., https://arxiv.org/abs/2210.10760). The task's reward
functions can be used too, but a function that reads the reference answer (numeric_match on `target`) makes
best-of-n an oracle: its score is then pass@n, an upper bound, not what a server without the answer can do; the
manifest records `uses_references` when the task's rewards are used, and a server without records refuses such
functions with the missing-field error of the reward.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from honellm.artifact import Artifact
from honellm.errors import HoneError
from honellm.methods.registry import Method, register_method
from honellm.program import BestOfNSettings, InferenceSettings
from honellm.tracking import ReportTo, report_to_field


class BestOfNConfig(BestOfNSettings):
    """The inference settings stored in the artifact (`BestOfNSettings`), plus what making it takes."""

    policy: str | None = Field(None, description="an artifact folder to sample from (its adapter and prompt "
                                                 "program); None: the task's base model, zero-shot")
    eval_split: str = Field("validation", description="split the new artifact is evaluated on (its metrics)")
    eval_limit: int | None = Field(32, ge=0, description="records evaluated (0: skip the evaluation; None: all)")
    seed: int = Field(0, description="seed of the evaluation's sampling")
    report_to: ReportTo = report_to_field()


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
    settings = BestOfNSettings(**{k: getattr(config, k) for k in BestOfNSettings.model_fields})
    artifact = Artifact.create(name=f"{task.name}-best_of_{config.n}", method="best_of_n", kind=policy.kind,
                               base_model=policy.base_model, program=policy.program, task=task,
                               config={"method": "best_of_n", **config.model_dump(mode="json")},
                               run_dir=str(run.path))
    artifact.manifest.inference = InferenceSettings(
        best_of_n=settings, uses_references=bool(config.task_rewards and task.config.rewards), policy=policy.name)
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


register_method(Method("best_of_n", "reward", BestOfNConfig, best_of_n, "best-of-n at inference: sample n answers, "
                       "serve the one the reward scores highest (no training)", "https://arxiv.org/abs/2112.09332",
                       needs=("references", "rewards")))
