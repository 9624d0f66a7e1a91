"""The judge recipe: fine-tune the task's base model into a pairwise judge on the task's preference pairs -> an
Artifact that `judge: {model: ARTIFACT}` takes as it is (a task's judge_win_rate metric, the `judge` reward).

Small models are poor judges out of the box (SmolLM2-135M-Instruct answers "A" whatever it is shown: position bias
1.0). JudgeLM (Zhu et al. 2023, https://arxiv.org/abs/2310.17631) and PandaLM (Wang et al. 2023,
https://arxiv.org/abs/2306.05087) fine-tune small models on labelled comparisons instead; JudgeLM's swap
augmentation (Sec. 4.1: every pair also shown with its answers swapped) is what cures position bias.

Read top to bottom: set up the processes and the run folder; load the model and apply the adapter; turn the pairs
into judge examples; check memory; loop (one optimizer step, log, calibrate on the validation pairs, checkpoint);
keep the best weights; save the adapter with the judge's prompt in the manifest.

The examples. Each training pair becomes two supervised examples: the judge conversation exactly as
`Judge.first_wins` renders it (the judge's system turn, then `pairwise_prompt` over the rubric, the request and
the two answers), chosen shown first with the answer "A", and chosen shown second with the answer "B"
(`swap=false`: one order per pair, drawn with the seed). The tokens are the ones the judge reads
(`LocalBackend.encode`, cut from the left like its prompts) and the label is the one token whose probability it
reads (`LocalBackend.option_ids`), so training and judging cannot drift apart. The loss is the NLL of that letter
only (`sft_loss` over one labelled token per example): no end-of-turn token, since the judge reads one token.

Validation: `calibrate` on the validation pairs (`eval_limit` of them) with the in-memory model, both orders of
every pair: `val_agreement` selects the weights (higher is better, ties broken by `val_loss`, the NLL of the right
letter over both orders); `val_position_bias`, `val_first_position_rate` and `val_length_bias` are logged beside
it. Every `eval_every` steps and at the last; a run without evaluations calibrates its final weights once.

The artifact: the adapter (or full weights), a prompt program whose system message is the judge's (so `hone
serve ARTIFACT` puts it in front of an endpoint judge's request once: the program's system turn replaces the
request's), and a `judge` block in the manifest: the mode, rubric, system and pairwise prompt it was trained with
and its calibration. `Judge.load(ARTIFACT)` asks it with that prompt unless the judge config sets those fields.

Departures from JudgeLM: it generates scores and a rationale, trained on GPT-4's; here the answer is one letter and
its probability is the verdict, as Hone's judges read it (no rationale to parse, no ties to train). PandaLM and
JudgeLM also train on ties; preference pairs have none.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from honellm.errors import HoneError
from honellm.evaluation.judges import (
    PAIRWISE_OPTIONS,
    Calibration,
    Judge,
    JudgeConfig,
    LocalBackend,
    calibrate,
    pairs_as_text,
)
from honellm.methods.registry import Method, register_method
from honellm.program import PromptProgram
from honellm.reward.recipes.common import AlignConfig, finish_artifact, load_trainable
from honellm.training.batching import IGNORE, TokenSequence, collate
from honellm.training.logprobs import sft_loss
from honellm.training.loop import Best, plan_steps, start_training
from honellm.training.memory import fit_memory, parameter_bytes
from honellm.training.precision import Precision
from honellm.training.run_folder import open_run
from honellm.training.setup import pick_attention, seed_everything, setup_accelerator

_JUDGE_DEFAULTS = JudgeConfig.model_fields


class JudgeTrainingConfig(AlignConfig):
    """A pairwise judge: the shared align settings, the judge's prompt (JudgeConfig's by default), swap
    augmentation."""

    epochs: float = Field(2.0, gt=0, description="passes over the judge examples (two per pair with swap; ignored "
                                                 "when max_steps is set)")
    rubric: str = Field(_JUDGE_DEFAULTS["rubric"].default, description="what the judge judges by (its prompt's "
                                                                       "{rubric}; recorded in the artifact)")
    system: str | None = Field(_JUDGE_DEFAULTS["system"].default,
                               description="the judge's system prompt (None: no system turn)")
    pairwise_prompt: str = Field(_JUDGE_DEFAULTS["pairwise_prompt"].default,
                                 description="the judge's prompt: a template over {rubric} {prompt} {a} {b}, "
                                             "answered with the letter A or B")
    swap: bool = Field(True, description="train on both orders of every pair (swap augmentation against position "
                                         "bias); false: one order per pair, drawn with the seed")

    @field_validator("pairwise_prompt")
    @classmethod
    def _places_the_answers(cls, value: str) -> str:
        try:
            value.format(rubric="r", prompt="p", a="a", b="b")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"pairwise_prompt must be a template over {{rubric}} {{prompt}} {{a}} {{b}} "
                             f"(it failed with {err!r}); write literal braces as {{{{ and }}}}") from None
        missing = [k for k in ("prompt", "a", "b") if "{" + k + "}" not in value]
        if missing:
            raise ValueError(f"pairwise_prompt must show the judge {', '.join('{' + k + '}' for k in missing)}")
        return value


def judge_settings(config: JudgeTrainingConfig) -> JudgeConfig:
    """The JudgeConfig the trained judge is asked with (and calibrated with during training)."""
    return JudgeConfig(model="(training)", mode="pairwise", rubric=config.rubric, system=config.system,
                       pairwise_prompt=config.pairwise_prompt, batch_size=config.eval_batch_size,
                       max_prompt_tokens=config.max_length - 1)


def judge_block(config: JudgeTrainingConfig, calibration: dict | None) -> dict[str, Any]:
    """The manifest's `judge` block: the prompt the judge was trained with (what `Judge.load` reads back,
    honellm.evaluation.judges.TRAINED_FIELDS) and its calibration on the validation pairs."""
    return {"mode": "pairwise", "rubric": config.rubric, "system": config.system,
            "pairwise_prompt": config.pairwise_prompt, "options": list(PAIRWISE_OPTIONS), "swap": config.swap,
            "calibration": calibration}


def pair_texts(task, split: str, limit: int | None = None) -> list[dict]:
    """The preference pairs of `split` as prompt/chosen/rejected text (a chat prompt: its turns' contents), as
    `calibrate` and the judge_win_rate metric give them to a judge."""
    pairs = task.pairs(split)[:limit]
    if not pairs:
        raise HoneError(f"the {split} split has no preference pairs", where=task.source,
                        fix=f"add prompt/chosen/rejected records to data.{split}")
    return pairs_as_text(pairs)


def judge_examples(judge: Judge, pairs: list[dict], *, max_length: int, swap: bool = True,
                   seed: int = 0) -> list[TokenSequence]:
    """Supervised judge examples of `pairs`: the judge's conversation with the chosen answer shown first (answer
    "A") and, with `swap`, shown second (answer "B"); without it one order per pair, drawn with `seed`.

    `judge.backend` is a `LocalBackend` (its tokenizer is what counts). Labels are -100 everywhere but on the
    letter, the last token; a conversation longer than `max_length - 1` tokens loses its start, as the judge cuts
    its prompts (`truncated` set).
    """
    backend: LocalBackend = judge.backend
    letters = backend.option_ids(PAIRWISE_OPTIONS)
    rng = random.Random(seed)
    keep = max_length - 1
    out = []
    for pair in pairs:
        orders = [True, False] if swap else [rng.random() < 0.5]
        for chosen_first in orders:
            a, b = (pair["chosen"], pair["rejected"]) if chosen_first else (pair["rejected"], pair["chosen"])
            ids = backend.encode(judge.pairwise_conversations([pair["prompt"]], [a], [b])[0])
            letter = letters[0] if chosen_first else letters[1]
            out.append(TokenSequence(ids[-keep:] + [letter], [IGNORE] * len(ids[-keep:]) + [letter],
                                     truncated=len(ids) > keep))
    return out


class _Recorded:
    """A judge backend that keeps the option log-probabilities it returns (the validation loss reads them)."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def option_logprobs(self, conversations, options):
        found = self.backend.option_logprobs(conversations, options)
        self.calls.append(found)
        return found


