"""Best-of-n at inference: sample n answers, return the one the reward scores highest.

An artifact asks for it in its manifest's typed `inference` block (`honellm.program.InferenceSettings`):

    "inference": {"best_of_n": {"n": 4, "temperature": 0.8, "top_p": 1.0, "task_rewards": true,
                                "reward_model": null, "reward_model_weight": 1.0}, ...}

Whoever generates for an artifact (the evaluator, the server: through `honellm.runtime.apply`) wraps its
`Generator` with `inference_generator(artifact, generator, task=...)`, which returns the generator itself for
ordinary artifacts and a `BestOfNGenerator` for these. `BestOfNGenerator.generate` takes the same arguments as
`Generator.generate` plus optional `records=` (the task records, for reward functions that read record fields such
as `target`) and `messages=` (the conversations, for a reward model); it advertises this with
`takes_context = True`, which the evaluator checks before passing them. A server has no records: a reward that
reads the reference answer is refused there with the missing-field error of the reward.

The completion returned carries `completion_tokens` summed over all n samples, so the evaluator's cost figures
show what best-of-n costs per request. The recipe that makes such an artifact is
`honellm.reward.recipes.best_of_n`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from honellm.errors import HoneError
from honellm.generation import SamplingParams
from honellm.reward.functions import task_reward
from honellm.runtime.rewards import RewardSource, load_reward_model_artifact
from honellm.runtime.tasks import check_task
from honellm.task import Task


def inference_generator(artifact, generator, *, task=None):
    """The generator to use for `artifact`: `generator` itself, or a `BestOfNGenerator` around it when the
    artifact's manifest asks for best-of-n sampling."""
    inference = artifact.manifest.inference
    settings = inference.best_of_n if inference is not None else None
    if settings is None:
        return generator
    task = task if task is not None else artifact_task(artifact)
    where = f"{artifact.path or artifact.name} (inference.best_of_n)"
    functions = None
    if settings.task_rewards:
        if task is None:
            raise HoneError("this best-of-n artifact scores answers with its task's rewards, and its task cannot be "
                            "found", where=where, fix="pass the task (hone eval --task / hone serve --task)")
        if task.config.rewards:
            functions = task_reward(task)
    model = None
    if settings.reward_model:
        model = load_reward_model_artifact(settings.reward_model, where=where)
    if functions is None and model is None:
        raise HoneError("this best-of-n artifact has no reward to choose with", where=where,
                        fix="re-create it with task_rewards=true on a task with rewards, or reward_model=ARTIFACT")
    reward = RewardSource(functions, model, settings.reward_model_weight)
    return BestOfNGenerator(generator, reward, n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                            task=task, program=artifact.program)


def artifact_task(artifact) -> Task | None:
    """The task an artifact was made for: its YAML if it still exists, else the config its manifest keeps."""
    reference = artifact.manifest.task or {}
    source = reference.get("source")
    if source and Path(source).exists():
        return check_task(Task.load(source))
    if reference.get("config"):
        return check_task(Task.from_config(reference["config"]))
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
        params = params or SamplingParams()
        sample = dataclasses.replace(params, temperature=self.temperature, top_p=self.top_p, top_k=0)
        if sample.seed is None:
            repeated = [p for p in prompts for _ in range(self.n)]
            completions = self.generator.generate(repeated, sample, shared_prefix=shared_prefix, progress=progress)
        else:
            # Seeded: each prompt's n samples come from the seed alone, not from the batch the prompt arrived in,
            # so `hone eval` (many prompts a call) and `hone serve` (one request a call) choose the same answer
            # (the engine draws them as one batch when its batch size is at least n: the server's is 16).
            completions = [c for p in prompts
                           for c in self.generator.generate([p] * self.n, sample, shared_prefix=shared_prefix)]
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

    def stream_batch(self, prompts, params=None):
        """Several prompts (a request's n choices): each best answer whole, as `(index, text)`; returns them."""
        completions = self.generate(list(prompts), params)
        for i, completion in enumerate(completions):
            if completion.text:
                yield i, completion.text
        return completions


def _finite(value: float) -> float:
    return value if not math.isnan(value) else -math.inf
