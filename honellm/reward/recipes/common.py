"""What the offline align recipes (reward model, DPO family, KTO) share, on top of `honellm.training`.

- `AlignConfig`: the shared training settings plus the adapter (LoRA, rsLoRA, DoRA, or full fine-tuning) and
  validation settings;
- `load_trainable`: the task's base model with the adapter applied, under the precision policy (its decoder
  layers compiled with `compile=true`);
- `encode_pairs`, `PairBatch`, `collate_pairs`: preference pairs as token sequences, and a micro-batch of B pairs
  as ONE batch of 2B sequences (chosen rows first), so that both answers go through one forward pass;
- `pair_logps`: summed answer log-probs of a `PairBatch`, LM head at answer positions only;
- `reference_scores`: log-probs under the reference (the model with its adapter disabled), computed once, for
  the examples the run will visit (`visited`);
- `finish_artifact`: the cost figures and the Artifact written into the run folder (the loop's end,
  `honellm.training.loop.TrainingTail.finish`, has put the best weights back in).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from honellm.artifact import Artifact
from honellm.core import fused, liger
from honellm.core.support import note_paths
from honellm.errors import HoneError
from honellm.progress import progress
from honellm.training.batching import Batch, TokenSequence, collate, encode_conversation, pack
from honellm.training.checkpoint import load_plain
from honellm.training.config import TrainingConfig
from honellm.training.logprobs import token_logprobs
from honellm.training.loop import LoopState
from honellm.training.precision import Precision
from honellm.training.setup import compile_layers, enable_checkpointing
from honellm.training.validation import score_sequences

ADAPTERS = ("lora", "rslora", "dora", "full")


class AlignConfig(TrainingConfig):
    """Settings every offline align method shares: training, the adapter, validation."""

    epochs: float = Field(1.0, gt=0, description="passes over the training pairs (ignored when max_steps is set)")
    max_length: int = Field(1024, ge=8, description="longest prompt + answer in tokens; longer ones lose the start "
                                                     "of their prompt first, then the end of their answer")
    adapter: Literal["lora", "rslora", "dora", "full"] = Field(
        "lora", description="what trains: a LoRA-family adapter (lora, rslora, dora) or every weight (full)")
    r: int = Field(16, ge=1, description="adapter rank (lora, rslora, dora)")
    alpha: float = Field(32, gt=0, description="adapter scale: the update is multiplied by alpha / r (alpha / sqrt(r) for rslora)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input (0 is fastest)")
    target_modules: str | list[str] = Field(
        "all-linear", description="modules to adapt: all-linear, attention, mlp, or a list of module names")
    select_best: bool = Field(True, description="keep the weights of the best validation evaluation, not the last")
    eval_limit: int | None = Field(500, ge=1, description="validation pairs scored at each evaluation (None: all)")
    eval_batch_size: int = Field(16, ge=1, description="sequences per forward pass when scoring validation "
                                                       "(and the reference before training)")
    train_limit: int | None = Field(None, ge=1, description="train on the first N training pairs (or unpaired records) only; None: all")


# ------------------------------------------------------------------------------------------------ model


def load_trainable(task, config: AlignConfig, device: torch.device, precision: Precision):
    """`(model, tokenizer)`: the task's base model with `config.adapter` applied, frozen weights in the compute
    dtype and trainable ones in fp32. The adapters come from the tuning registry (`honellm.tuning`)."""
    from honellm.models import load, resolve
    from honellm.tuning.catalog import get_method

    full = config.adapter == "full"
    # Full fine-tuning keeps fp32 master weights: load them in fp32 rather than round-trip through bf16.
    model, tokenizer = load(task.config.model, dtype="fp32" if full else precision.name, device=str(device))
    model.config.use_cache = False
    _disable_model_dropout(model)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    # The LoRA-family `apply` functions read r, alpha, dropout and target_modules, which AlignConfig has too.
    model = get_method(config.adapter).apply(model, config, str(resolve(task.config.model).path))
    precision.cast_model(model)
    if precision.mixed:
        keep_adapter_inputs_in_compute_dtype(model)
    fused.install(model)  # the fused LoRA forward/backward, where it is exact (see honellm.core.fused)
    liger.apply(model, device)  # Liger Kernel's fused kernels on CUDA where installed (see honellm.core.liger)
    # compile=true: the decoder layers compiled here, before anything runs them, so that the reference pass and
    # the training steps run the same compiled layers (generation runs them eagerly: honellm.core.runners).
    # cuda_graphs=true (the DPO family, the online updates) compiles for static shapes later, in its recipe.
    if config.compile and not getattr(config, "cuda_graphs", False) and compile_layers(model) == 0:
        raise HoneError("compile=true found no decoder layers to compile in this model", where="compile",
                        fix="drop compile=true")
    return model, tokenizer


def _disable_model_dropout(model) -> None:
    """The base model's own dropout off (before the adapter is applied: the adapter's dropout stays configurable).

    The reference and the sampler score without dropout; a policy trained with it (GPT-2 and OPT ship dropout of
    0.1) would start with log-ratios away from zero. TRL's `disable_dropout` does the same for nn.Dropout modules;
    OPT and others also apply dropout functionally from a float attribute, zeroed here too.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def keep_adapter_inputs_in_compute_dtype(model) -> None:
    """Stop PEFT from casting each adapter's input to the adapter's fp32 dtype.

    Every forward of a recipe runs under autocast, which casts the input back to bf16 for the adapter's matmul:
    the round trip bf16 -> fp32 -> bf16 is exact, so outputs and gradients are bit-identical without it, and the
    two full-size copies per adapted matrix are saved (about 20% of a LoRA step on this CPU). A forward outside
    autocast would now fail on mixed dtypes instead of running in fp32; the recipes never do one.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def reference_off(model) -> contextlib.AbstractContextManager:
    """The context in which `model` is the reference: its adapter disabled (the base model, no second copy).

    Full fine-tuning has no adapter to disable; its reference log-probs are taken before the first step."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ data