def judge_scores(judge: Judge, pairs: list[dict]) -> tuple[dict[str, float], Calibration]:
    """Calibrate `judge` on `pairs` -> (the `val_*` scores of an eval line, the calibration).

    `val_loss` is the mean NLL of the right letter over both orders: `calibrate` asks with the chosen answer first
    (right: "A") and then second (right: "B"), and a local backend's option log-probabilities are over the whole
    vocabulary, so this is the loss the examples train on.
    """
    recorded = _Recorded(judge.backend)
    calibration = calibrate(Judge(judge.config, recorded), pairs)
    forward, backward = recorded.calls  # chosen first, then rejected first (calibrate's order)
    nll = -(np.sum(forward[:, 0]) + np.sum(backward[:, 1])) / (2 * len(pairs))
    scores = {"val_agreement": calibration.agreement, "val_position_bias": calibration.position_bias,
              "val_first_position_rate": calibration.first_position_rate, "val_loss": float(nll)}
    if not np.isnan(calibration.length_bias):
        scores["val_length_bias"] = calibration.length_bias
    return scores, calibration


def train_judge(task, config: JudgeTrainingConfig, *, out=None, resume: bool = False, force: bool = False):
    """Fine-tune the task's base model into a pairwise judge on its preference pairs -> Artifact."""
    method = "judge"

    # --- processes, precision, run folder
    accelerator = setup_accelerator()
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    precision = Precision.resolve(config.precision, device)
    run = open_run(task, method, config, out=out, resume=resume, force=force, accelerator=accelerator)

    # --- model: the base with the adapter (frozen weights in the compute dtype, trainable ones in fp32)
    seed_everything(config.seed)
    model, tokenizer = load_trainable(task, config, device, precision)
    _, trainable_params, total_params = parameter_bytes(model)
    settings = judge_settings(config)
    program = PromptProgram(system=config.system)

    # --- data: both orders of every training pair as judge examples; validation pairs as text for `calibrate`
    encoder = Judge(settings, LocalBackend(task.config.model, model=model, tokenizer=tokenizer,
                                           max_prompt_tokens=settings.max_prompt_tokens))
    train = judge_examples(encoder, pair_texts(task, "train", config.train_limit), max_length=config.max_length,
                           swap=config.swap, seed=config.seed)
    validation = pair_texts(task, "validation", config.eval_limit) if task.has_split("validation") else None
    steps = plan_steps([len(s) for s in train], config, world=world, validating=validation is not None,
                       where=task.source, what="judge examples")
    sampler, per_epoch, total_steps = steps.sampler, steps.per_epoch, steps.total_steps
    truncated = sum(s.truncated for s in train)
    if truncated and is_main:
        run.log_metrics(event="truncated", examples=truncated, max_length=config.max_length)

    # --- attention kernel (as SFT picks it) and memory pre-flight
    attention = pick_attention(model, config.attention, device=device, longest=max(len(s) for s in train))
    plan = fit_memory(model, sampler, loss_tokens=[s.num_loss_tokens for s in train],
                      batch_size=min(config.batch_size, len(train)), grad_accum=config.grad_accum,
                      gradient_checkpointing=config.gradient_checkpointing, device=device, world=world,
                      limit_gb=config.memory_limit_gb, trains_all_weights=config.adapter == "full",
                      compute_dtype=precision.compute_dtype, attention=attention,
                      evaluation_batch=config.eval_batch_size if validation is not None else 0)
    config, memory = plan.apply(config, model, run if is_main else None), plan.estimate

    # --- optimizer, schedule, accelerator, resume
    training = start_training(accelerator, model, config, run, total_steps=total_steps, resume=resume,
                              precision=precision, desc=f"{method} {task.name}")
    module, state, monitor = training.model, training.state, training.monitor
    if is_main:
        run.log_metrics(event="resume" if training.resumed_from else "start", step=state.step, total_steps=total_steps,
                        steps_per_epoch=per_epoch, processes=world, precision=precision.name, pairs=len(train) //
                        (2 if config.swap else 1), examples=len(train), trainable_params=trainable_params,
                        total_params=total_params, estimated_peak_memory_bytes=memory.total)

    # The judge on the in-memory model (every process calibrates on all the validation pairs: under FSDP a
    # forward needs them all, and the verdicts are then the same everywhere).
    unwrapped = accelerator.unwrap_model(module)
    judge = Judge(settings, LocalBackend(task.config.model, model=unwrapped, tokenizer=tokenizer,
                                         max_prompt_tokens=settings.max_prompt_tokens,
                                         batch_size=config.eval_batch_size))
    evaluations: dict[int, tuple[dict, Calibration]] = {}  # step -> (its eval line's scores, its calibration)

    def evaluate(step: int) -> dict:
        """Agreement, position bias and loss of the judge on the validation pairs (both orders)."""
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            with precision.autocast():
                evaluations[step] = judge_scores(judge, validation)
        finally:
            unwrapped.train(was_training)
        return evaluations[step][0]

    best = Best("val_agreement")
    tail = training.tail(per_epoch=per_epoch, evaluate=evaluate if validation is not None else None,
                         eval_every=steps.eval_every, best=best, select_best=config.select_best,
                         save_every=steps.save_every)

    # --- the loop
    pad_id = tokenizer.pad_token_id
    while tail.running():
        micro_batches = [collate([train[i] for i in index], pad_id)
                         for index in sampler.micro_batches(state.step, rank=rank, world_size=world,
                                                            grad_accum=config.grad_accum)]
        if tail.end_step(tail.step(training.step, micro_batches, sft_loss)):
            break
    selected = tail.finish(keep_best=config.select_best)

    # --- the calibration of the weights kept (measured now when no evaluation ran), then save
    kept: dict[str, Any] = {}
    calibration = None
    if validation is not None:
        if selected not in evaluations:
            evaluate(selected)
            if is_main:
                run.log_metrics(step=selected, event="eval", **evaluations[selected][0], best_step=selected)
        kept, calibration = evaluations[selected]
    block = judge_block(config, {"split": "validation", **calibration.as_dict()} if calibration else None)

    def save(artifact, path) -> None:
        """The adapter (or full weights with the tokenizer), and the judge block in the manifest."""
        artifact.manifest.judge = block
        artifact.save(path, force=True, model=accelerator.unwrap_model(module),
                      tokenizer=tokenizer if config.adapter == "full" else None)

    artifact = finish_artifact(task=task, method=method, kind="full" if config.adapter == "full" else "adapter",
                               config=config, program=program, run=run, accelerator=accelerator, model=module,
                               state=state, selected=selected, monitor=monitor, precision=precision,
                               trainable_params=trainable_params, total_params=total_params,
                               extra_metrics=dict(kept), save=save)
    artifact.manifest.judge = block
    return artifact


register_method(Method("judge", "reward", JudgeTrainingConfig, train_judge,
                       "a pairwise judge fine-tuned on the preference pairs (both orders, answer A or B), "
                       "calibrated on validation; use it as `judge: {model: ARTIFACT}`",
                       "https://arxiv.org/abs/2310.17631", needs=("pairs",)))
