"""The SFT recipe: supervised fine-tuning of the task's base model with one tuning method -> Artifact.

Read top to bottom: set up the processes and the run folder; load the model and make it trainable; tokenize;
check memory; loop (one optimizer step, log, evaluate on validation, checkpoint); keep the best weights; save.

The loss is the mean negative log-likelihood of the answer tokens over each global batch: the answer is the
assistant turn exactly as the chat template writes it after the prompt, end-of-turn token included (so the model
learns to stop), and the prompt takes no loss unless `completion_only_loss=false`. A chat record trains every
assistant turn of its conversation (the other turns masked); a task with `tools:` renders its conversations with the
tools exactly as a tool episode does (`_encoder`). The LM head runs only at the positions that predict answer tokens
(`honellm.training.logprobs`).

Evaluation during training scores the validation split with the task's metric on the in-memory model: the most
likely label for tasks with `choices` (the same log-likelihood scoring `hone eval` uses), greedy answers for text
metrics (whole tool episodes for a task with tools, through the runtime as `hone eval` runs them), and the
validation loss always. The best evaluation's weights are kept (`select_best`), and
`early_stopping_patience` evaluations without improvement end the run.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from honellm.artifact import Artifact
from honellm.core import fused, liger
from honellm.core.support import note_paths
from honellm.errors import HoneError
from honellm.methods.registry import Method, register_method
from honellm.program import PromptProgram
from honellm.training.batching import (
    TokenSequence,
    collate,
    encode_conversation,
    encode_turns,
    pack,
    token_budget_micro_batches,
)
from honellm.training.checkpoint import is_fsdp
from honellm.training.logprobs import sft_loss
from honellm.training.loop import Best, plan_steps, start_training
from honellm.training.memory import check_memory, estimate_training_memory, fit_memory, parameter_bytes
from honellm.training.precision import Precision
from honellm.training.run_folder import open_run
from honellm.training.setup import (
    compile_for_graphs,
    compile_layers,
    cuda_graphs_slots,
    decide_packing,
    eager_unless,
    enable_checkpointing,
    graph_replays,
    pick_attention,
    seed_everything,
    setup_accelerator,
)
from honellm.training.validation import greedy_answers, score_sequences
from honellm.tuning.catalog import all_methods as all_adapters
from honellm.tuning.catalog import get_method
from honellm.tuning.config import SFTConfig
from honellm.tuning.methods import save_initial_adapter
from honellm.tuning.registry import TuningMethod


def tune(task, method: str, config: SFTConfig | None = None, *, out: str | Path | None = None, resume: bool = False,
         force: bool = False) -> Artifact:
    """Fine-tune `task.config.model` on the task's train split with tuning method `method`; return the Artifact.

    The run folder (`out`, or a new `runs/<task>/<method>-<time>/`) holds config.yaml, metrics.jsonl, log.txt,
    checkpoints/ and the artifact in `artifact/`. `resume` continues the run in `out` (or the task's latest run of
    this method) from its last checkpoint.
    """
    spec = get_method(method)
    config = config if config is not None else spec.config()
    if not isinstance(config, spec.config):
        raise TypeError(f"method {method!r} takes a {spec.config.__name__}, not a {type(config).__name__}")

    # --- processes, precision, run folder
    accelerator = setup_accelerator()
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    precision = Precision.resolve(config.precision, device)
    run = open_run(task, spec.name, config, out=out, resume=resume, force=force, accelerator=accelerator)

    # --- model: load, make trainable, cast (frozen in the compute dtype, trainable in fp32)
    seed_everything(config.seed)
    from honellm.models import load, resolve

    base_path = str(resolve(task.config.model).path)
    if spec.load is not None:
        model, tokenizer = spec.load(task.config.model, config, device)
    else:
        # Full fine-tuning keeps fp32 master weights: load them in fp32 rather than round-trip through bf16.
        model, tokenizer = load(task.config.model, dtype="fp32" if spec.trains_base else precision.name,
                                device=str(device))
    model.config.use_cache = False
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    model = spec.apply(model, config, base_path)
    precision.cast_model(model)
    fused.install(model)  # the fused LoRA forward/backward, where it is exact (see honellm.core.fused)
    no_liger = liger.apply(model, device)  # Liger Kernel's fused kernels on CUDA where installed (honellm.core.liger)
    _, trainable_params, total_params = parameter_bytes(model)
    initial_adapter = run.path / "initial-adapter" if spec.initial_adapter else None
    if initial_adapter is not None and is_main:
        save_initial_adapter(model, initial_adapter)

    # --- data: the prompt program every artifact carries; train and validation tokenized once
    program = PromptProgram.from_task(task)
    train = _encode_split(task, program, tokenizer, "train", config)
    artifact = Artifact.create(name=f"{task.name}-{spec.name}", method=spec.name,
                               kind="full" if spec.trains_base else "adapter", base_model=task.config.model,
                               program=program, task=task, run_dir=str(run.path))
    validation = _validation_set(task, artifact, tokenizer, config) if task.has_split("validation") else None
    steps = plan_steps([len(s) for s in train], config, world=world, validating=validation is not None,
                       where=task.source)
    sampler, per_epoch, total_steps = steps.sampler, steps.per_epoch, steps.total_steps
    truncated = sum(s.truncated for s in train)
    if truncated and is_main:
        run.log_metrics(event="truncated", examples=truncated, max_length=config.max_length)

    # --- packing, attention kernel and memory pre-flight, from the longest micro-batch the data can produce
    longest = max(len(s) for s in train)
    packing, unpacked_because = decide_packing(config.packing, config.attention, model, device,
                                               precision.compute_dtype)
    budget = config.max_tokens_per_batch or config.batch_size * longest if packing else None
    attention = pick_attention(model, config.attention, device=device, longest=budget or longest, packed=packing,
                               compute_dtype=precision.compute_dtype)
    slots = _cuda_graphs_slots(config, model, device, precision.compute_dtype, packing=packing,
                               unpacked_because=unpacked_because, attention=attention, budget=budget,
                               longest=longest, per_process=-(-sampler.global_batch_size // world))
    if slots:  # CUDA graphs: static shapes, one recorded graph per layer
        compile_for_graphs(model)
    elif config.compile and compile_layers(model) == 0:
        raise HoneError("compile=true found no decoder layers to compile in this model", where="compile",
                        fix="drop compile=true")
    evaluation_batch = config.eval_batch_size if validation is not None and config.eval_every != 0 else 0
    if packing:  # one row of `budget` tokens (the attention of a packed row spans it whole), fitted by its rows
        def estimate_for(batch: int, length: int, checkpointing: bool):
            return estimate_training_memory(
                model, micro_batch_size=1, seq_len=max(budget, longest), gradient_checkpointing=checkpointing,
                loss_tokens=max(budget, longest), compute_dtype=precision.compute_dtype, distributed=world > 1,
                device_type=device.type, attention=attention, evaluation_batch=evaluation_batch)

        memory = check_memory(estimate_for, batch_size=1, seq_len=max(budget, longest), grad_accum=config.grad_accum,
                              gradient_checkpointing=config.gradient_checkpointing, device=device,
                              limit_gb=config.memory_limit_gb, trains_all_weights=spec.trains_base)
    else:  # the worst micro-batches the data produces; a smaller micro-batch (same global batch) where needed
        plan = fit_memory(model, sampler, loss_tokens=[s.num_loss_tokens for s in train],
                          batch_size=min(config.batch_size, len(train)), grad_accum=config.grad_accum,
                          gradient_checkpointing=config.gradient_checkpointing, device=device, world=world,
                          limit_gb=config.memory_limit_gb, trains_all_weights=spec.trains_base,
                          compute_dtype=precision.compute_dtype, attention=attention,
                          evaluation_batch=evaluation_batch)
        config, memory = plan.apply(config, model, run if is_main else None), plan.estimate

    # --- optimizer, schedule, accelerator, resume
    training = start_training(accelerator, model, config, run, total_steps=total_steps, resume=resume,
                              precision=precision, desc=f"{spec.name} {task.name}")
    model, state, monitor = training.model, training.state, training.monitor
    if is_main:
        run.log_metrics(event="resume" if training.resumed_from else "start", step=state.step,
                        total_steps=total_steps, steps_per_epoch=per_epoch, processes=world,
                        precision=precision.name, attention=attention,
                        packing=packing, max_tokens_per_batch=budget, cuda_graphs=bool(slots),
                        liger=no_liger or "applied",
                        unpacked_because=unpacked_because,
                        trainable_params=trainable_params, total_params=total_params,
                        estimated_peak_memory_bytes=memory.total)
        note_paths(model, run, monitor.note)  # which paths the model takes, once (honellm.core.support)

    def evaluate(step: int) -> dict:
        # Under CUDA graphs the layers are compiled for the training row's one shape: validation's padded batches
        # and generation run them eagerly rather than record a graph per shape.
        with eager_unless(bool(slots)):
            return _named(_evaluate(accelerator.unwrap_model(model), tokenizer, validation, precision=precision,
                                    config=config, accelerator=accelerator), validation)

    best = Best(f"val_{validation.metric_name}", validation.higher_is_better) if validation is not None else None
    tail = training.tail(per_epoch=per_epoch, evaluate=evaluate if validation is not None else None,
                         eval_every=steps.eval_every, best=best, select_best=config.select_best,
                         patience=config.early_stopping_patience, save_every=steps.save_every)

    # --- the loop
    pad_id = tokenizer.pad_token_id
    loss_fn = graph_replays(sft_loss) if slots else sft_loss
    while tail.running():
        if packing:  # the same global batch, cut by the token budget instead of an example count
            static = {"width": budget, "slots": slots, "pad_id": pad_id or 0} if slots else {}
            micro_batches = [pack([train[i] for i in index], **static) for index in token_budget_micro_batches(
                sampler.global_batch(state.step), sampler.lengths, budget, parts=world, part=rank)]
        else:
            micro_batches = [collate([train[i] for i in index], pad_id)
                             for index in sampler.micro_batches(state.step, rank=rank, world_size=world,
                                                                grad_accum=config.grad_accum)]
        result = tail.step(training.step, micro_batches, loss_fn)
        if tail.end_step(result):
            break

    # --- keep the best weights, then save the artifact
    selected = tail.finish(keep_best=config.select_best)
    final = accelerator.unwrap_model(model)
    # Under FSDP the weights are sharded: gather them whole (every process) for the main process to save.
    whole = _gather_model(model) if is_fsdp(accelerator) else None
    summary = monitor.summary()
    metrics = {"best_step": state.best_step, "final_step": state.step, "selected_step": selected}
    # The scores of the weights the artifact holds: the best evaluation's, or the last one's without select_best.
    kept = (best.kept(state) if config.select_best else tail.last_scores or {}) if best is not None else {}
    if kept.get("val_loss") is not None:
        metrics.update(kept)
    cost = {"trainable_params": trainable_params, "total_params": total_params, "processes": world,
            "precision": precision.name, "device": device.type, **summary}
    artifact.manifest.config = {"method": spec.name, **config.model_dump(mode="json")}
    artifact.manifest.metrics, artifact.manifest.cost = metrics, cost
    if is_main:
        _save_artifact(artifact, run.path / "artifact", spec, final, tokenizer, initial_adapter, whole)
        run.log_metrics(event="done", **metrics, **summary)
        run.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return artifact


def _cuda_graphs_slots(config: SFTConfig, model, device: torch.device, compute_dtype: torch.dtype, *,
                       packing: bool, unpacked_because: str | None, attention: str, budget: int | None,
                       longest: int, per_process: int) -> int | None:
    """With `cuda_graphs=true`, the sequence slots of every static packed row (the most examples a process's
    micro-batch can hold, plus the filler); an error naming what to change where CUDA graphs cannot run. None
    without it."""
    if not config.cuda_graphs:
        return None
    if budget is not None and budget < longest:
        raise HoneError(f"max_tokens_per_batch={budget} is shorter than the longest training sequence ({longest}): "
                        f"a static row must hold every example", where="max_tokens_per_batch",
                        fix=f"set max_tokens_per_batch to {longest} or more, or leave it unset")
    return cuda_graphs_slots(model, device, compute_dtype, packing=packing, unpacked_because=unpacked_because,
                             attention=attention, sequences=per_process)


# ------------------------------------------------------------------------------------------------ state


def _named(scores: dict, validation: ValidationSet) -> dict:
    """Scores as logged: `val_score` under the metric's name (val_accuracy, val_exact_match, ...)."""
    return {(f"val_{validation.metric_name}" if k == "val_score" else k): v for k, v in scores.items()}


