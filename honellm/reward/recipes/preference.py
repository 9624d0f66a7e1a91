"""Offline preference optimisation: DPO, IPO, conservative DPO, ORPO, SimPO on pairs, and KTO on unpaired data.

Two flat recipes, read top to bottom: `train_preference` (paired losses) and `train_kto`. Both: set up the
processes and the run folder; load the model and apply the adapter; tokenize; check memory; compute the
reference log-probs ONCE (the same model with its adapter disabled, cached per example in the run folder); loop
(one optimizer step, log, evaluate on validation, checkpoint); keep the best weights; save the artifact.

| method | loss (pure function in `honellm.reward.losses`) | reference | paper |
|---|---|---|---|
| dpo | -log sigmoid(beta * (logratio_c - logratio_r)) | yes | https://arxiv.org/abs/2305.18290 |
| ipo | (length-normalised logratio gap - 1/(2 beta))^2 | yes | https://arxiv.org/abs/2310.12036 |
| cdpo | DPO with labels flipped with probability label_smoothing | yes | https://ericmitchell.ai/cdpo.pdf |
| kto | 1 - sigmoid(beta * (logratio - z)), unpaired | yes | https://arxiv.org/abs/2402.01306 |
| orpo | NLL(chosen) - beta * log sigmoid(log odds ratio) | no | https://arxiv.org/abs/2403.07691 |
| simpo | -log sigmoid(beta * (mean logp_c - mean logp_r) - gamma) | no | https://arxiv.org/abs/2405.14734 |

How the compute is spent. A micro-batch of B pairs is ONE batch of 2B sequences (chosen rows, then rejected
rows): one forward and one backward per micro-batch, as TRL's concatenated forward. The LM head runs only at the
positions that predict answer tokens (`honellm.training.logprobs`). The reference never runs during training:
its log-probs are computed before the first step with the adapter disabled (`model.disable_adapter()`: no
second copy of the weights), on the very micro-batches the run will train on (so the log-ratios are exactly 0
before the first update, bf16 included), and looked up per example; TRL's `precompute_ref_log_probs=True` does
the same in batches of its own (a step-1 DPO loss off log 2 by bf16 rounding), its default recomputes them at
every step.

Where this departs from TRL / the papers:
- Truncation keeps the answer and drops the start of the prompt first (TRL's `keep_start` cuts the end).
- KTO's reference point z: each example's mismatched completion (for TRL, the next example's in the batch)
  is fixed for the run (the next one in a seeded shuffle of the training set, never one with the same prompt),
  so its reference log-prob is cached like the others; z is the mean over the whole global batch, all
  processes included (TRL gathers it across processes too) and the same for every micro-batch of a step.
- KTO's `rewards/accuracies` (TRL logs none) is the share of completions on the right side of z.
- ORPO's NLL term is over answer tokens only (the paper's), not prompt + answer (TRL's `ORPOTrainer`); under
  gradient accumulation each micro-batch's token-mean NLL is weighted by its pairs.
- Validation accuracy is the implicit-reward accuracy `hone eval` reports: beta * (log pi - log ref) for the
  reference-based losses (for KTO too), beta * mean log-prob for ORPO and SimPO.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time

import numpy as np
import torch
from pydantic import Field

from honellm.errors import HoneError
from honellm.methods.registry import Method, register_method
from honellm.program import PromptProgram
from honellm.reward.losses import PreferenceLogps, get_preference_loss
from honellm.reward.recipes.common import (
    AlignConfig,
    PairBatch,
    cached_reference,
    collate_pairs,
    encode_pairs,
    fingerprint,
    finish_artifact,
    flat_pairs,
    load_trainable,
    pair_logps,
    reference_on_training_batches,
    reference_scores,
    score_all,
    score_pairs,
    visited,
)
from honellm.training.batching import Batch, TokenSequence, collate, encode_conversation, pack
from honellm.training.logprobs import LossOutput, metric_sums, token_logprobs
from honellm.training.loop import Best, plan_steps, start_training
from honellm.training.memory import fit_memory, parameter_bytes
from honellm.training.precision import Precision
from honellm.training.run_folder import open_run
from honellm.training.setup import (
    compile_for_graphs,
    cuda_graphs_slots,
    decide_packing,
    eager_unless,
    graph_replays,
    pick_attention,
    seed_everything,
    setup_accelerator,
)

# ------------------------------------------------------------------------------------------------ configs


class PreferenceConfig(AlignConfig):
    """Shared by the DPO family: an adapter's learning rate (full fine-tuning wants ~1e-6), packing."""

    lr: float = Field(5e-5, gt=0, description="peak learning rate of AdamW (LoRA; use ~1e-6 with adapter=full)")
    packing: bool | None = Field(
        None, description="padding-free packing: a micro-batch's answers (chosen and rejected, or KTO's completions) "
                          "end to end in one row, attention kept inside each (the same log-probs); None: on for CUDA "
                          "GPUs with a varlen attention kernel and attention=auto, off otherwise (as SFT's packing)")
    cuda_graphs: bool = Field(
        False, description="CUDA graphs for the decoder layers (torch.compile mode reduce-overhead), the paired "
                           "methods: every packed micro-batch filled to the run's widest micro-batch's tokens, so "
                           "every step replays one recorded shape instead of launching each kernel (a small model's "
                           "step is bound by launches); CUDA only, with packing under a varlen kernel; compiles "
                           "first (minutes); not KTO")

    def loss_hparams(self) -> dict:
        """The keyword arguments of the method's pure loss function."""
        raise NotImplementedError