@dataclass
class EncodedPair:
    """A preference pair as token sequences, labels on the answer (end-of-turn included) only."""

    chosen: TokenSequence
    rejected: TokenSequence

    @property
    def length(self) -> int:
        """What the batch sampler groups by: the longer of the two (the batch pads both to it)."""
        return max(len(self.chosen), len(self.rejected))

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


def encode_pairs(task, program, tokenizer, split: str, *, max_length: int, limit: int | None = None) -> list[EncodedPair]:
    """The pairs of `split` through the artifact's prompt program and the model's chat template."""
    pairs = task.pairs(split)[:limit]
    if not pairs:
        raise HoneError(f"the {split} split has no preference pairs", where=task.source,
                        fix=f"add prompt/chosen/rejected records to data.{split}")
    out = []
    for pair in pairs:
        messages = program.chat_messages(pair.prompt)
        out.append(EncodedPair(encode_conversation(tokenizer, messages, pair.chosen, max_length=max_length),
                               encode_conversation(tokenizer, messages, pair.rejected, max_length=max_length)))
    return out


@dataclass
class PairBatch:
    """B preference pairs as ONE batch of 2B sequences (right-padded rows, or packed end to end in one row):
    sequences 0..B-1 chosen, B..2B-1 rejected.

    `index` are the pairs' positions in the training set (to look up their cached reference log-probs);
    `ref_chosen`/`ref_rejected` are those log-probs ([B] each) when the method needs a reference.
    """

    sequences: Batch
    index: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    @property
    def n_pairs(self) -> int:
        return int(self.index.numel())

    @property
    def num_tokens(self) -> int:
        return self.sequences.num_tokens

    @property
    def num_loss_units(self) -> int:
        return self.n_pairs  # the loss is a mean over pairs

    def to(self, device) -> PairBatch:
        return PairBatch(self.sequences.to(device), self.index, _to(self.ref_chosen, device),
                         _to(self.ref_rejected, device))