# ------------------------------------------------------------------------------------------------ data


def _encode_split(task, program: PromptProgram, tokenizer, split: str, config: SFTConfig) -> list[TokenSequence]:
    records = task.split(split)
    if not records:
        raise HoneError(f"the {split} split is empty", where=task.source, fix=f"add records to data.{split}")
    out = []
    encode = _encoder(task, program, tokenizer, config)
    for record in records:
        target = task.target(record)
        if target is None or target == "":
            raise HoneError(f"record has no answer to learn ({task.target_field() or 'target'} is empty)",
                            where=getattr(record, "where", task.source), fix="fill in the answer, or drop the record")
        out.append(encode(record, target))
    return out


def _encoder(task, program: PromptProgram, tokenizer, config: SFTConfig, *, completion_only: bool | None = None):
    """How a record becomes a training sequence: `(record, target) -> TokenSequence`.

    - A chat record (no prompt template) trains every assistant turn of its conversation, the other turns
      masked (`encode_turns`, as TRL's `assistant_only_loss`): a tool episode's call and its final answer alike.
      A template that edits earlier turns cannot train them all at once: those records train their last turn.
    - A task with `tools:` renders its conversations with the tools exactly as an episode does
      (`ToolEnvironment.render`: the template's `tools=`, or the tools described in the system turn), so that
      what SFT teaches is what an episode shows the model.
    - Other records: the prompt, then the answer (`encode_conversation`).
    """
    completion_only = config.completion_only_loss if completion_only is None else completion_only
    chat = task.format == "chat" and not program.template
    render = None
    if task.config.tools:
        from honellm.generation.tools import ToolEnvironment, load_tools

        tools = load_tools(task.config.tools, task.base_dir, where=f"{task.source} (tools)")
        environment = ToolEnvironment(tools, tokenizer, max_turns=task.config.tool_turns)

        def render(messages: list[dict], generation_prompt: bool) -> str:
            return environment.render(messages, generation_prompt=generation_prompt)

    def encode(record, target: str) -> TokenSequence:
        if chat:
            conversation = program.chat_messages(list(record["messages"]))
        else:
            conversation = [*program.messages(task, record), {"role": "assistant", "content": target}]
        if render is None and not chat:
            return encode_conversation(tokenizer, conversation[:-1], target, max_length=config.max_length,
                                       completion_only=completion_only)
        try:
            return encode_turns(tokenizer, conversation, max_length=config.max_length,
                                completion_only=completion_only, render=render,
                                add_special_tokens=False if render is not None else None)
        except HoneError:
            if render is not None:
                raise
            return encode_conversation(tokenizer, program.messages(task, record), target,
                                       max_length=config.max_length, completion_only=completion_only)

    return encode