class DPOConfig(PreferenceConfig):
    beta: float = Field(0.1, gt=0, description="inverse strength of the pull to the reference: higher stays closer "
                                               "(implicit reward = beta * log-ratio)")

    def loss_hparams(self) -> dict:
        return {"beta": self.beta}


class IPOConfig(PreferenceConfig):
    beta: float = Field(0.1, gt=0, description="the paper's tau: the loss regresses the length-normalised "
                                               "log-ratio gap onto 1 / (2 beta)")

    def loss_hparams(self) -> dict:
        return {"beta": self.beta}


class CDPOConfig(PreferenceConfig):
    beta: float = Field(0.1, gt=0, description="as DPO's beta")
    label_smoothing: float = Field(0.1, ge=0, lt=0.5, description="assumed probability that a pair's label is "
                                                                  "flipped (0 gives DPO)")

    def loss_hparams(self) -> dict:
        return {"beta": self.beta, "label_smoothing": self.label_smoothing}


class ORPOConfig(PreferenceConfig):
    beta: float = Field(0.1, gt=0, description="the paper's lambda: weight of the odds-ratio term beside the NLL "
                                               "of the chosen answers")

    def loss_hparams(self) -> dict:
        return {"beta": self.beta}


class SimPOConfig(PreferenceConfig):
    beta: float = Field(2.0, gt=0, description="scale of the length-normalised reward (the paper uses 2.0-2.5)")
    gamma: float = Field(1.0, ge=0, description="target reward margin (the paper uses gamma / beta ~ 0.5)")

    def loss_hparams(self) -> dict:
        return {"beta": self.beta, "gamma": self.gamma}


class KTOConfig(PreferenceConfig):
    beta: float = Field(0.1, gt=0, description="as DPO's beta (implicit reward = beta * log-ratio)")
    desirable_weight: float = Field(1.0, gt=0, description="weight of desirable completions' losses (the paper: "
                                                           "keep desirable_weight*n_desirable / (undesirable_weight*n_undesirable) in [1, 4/3])")
    undesirable_weight: float = Field(1.0, gt=0, description="weight of undesirable completions' losses")

    def loss_hparams(self) -> dict:
        return {"beta": self.beta, "desirable_weight": self.desirable_weight,
                "undesirable_weight": self.undesirable_weight}


# ------------------------------------------------------------------------------------------------ paired recipe


def preference_loss_fn(method: str, hparams: dict):
    """`loss_fn(model, PairBatch) -> LossOutput` of a paired method: one forward of chosen + rejected, then the
    pure loss. The loss is a mean over pairs; the step wants sums (it divides by the global pair count)."""
    loss = get_preference_loss(method)

    def loss_fn(model, batch: PairBatch) -> LossOutput:
        found = pair_logps(model, batch)
        logps = PreferenceLogps(found.chosen, found.rejected, found.chosen_lengths, found.rejected_lengths,
                                batch.ref_chosen, batch.ref_rejected)
        value, metrics = loss(logps, **hparams)
        n = batch.n_pairs
        return LossOutput(value * n, n, metric_sums(metrics, n))

    return loss_fn