def _to(tensor: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def collate_pairs(pairs: list[EncodedPair], index, pad_id: int, reference: dict | None = None, *,
                  packed: bool = False, width: int | None = None, slots: int | None = None) -> PairBatch:
    """One batch of chosen-then-rejected sequences, right-padded or (`packed`) end to end in one row (of exactly
    `width` tokens and `slots` sequence slots where given: `pack`'s static rows); `reference` holds cached
    `chosen`/`rejected` log-probs."""
    index = torch.as_tensor(np.asarray(index), dtype=torch.long)
    ordered = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    sequences = pack(ordered, width=width, slots=slots, pad_id=pad_id) if packed else collate(ordered, pad_id)
    if reference is None:
        return PairBatch(sequences, index)
    return PairBatch(sequences, index, reference["chosen"][index], reference["rejected"][index])


@dataclass
class PairLogps:
    """Summed answer log-probs and answer token counts of a PairBatch, [B] each."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor


def pair_logps(model, batch: PairBatch) -> PairLogps:
    """Chosen and rejected answers in ONE forward pass (the LM head at answer positions only)."""
    found = token_logprobs(model, batch.sequences)
    sums, counts = found.per_sequence(), found.counts()
    n = batch.n_pairs  # a static packed row has more sequence slots than answers (the filler, empty ones)
    return PairLogps(sums[:n], sums[n:2 * n], counts[:n], counts[n:2 * n])


def flat_pairs(pairs: list[EncodedPair]) -> list[TokenSequence]:
    """[c0, r0, c1, r1, ...]: the pairs' sequences, for scoring in length-sorted batches."""
    return [s for p in pairs for s in (p.chosen, p.rejected)]


@torch.no_grad()
def score_all(model, sequences: list[TokenSequence], *, pad_id: int, precision: Precision, batch_size: int,
              accelerator, desc: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label log-probs and label counts of every sequence, fp32 [N] each, on the in-memory model
    (with a progress bar named `desc`, when given).

    Each process scores a shard (batches sorted by length: little padding), then all gather the whole.
    """
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(sequences), world))
    bar = progress(total=len(mine), desc=desc, unit="seq", leave=False,
                   disable=None if accelerator.is_main_process and desc else True)
    try:
        sums, counts = score_sequences(accelerator.unwrap_model(model), [sequences[i] for i in mine], pad_id=pad_id,
                                       precision=precision, batch_size=batch_size, device=accelerator.device,
                                       on_batch=bar.update)
    finally:
        bar.close()
    found = list(zip(mine, sums.tolist(), counts.tolist(), strict=True))
    if world > 1:
        found = gather_object(found)
    values, lengths = torch.zeros(len(sequences)), torch.zeros(len(sequences))
    for i, value, count in found:
        values[i], lengths[i] = value, count
    return values, lengths


def score_pairs(model, pairs: list[EncodedPair], **kwargs) -> PairLogps:
    """`score_all` over pairs: their summed answer log-probs and answer lengths ([N] each)."""
    values, lengths = score_all(model, flat_pairs(pairs), **{"desc": "validation", **kwargs})
    return PairLogps(values[0::2], values[1::2], lengths[0::2], lengths[1::2])


def reference_scores(model, sequences: list[TokenSequence], *, only=None, **kwargs) -> torch.Tensor:
    """Summed answer log-probs under the reference: the same model with its adapter disabled (no second copy).

    `only` (indices) scores just those sequences (the rest are NaN): a run of a few steps over a large data set
    needs the reference of the examples it will visit, not of all of them.
    """
    index = list(range(len(sequences))) if only is None else sorted(int(i) for i in only)
    values = torch.full((len(sequences),), float("nan"))
    with reference_off(kwargs["accelerator"].unwrap_model(model)):
        values[index] = score_all(model, [sequences[i] for i in index], **{"desc": "reference", **kwargs})[0]
    return values


@torch.no_grad()
def reference_on_training_batches(model, sampler, total_steps: int, *, collate_fn, logps_fn, shape: tuple[int, ...],
                                  precision: Precision, grad_accum: int, accelerator,
                                  desc: str = "training examples") -> torch.Tensor:
    """Reference log-probs of the training examples, computed on exactly the micro-batches the run trains on.

    `collate_fn(index)` builds a micro-batch of examples `index` as the loop does, `logps_fn(model, batch)` its
    per-example log-probs ([B] or [B, 2]); the result has `shape` ([N] or [N, 2]), NaN for examples the run never
    visits (a progress bar counts the examples, `desc` names them). The same batch layout (the same padding) as the training step makes the reference bit-identical to
    the policy before the first update (log-ratios exactly 0 at step 1, DPO's loss exactly log 2), where a
    reference scored in other batches differs by bf16 rounding (TRL's `precompute_ref_log_probs` does). Epochs
    after the first see other batches: the reference of epoch 1's batch is reused.
    """
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    found = []
    steps = min(total_steps, sampler.steps_per_epoch)
    bar = progress(total=sum(len(sampler.global_batch(step)) for step in range(steps)), desc=f"{desc} (reference)",
                   unit="ex", disable=None if accelerator.is_main_process else True)
    try:
        with reference_off(unwrapped):
            for step in range(steps):
                for index in sampler.micro_batches(step, rank=rank, world_size=world, grad_accum=grad_accum):
                    batch = collate_fn(index).to(accelerator.device)
                    with precision.autocast():
                        values = logps_fn(unwrapped, batch)
                    found.append((np.asarray(index).tolist(), values.float().cpu()))
                    bar.update(len(index) * world)
    finally:
        bar.close()
        unwrapped.train(was_training)
    if world > 1:
        found = gather_object(found)
    result = torch.full(shape, float("nan"))
    for index, values in found:
        result[index] = values
    return result


def visited(sampler, total_steps: int) -> np.ndarray:
    """The examples a run of `total_steps` steps will see (its batches are a function of the seed and the step)."""
    if total_steps >= sampler.steps_per_epoch:
        return np.arange(len(sampler.lengths))
    return np.unique(np.concatenate([sampler.global_batch(step) for step in range(total_steps)]))


def fingerprint(sequences: list[TokenSequence], *extra) -> str:
    """A hash of token ids and labels (and `extra`): cached reference log-probs belong to exactly these."""
    digest = hashlib.sha256(repr(extra).encode())
    for s in sequences:
        digest.update(np.asarray(s.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(s.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


_SHARED_REFERENCES: list[Path] = []


@contextlib.contextmanager
def share_reference_logps(folder: str | Path):
    """Inside the block, runs also look for (and leave) their reference log-probs in `folder`, keyed by their
    fingerprint: the trials of a settings search differ in beta and the learning rate, not in the reference,
    so only the first trial computes it. Each run still keeps its own copy (its resume reads it there)."""
    _SHARED_REFERENCES.append(Path(folder))
    try:
        yield
    finally:
        _SHARED_REFERENCES.remove(Path(folder))


def _saved_values(path: Path, key: str):
    if not path.exists():
        return None
    saved = load_plain(path)  # tensors and numbers only: nothing in a run folder is unpickled
    return saved["values"] if saved.get("key") == key else None


def _save_values(path: Path, key: str, values) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"key": key, "values": values}, tmp)
    tmp.replace(path)


def cached_reference(path: Path, key: str, compute, accelerator) -> dict:
    """Reference log-probs from `path` when they were written for the same `key` (see `fingerprint`), else
    from a folder shared by `share_reference_logps` (copied into `path`), else `compute()` them (all processes
    together) and write them there (main process).

    They are computed once per run, before the first step: a resumed run reads them back (a fully fine-tuned
    model has moved away from its reference by then, so this is also what makes its resume exact).
    """
    from accelerate.utils import broadcast_object_list

    accelerator.wait_for_everyone()
    shared = _SHARED_REFERENCES[-1] / f"reference-{key[:24]}.pt" if _SHARED_REFERENCES else None
    found = [None]
    if accelerator.is_main_process:
        values = _saved_values(path, key)
        if values is None and shared is not None:
            values = _saved_values(shared, key)
            if values is not None:
                _save_values(path, key, values)  # the run keeps its own copy: its resume reads it there
        found = [values]
    if accelerator.num_processes > 1:
        broadcast_object_list(found)
    if found[0] is not None:
        return found[0]
    values = compute()
    if accelerator.is_main_process:
        _save_values(path, key, values)
        if shared is not None:
            _save_values(shared, key, values)
    accelerator.wait_for_everyone()
    return values


# ------------------------------------------------------------------------------------------------ state


# ------------------------------------------------------------------------------------------------ artifact


def finish_artifact(*, task, method: str, kind: str, config: AlignConfig, program, run, accelerator, model,
                    state: LoopState, selected: int, monitor, precision: Precision, trainable_params: int,
                    total_params: int, extra_metrics: dict, save, extra_cost: dict | None = None) -> Artifact:
    """Build the manifest (`selected`: the step whose weights the model holds) and write the artifact with `save`.
    `extra_cost`: the work besides the training steps (`reference_seconds`), in the manifest's cost.

    `save(artifact, path)` writes the method's files (adapter, full weights, a reward head) on the main process.
    """
    final = accelerator.unwrap_model(model)
    summary = monitor.summary()
    metrics = {"best_step": state.best_step, "final_step": state.step, "selected_step": selected, **extra_metrics}
    cost = {"trainable_params": trainable_params, "total_params": total_params, "processes": accelerator.num_processes,
            "precision": precision.name, "device": accelerator.device.type, **summary, **(extra_cost or {})}
    artifact = Artifact.create(name=f"{task.name}-{method}", method=method, kind=kind, base_model=task.config.model,
                               program=program, task=task, config={"method": method, **config.model_dump(mode="json")},
                               metrics=metrics, cost=cost, run_dir=str(run.path))
    if accelerator.is_main_process:
        save(artifact, run.path / "artifact")
        note_paths(final, run)  # which paths the model took, and the kernels' status at the end (honellm.core.support)
        run.log_metrics(event="done", **metrics, **summary)
        run.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return artifact