@dataclass
class ValidationSet:
    """Validation data tokenized once, and what scoring it needs.

    The task score comes from `honellm.evaluation.evaluate` on the in-memory model (the number `hone eval` gives
    for the artifact). The generation engine behind it does not run PEFT prompt-learning models (virtual
    tokens); for those the recipe scores the labels (`choice_sequences`) or greedy answers itself, the same way.
    """

    task: object
    artifact: Artifact  # not saved: evaluate() reads its prompt program
    gold: list[TokenSequence]  # reference answers, for the validation loss
    references: list[str]
    prompts: list[str]
    choice_sequences: list[list[TokenSequence]]
    metric_name: str
    higher_is_better: bool
    limit: int | None


def _validation_set(task, artifact: Artifact, tokenizer, config: SFTConfig) -> ValidationSet:
    from honellm.data.chat import render_prompt
    from honellm.evaluation.metrics import METRICS

    records = task.split("validation")[: config.eval_limit]
    messages = [artifact.program.messages(task, r) for r in records]
    references = [task.target(r) for r in records]
    encode = _encoder(task, artifact.program, tokenizer, config, completion_only=True)
    gold = [encode(r, ref) for r, ref in zip(records, references, strict=True)]
    choices = task.config.choices or []
    choice_sequences = [[encode_conversation(tokenizer, m, c, max_length=config.max_length) for c in choices]
                        for m in messages] if choices else []
    metric = METRICS[task.metric]
    return ValidationSet(task, artifact, gold, references, [render_prompt(tokenizer, m) for m in messages],
                         choice_sequences, task.metric, metric.higher_is_better, config.eval_limit)