def train_preference(task, config: PreferenceConfig, *, method: str, out=None, resume: bool = False,
                     force: bool = False):
    """Train `task.config.model` on the task's preference pairs with paired loss `method` -> Artifact.

    The run folder (`out`, or a new `runs/<task>/<method>-<time>/`) holds config.yaml, metrics.jsonl,
    reference_logps.pt, checkpoints/ and the artifact in `artifact/`.
    """
    loss = get_preference_loss(method)
    hparams = config.loss_hparams()

    # --- processes, precision, run folder
    accelerator = setup_accelerator()
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    precision = Precision.resolve(config.precision, device)
    run = open_run(task, method, config, out=out, resume=resume, force=force, accelerator=accelerator)

    # --- model: the base with the adapter (frozen weights in the compute dtype, trainable in fp32)
    seed_everything(config.seed)
    model, tokenizer = load_trainable(task, config, device, precision)
    _, trainable_params, total_params = parameter_bytes(model)
    pad_id = tokenizer.pad_token_id

    # --- data: pairs through the task's prompt program, tokenized once
    program = PromptProgram.from_task(task)
    train = encode_pairs(task, program, tokenizer, "train", max_length=config.max_length, limit=config.train_limit)
    validation = (encode_pairs(task, program, tokenizer, "validation", max_length=config.max_length,
                               limit=config.eval_limit) if task.has_split("validation") else None)
    steps = plan_steps([p.length for p in train], config, world=world, validating=validation is not None,
                       where=task.source, what="training pairs")
    sampler, per_epoch, total_steps = steps.sampler, steps.per_epoch, steps.total_steps
    truncated = sum(p.truncated for p in train)
    if truncated and is_main:
        run.log_metrics(event="truncated", pairs=truncated, max_length=config.max_length)

    # --- attention kernel (as SFT picks it: eager on CPU up to 256 tokens) and memory pre-flight: a micro-batch is
    # 2 x batch_size sequences
    longest = max(p.length for p in train)
    packing, unpacked_because = decide_packing(config.packing, config.attention, model, device,
                                               precision.compute_dtype)
    attention = pick_attention(model, config.attention, device=device, longest=longest, packed=packing,
                               compute_dtype=precision.compute_dtype)
    plan = fit_memory(model, sampler, loss_tokens=[max(p.chosen.num_loss_tokens, p.rejected.num_loss_tokens)
                                                   for p in train], sequences_per_example=2,
                      batch_size=min(config.batch_size, len(train)), grad_accum=config.grad_accum,
                      gradient_checkpointing=config.gradient_checkpointing, device=device, world=world,
                      limit_gb=config.memory_limit_gb, trains_all_weights=config.adapter == "full",
                      compute_dtype=precision.compute_dtype, attention=attention, packed=packing)
    config, memory = plan.apply(config, model, run if is_main else None), plan.estimate
    static = {}  # cuda_graphs=true: every micro-batch one packed row as wide as the run's widest
    if config.cuda_graphs:
        width, answers = _widest_micro_batch(train, sampler, total_steps, world=world, grad_accum=config.grad_accum)
        static = {"width": width, "slots": cuda_graphs_slots(
            model, device, precision.compute_dtype, packing=packing, unpacked_because=unpacked_because,
            attention=attention, sequences=answers)}

    # --- reference log-probs: once, with the adapter disabled, cached per example in the run folder
    score_kwargs = {"pad_id": pad_id, "precision": precision, "batch_size": config.eval_batch_size,
                    "accelerator": accelerator}
    reference = {"train": None, "validation": None}
    reference_seconds = 0.0
    if loss.needs_reference:
        sequences = {"train": flat_pairs(train), "validation": flat_pairs(validation) if validation else []}
        seen = visited(sampler, total_steps)

        def pair_values(model, batch: PairBatch) -> torch.Tensor:
            found = pair_logps(model, batch)
            return torch.stack([found.chosen, found.rejected], dim=1)

        def compute():
            # training pairs on the very micro-batches they train in; validation pairs as validation scores them
            values = reference_on_training_batches(
                model, sampler, total_steps, collate_fn=lambda index: collate_pairs([train[i] for i in index], index,
                                                                                     pad_id, packed=packing),
                logps_fn=pair_values, shape=(len(train), 2), precision=precision, grad_accum=config.grad_accum,
                accelerator=accelerator)
            held_out = reference_scores(model, sequences["validation"], **score_kwargs)
            return {"train": {"chosen": values[:, 0], "rejected": values[:, 1]},
                    "validation": {"chosen": held_out[0::2], "rejected": held_out[1::2]}}

        key = fingerprint(sequences["train"] + sequences["validation"], task.config.model, config.adapter,
                          seen.tolist(), config.batch_size, config.grad_accum, config.seed, world,
                          *(("packed",) if packing else ()))  # scored on the micro-batches as laid out
        started = time.perf_counter()
        reference = cached_reference(run.path / "reference_logps.pt", key, compute, accelerator)
        reference_seconds = time.perf_counter() - started
        if is_main:
            run.log_metrics(event="reference", pairs=len(seen), seconds=round(reference_seconds, 2))
    if static:  # compiled for the static rows after the reference pass, which ran eagerly on the packed rows
        compile_for_graphs(model)

    # --- optimizer, schedule, accelerator, resume
    training = start_training(accelerator, model, config, run, total_steps=total_steps, resume=resume,
                              precision=precision, desc=f"{method} {task.name}")
    model, state, monitor = training.model, training.state, training.monitor
    if is_main:
        run.log_metrics(event="resume" if training.resumed_from else "start", step=state.step, total_steps=total_steps,
                        steps_per_epoch=per_epoch, processes=world, precision=precision.name, pairs=len(train),
                        trainable_params=trainable_params, total_params=total_params,
                        estimated_peak_memory_bytes=memory.total, attention=attention, packing=packing,
                        unpacked_because=unpacked_because, cuda_graphs=bool(static),
                        static_width=static.get("width"))
    loss_fn = preference_loss_fn(method, hparams)
    if static:
        loss_fn = graph_replays(loss_fn)

    def evaluate() -> dict:
        """Implicit-reward accuracy, margin and loss on the validation pairs (in-memory model, cached reference)."""
        with eager_unless(bool(static)):
            found = score_pairs(model, validation, **score_kwargs)
        ref = reference["validation"]
        logps = PreferenceLogps(found.chosen, found.rejected, found.chosen_lengths, found.rejected_lengths,
                                ref["chosen"] if ref else None, ref["rejected"] if ref else None)
        value, metrics = loss(logps, **hparams)
        return {"val_loss": float(value), "val_accuracy": float(metrics["rewards/accuracies"]),
                "val_margin": float(metrics["rewards/margins"]), "val_rewards_chosen": float(metrics["rewards/chosen"]),
                "val_rewards_rejected": float(metrics["rewards/rejected"])}

    tail = training.tail(per_epoch=per_epoch, evaluate=lambda step: evaluate(), eval_every=steps.eval_every,
                         best=Best("val_accuracy"), select_best=config.select_best,
                         save_every=steps.save_every)

    # --- the loop
    while tail.running():
        micro_batches = [collate_pairs([train[i] for i in index], index, pad_id, reference["train"], packed=packing,
                                       **static)
                         for index in sampler.micro_batches(state.step, rank=rank, world_size=world,
                                                            grad_accum=config.grad_accum)]
        tail.end_step(tail.step(training.step, micro_batches, loss_fn))

    # --- keep the best weights, then save the artifact
    selected = tail.finish(keep_best=config.select_best)
    return finish_artifact(task=task, method=method, kind="full" if config.adapter == "full" else "adapter",
                           config=config, program=program, run=run, accelerator=accelerator, model=model, state=state,
                           selected=selected, monitor=monitor, precision=precision,
                           trainable_params=trainable_params, total_params=total_params,
                           extra_metrics=Best("val_accuracy").kept(state),
                           save=functools.partial(_save_policy, model=accelerator.unwrap_model(model),
                                                  tokenizer=tokenizer, full=config.adapter == "full"),
                           extra_cost={"reference_seconds": round(reference_seconds, 2)})


def _widest_micro_batch(train: list, sampler, total_steps: int, *, world: int, grad_accum: int) -> tuple[int, int]:
    """(tokens, answers): the most any micro-batch of the run packs into its row, over every step and process
    (a resumed run finds the same)."""
    tokens = answers = 0
    for step in range(total_steps):
        for rank in range(world):
            for index in sampler.micro_batches(step, rank=rank, world_size=world, grad_accum=grad_accum):
                tokens = max(tokens, sum(len(train[i].chosen) + len(train[i].rejected) for i in index))
                answers = max(answers, 2 * len(index))
    return tokens, answers


def _save_policy(artifact, path, *, model, tokenizer, full: bool) -> None:
    """An adapter in the standard PEFT format, or full weights (safetensors) with the tokenizer."""
    artifact.save(path, force=True, model=model, tokenizer=tokenizer if full else None)


# ------------------------------------------------------------------------------------------------ KTO


@dataclasses.dataclass
class UnpairedBatch:
    """B single completions (desirable or not) as one batch, with their cached reference log-probs."""

    sequences: Batch
    index: torch.Tensor  # [B] positions in the training set
    desirable: torch.Tensor  # [B] bool
    ref: torch.Tensor  # [B] reference log-probs of the completions
    kl_policy: torch.Tensor  # [1] the step's mean policy log-prob of mismatched pairs (see `train_kto`)
    kl_ref: torch.Tensor  # [1] the same under the reference

    @property
    def num_tokens(self) -> int:
        return self.sequences.num_tokens

    @property
    def num_loss_units(self) -> int:
        return int(self.index.numel())  # the loss is a mean over completions

    def to(self, device) -> UnpairedBatch:
        return UnpairedBatch(self.sequences.to(device), self.index, self.desirable.to(device), self.ref.to(device),
                             self.kl_policy.to(device), self.kl_ref.to(device))