def _evaluate(model, tokenizer, validation: ValidationSet, *, precision: Precision, config: SFTConfig,
              accelerator) -> dict:
    """Validation loss (each process scores a shard) and the task score (the main process; shared with all).

    Under FSDP a forward pass needs every process (they gather each layer's shards together), so every process
    scores everything, in the same order.
    """
    from accelerate.utils import broadcast_object_list

    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if is_fsdp(accelerator):
        rank, world = 0, 1
    mine = [validation.gold[i] for i in range(rank, len(validation.gold), world)]
    sums, counts = score_sequences(model, mine, pad_id=tokenizer.pad_token_id, precision=precision,
                                   batch_size=config.eval_batch_size, device=device)
    totals = torch.tensor([sums.sum(), counts.sum()], dtype=torch.float64, device=device)
    if world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    scores = {"val_loss": float(-totals[0] / max(1.0, float(totals[1])))}
    score = [_task_score(model, tokenizer, validation, precision=precision, config=config, device=device)
             if rank == 0 else None]
    if world > 1:
        broadcast_object_list(score)
    if score[0] is not None:
        scores["val_score"] = score[0]
    return scores


def _task_score(model, tokenizer, validation: ValidationSet, *, precision: Precision, config: SFTConfig,
                device) -> float | None:
    from honellm.evaluation.evaluate import evaluate
    from honellm.evaluation.metrics import METRICS

    peft_config = getattr(model, "active_peft_config", None)
    if not (peft_config is not None and peft_config.is_prompt_learning):
        with precision.autocast():
            result = evaluate(validation.artifact, validation.task, "validation", limit=validation.limit, model=model,
                              tokenizer=tokenizer, batch_size=config.eval_batch_size, progress=False)
        return float(result.score)
    metric = METRICS[validation.metric_name]
    choices = validation.task.config.choices
    if metric.needs != "text" or validation.task.config.tools:
        # a reward or preference metric, or a task with tools (its answers are whole episodes, which the engine
        # does not run for virtual-token models): the validation loss decides
        return None
    kwargs = {"precision": precision, "batch_size": config.eval_batch_size, "device": device}
    if choices:
        flat = [seq for row in validation.choice_sequences for seq in row]
        sums, _ = score_sequences(model, flat, pad_id=tokenizer.pad_token_id, **kwargs)
        best = sums.reshape(-1, len(choices)).argmax(axis=1)
        predictions = [choices[int(j)] for j in best]
    else:
        predictions = greedy_answers(model, tokenizer, validation.prompts,
                                     max_new_tokens=validation.task.config.generation.max_new_tokens, **kwargs)
    return float(np.mean(metric.fn(predictions, validation.references)))