def kto_loss_fn(hparams: dict):
    """`loss_fn(model, UnpairedBatch) -> LossOutput`: the KTO loss of the completions, z from the batch's KL terms.

    Metrics are sums the recipe turns into means over the step's desirable / undesirable completions.
    """
    loss = get_preference_loss("kto")
    beta = hparams["beta"]

    def loss_fn(model, batch: UnpairedBatch) -> LossOutput:
        found = token_logprobs(model, batch.sequences)
        logps, lengths = found.per_sequence(), found.counts()
        good, bad = batch.desirable, ~batch.desirable
        logps_ = PreferenceLogps(logps[good], logps[bad], lengths[good], lengths[bad], batch.ref[good], batch.ref[bad],
                                 kl=batch.kl_policy, ref_kl=batch.kl_ref)
        value, metrics = loss(logps_, **hparams)
        n = batch.num_loss_units
        with torch.no_grad():
            ratio = (logps - batch.ref).float()
            z = metrics["kl"]
            right = torch.where(good, ratio > z, ratio < z).float().sum()
        return LossOutput(value * n, n, {"rewards/chosen": float(beta * ratio[good].sum()),
                                         "rewards/rejected": float(beta * ratio[bad].sum()),
                                         "rewards/accuracies": float(right), "kl": float(z) * n})

    return loss_fn


def kl_partners(examples, seed: int) -> list[int]:
    """For each example, another example whose completion goes with its prompt to estimate KTO's z.

    The next example in a seeded shuffle, skipping those with the same prompt (a pair's two halves share one).
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    partner = [0] * len(examples)
    for pos, i in enumerate(order):
        for step in range(1, len(order)):
            j = order[(pos + step) % len(order)]
            if examples[j].prompt != examples[i].prompt:
                partner[i] = j
                break
        else:
            raise HoneError("every KTO example has the same prompt, so z cannot be estimated from mismatched pairs",
                            fix="KTO needs completions to at least two different prompts")
    return partner


def train_kto(task, config: KTOConfig, *, out=None, resume: bool = False, force: bool = False):
    """KTO on the task's unpaired data (a preference pair gives one desirable and one undesirable example)."""
    method, hparams = "kto", config.loss_hparams()
    loss = get_preference_loss(method)
    if config.cuda_graphs:
        raise HoneError("cuda_graphs=true replays the paired methods' static rows; KTO's micro-batches and their "
                        "mismatched completions are not laid out for it", where="cuda_graphs",
                        fix="drop cuda_graphs=true (compile=true compiles the layers for KTO too)")

    # --- processes, precision, run folder
    accelerator = setup_accelerator()
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    precision = Precision.resolve(config.precision, device)
    run = open_run(task, method, config, out=out, resume=resume, force=force, accelerator=accelerator)

    # --- model
    seed_everything(config.seed)
    model, tokenizer = load_trainable(task, config, device, precision)
    _, trainable_params, total_params = parameter_bytes(model)
    pad_id = tokenizer.pad_token_id

    # --- data: completions, and for each a mismatched (prompt, completion) for the reference point z
    program = PromptProgram.from_task(task)
    per_record = 2 if task.kind == "preference" else 1  # a pair gives a desirable and an undesirable completion
    examples = task.unpaired("train")[: per_record * config.train_limit if config.train_limit else None]

    def encode(messages, completion) -> TokenSequence:
        return encode_conversation(tokenizer, program.chat_messages(messages), completion, max_length=config.max_length)

    train = [encode(e.prompt, e.completion) for e in examples]
    partner = kl_partners(examples, config.seed)
    mismatched = [encode(e.prompt, examples[partner[i]].completion) for i, e in enumerate(examples)]
    desirable = torch.tensor([e.desirable for e in examples])
    paired_validation = task.has_split("validation") and task.kind == "preference"
    validation = (encode_pairs(task, program, tokenizer, "validation", max_length=config.max_length,
                               limit=config.eval_limit) if paired_validation else None)
    val_unpaired = None
    if task.has_split("validation") and not paired_validation:
        val_examples = task.unpaired("validation")[: config.eval_limit]
        val_unpaired = ([encode(e.prompt, e.completion) for e in val_examples],
                        torch.tensor([e.desirable for e in val_examples]))
    steps = plan_steps([len(s) for s in train], config, world=world,
                       validating=validation is not None or val_unpaired is not None, where=task.source,
                       what="training completions")
    sampler, per_epoch, total_steps = steps.sampler, steps.per_epoch, steps.total_steps
    truncated = sum(s.truncated for s in train)
    if truncated and is_main:
        run.log_metrics(event="truncated", examples=truncated, max_length=config.max_length)

    # --- attention kernel (as SFT picks it) and memory pre-flight
    longest = max(len(s) for s in train + mismatched)
    packing, unpacked_because = decide_packing(config.packing, config.attention, model, device,
                                               precision.compute_dtype)
    attention = pick_attention(model, config.attention, device=device, longest=longest, packed=packing,
                               compute_dtype=precision.compute_dtype)

    def batch_of(sequences: list[TokenSequence]) -> Batch:
        return pack(sequences) if packing else collate(sequences, pad_id)

    plan = fit_memory(model, sampler, loss_tokens=[s.num_loss_tokens for s in train],
                      batch_size=min(config.batch_size, len(train)), grad_accum=config.grad_accum,
                      gradient_checkpointing=config.gradient_checkpointing, device=device, world=world,
                      limit_gb=config.memory_limit_gb, trains_all_weights=config.adapter == "full",
                      compute_dtype=precision.compute_dtype, attention=attention, packed=packing)
    config, memory = plan.apply(config, model, run if is_main else None), plan.estimate

    # --- reference log-probs: once, adapter disabled, cached in the run folder
    score_kwargs = {"pad_id": pad_id, "precision": precision, "batch_size": config.eval_batch_size,
                    "accelerator": accelerator}
    val_sequences = flat_pairs(validation) if validation else (val_unpaired[0] if val_unpaired else [])

    seen = visited(sampler, total_steps)

    def sums(model, batch):
        return token_logprobs(model, batch).per_sequence()

    def mismatched_logps(model, local) -> torch.Tensor:
        """Policy log-probs of this process's mismatched pairs of a step, in its micro-batches (no gradient)."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), precision.autocast():
                return torch.cat([sums(model, batch_of([mismatched[i] for i in index]).to(device)).float().cpu()
                                  for index in local])
        finally:
            model.train(was_training)

    def compute():
        # completions and mismatched pairs on the very micro-batches the run uses them in (see
        # `reference_on_training_batches`), validation as validation scores it
        on_batches = {"collate_fn": None, "logps_fn": sums, "shape": (len(train),), "precision": precision,
                      "grad_accum": config.grad_accum, "accelerator": accelerator}
        return {"train": reference_on_training_batches(
                    model, sampler, total_steps, **on_batches | {
                        "collate_fn": lambda index: batch_of([train[i] for i in index])}),
                "mismatched": reference_on_training_batches(
                    model, sampler, total_steps, **on_batches | {
                        "collate_fn": lambda index: batch_of([mismatched[i] for i in index])}),
                "validation": reference_scores(model, val_sequences, **score_kwargs)}

    key = fingerprint(train + mismatched + val_sequences, task.config.model, config.adapter, seen.tolist(),
                      config.batch_size, config.grad_accum, config.seed, world, *(("packed",) if packing else ()))
    started = time.perf_counter()
    reference = cached_reference(run.path / "reference_logps.pt", key, compute, accelerator)
    reference_seconds = time.perf_counter() - started
    if is_main:
        run.log_metrics(event="reference", completions=len(seen), seconds=round(reference_seconds, 2))

    # --- optimizer, schedule, accelerator, resume
    training = start_training(accelerator, model, config, run, total_steps=total_steps, resume=resume,
                              precision=precision, desc=f"{method} {task.name}")
    model, state, monitor = training.model, training.state, training.monitor
    if is_main:
        run.log_metrics(event="resume" if training.resumed_from else "start", step=state.step, total_steps=total_steps,
                        steps_per_epoch=per_epoch, processes=world, precision=precision.name, completions=len(train),
                        desirable=int(desirable.sum()), trainable_params=trainable_params, total_params=total_params,
                        estimated_peak_memory_bytes=memory.total, attention=attention, packing=packing,
                        unpacked_because=unpacked_because)
    loss_fn = kto_loss_fn(hparams)
    beta = hparams["beta"]

    def evaluate() -> dict:
        """Implicit-reward accuracy on validation: pairwise on pairs; on unpaired data, the share of completions
        whose reward has the label's sign. The loss takes z = 0 (no mismatched validation pairs)."""
        ref = reference["validation"]
        if validation is not None:
            found = score_pairs(model, validation, **score_kwargs)
            logps = PreferenceLogps(found.chosen, found.rejected, found.chosen_lengths, found.rejected_lengths,
                                    ref[0::2], ref[1::2])
            chosen, rejected = beta * (found.chosen - ref[0::2]), beta * (found.rejected - ref[1::2])
            accuracy = float((chosen > rejected).float().mean())
        else:
            sequences, labels = val_unpaired
            values, lengths = score_all(model, sequences, **score_kwargs)
            logps = PreferenceLogps(values[labels], values[~labels], lengths[labels], lengths[~labels],
                                    ref[labels], ref[~labels])
            rewards = beta * (values - ref)
            chosen, rejected = rewards[labels], rewards[~labels]
            accuracy = float(torch.where(labels, rewards > 0, rewards < 0).float().mean())
        value, _ = loss(logps, **hparams)
        return {"val_loss": float(value), "val_accuracy": accuracy,
                "val_margin": float(chosen.mean() - rejected.mean()), "val_rewards_chosen": float(chosen.mean()),
                "val_rewards_rejected": float(rejected.mean())}

    tail = training.tail(per_epoch=per_epoch, evaluate=lambda step: evaluate(), eval_every=steps.eval_every,
                         best=Best("val_accuracy"), select_best=config.select_best,
                         save_every=steps.save_every)

    # --- the loop
    ref_train, ref_mismatched = reference["train"], reference["mismatched"]
    while tail.running():
        local = sampler.micro_batches(state.step, rank=rank, world_size=world, grad_accum=config.grad_accum)
        # z, KTO's reference point: mean log-ratio of mismatched pairs over the whole global batch (no gradient).
        mine = np.concatenate(local)
        policy_kl = mismatched_logps(accelerator.unwrap_model(model), local)
        kl_sums = torch.tensor([float(policy_kl.sum()), float(ref_mismatched[mine].sum()), len(mine)],
                               dtype=torch.float64, device=device)
        if world > 1:
            kl_sums = accelerator.reduce(kl_sums, reduction="sum")
        # kto_loss takes the means of these two: the global means give the global z.
        kl_policy = torch.tensor([float(kl_sums[0] / kl_sums[2])])
        kl_ref = torch.tensor([float(kl_sums[1] / kl_sums[2])])
        micro_batches = [UnpairedBatch(batch_of([train[i] for i in index]), torch.as_tensor(index),
                                       desirable[index], ref_train[index], kl_policy, kl_ref) for index in local]
        result = tail.step(training.step, micro_batches, loss_fn)
        # The step averaged the reward sums over all completions; make them means over each kind.
        everyone = sampler.global_batch(state.step)
        n_good = int(desirable[everyone].sum())
        n_bad = len(everyone) - n_good
        units = result.units
        result.metrics["rewards/chosen"] = result.metrics["rewards/chosen"] * units / n_good if n_good else float("nan")
        result.metrics["rewards/rejected"] = (result.metrics["rewards/rejected"] * units / n_bad if n_bad
                                              else float("nan"))
        result.metrics["rewards/margins"] = result.metrics["rewards/chosen"] - result.metrics["rewards/rejected"]
        tail.end_step(result)

    selected = tail.finish(keep_best=config.select_best)
    return finish_artifact(task=task, method=method, kind="full" if config.adapter == "full" else "adapter",
                           config=config, program=program, run=run, accelerator=accelerator, model=model, state=state,
                           selected=selected, monitor=monitor, precision=precision,
                           trainable_params=trainable_params, total_params=total_params,
                           extra_metrics=Best("val_accuracy").kept(state),
                           save=functools.partial(_save_policy, model=accelerator.unwrap_model(model),
                                                  tokenizer=tokenizer, full=config.adapter == "full"),
                           extra_cost={"reference_seconds": round(reference_seconds, 2)})