# ------------------------------------------------------------------------------------------------ saving


def _gather_model(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_artifact(artifact: Artifact, path: Path, spec: TuningMethod, model, tokenizer, initial: Path | None,
                   state_dict: dict | None = None) -> None:
    """Save weights (full fine-tuning) or the adapter; `state_dict` holds whole weights gathered under FSDP."""
    if spec.trains_base and state_dict is None:
        artifact.save(path, force=True, model=model, tokenizer=tokenizer)
        return
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".weights-") as tmp:
        if spec.trains_base:
            model.save_pretrained(Path(tmp) / "model", safe_serialization=True, state_dict=state_dict)
            tokenizer.save_pretrained(Path(tmp) / "model")
            artifact.save(path, force=True, extra_files={"model": Path(tmp) / "model"})
        else:
            spec.save(model, Path(tmp) / "adapter", initial=initial, state_dict=state_dict)
            artifact.save(path, force=True, extra_files={"adapter": Path(tmp) / "adapter"})
    if initial is not None:
        shutil.rmtree(initial, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ registration


def _run(task, config: SFTConfig, *, method: str, out: str | Path | None = None, resume: bool = False,
         force: bool = False) -> Artifact:
    return tune(task, method, config, out=out, resume=resume, force=force)


# Every adapter of the tuning table (LoRA and family, IA3, prompt learning, full fine-tuning) is a tuning method
# this recipe runs: one line registers them all in the one registry of methods.
for _spec in all_adapters().values():
    register_method(Method(_spec.name, "tuning", _spec.config, functools.partial(_run, method=_spec.name),
                           _spec.summary, _spec.paper, needs=("answers", "train"), shared=SFTConfig, details=_spec))