# ------------------------------------------------------------------------------------------------ registration

_PAPERS = {"dpo": "https://arxiv.org/abs/2305.18290", "ipo": "https://arxiv.org/abs/2310.12036",
           "cdpo": "https://ericmitchell.ai/cdpo.pdf", "orpo": "https://arxiv.org/abs/2403.07691",
           "simpo": "https://arxiv.org/abs/2405.14734", "kto": "https://arxiv.org/abs/2402.01306"}

register_method(Method("dpo", "reward", DPOConfig, functools.partial(train_preference, method="dpo"),
                                  "direct preference optimisation (sigmoid loss, reference = adapter disabled)",
                                  _PAPERS["dpo"], needs=("pairs",)))
register_method(Method("ipo", "reward", IPOConfig, functools.partial(train_preference, method="ipo"),
                                  "identity preference optimisation (squared loss on the log-ratio gap)",
                                  _PAPERS["ipo"], needs=("pairs",)))
register_method(Method("cdpo", "reward", CDPOConfig, functools.partial(train_preference, method="cdpo"),
                                  "conservative DPO (label smoothing for noisy preferences)", _PAPERS["cdpo"],
                                  needs=("pairs",)))
register_method(Method("orpo", "reward", ORPOConfig, functools.partial(train_preference, method="orpo"),
                                  "odds-ratio preference optimisation with its SFT term (no reference)",
                                  _PAPERS["orpo"], needs=("pairs",)))
register_method(Method("simpo", "reward", SimPOConfig, functools.partial(train_preference, method="simpo"),
                                  "simple preference optimisation, length-normalised (no reference)", _PAPERS["simpo"],
                                  needs=("pairs",)))
register_method(Method("kto", "reward", KTOConfig, train_kto,
                                  "Kahneman-Tversky optimisation on unpaired desirable/undesirable completions",
                                  _PAPERS["kto"], needs=("feedback",)))


