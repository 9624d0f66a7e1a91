"""Memory pre-flight: estimate the peak memory of a training run before it starts, and refuse a run that will not
fit with a message that says what to change.

peak = weights + gradients + optimizer state + activations + logits + runtime overhead, where

- weights: every parameter at its stored size (frozen bf16, trainable fp32 under the bf16 policy);
- gradients: 4 bytes per trainable parameter (another 4 for DDP's communication buckets);
- optimizer: AdamW's two moments, 8 bytes per trainable parameter;
- activations: what backward keeps, per token per layer about `ACT_HIDDEN` x hidden + `ACT_FFN` x intermediate
  values at the compute dtype's width, plus, for eager attention, the attention scores and probabilities
  (`ATTN_BYTES` per head per pair of positions; flash/sdpa kernels keep none); with gradient checkpointing, one
  hidden state per token per layer plus one layer's worth;
- logits: at the loss positions only (see `logprobs.py`): logits, log-softmax and gradient in fp32, for at most
  `LOGIT_CHUNK` positions at once;
- overhead: the framework itself (CUDA context or the CPU runtime's libraries).

The constants were fitted on SmolLM2-135M on a 2-core AMX CPU (peak RSS of LoRA at 8 x 64 and 8 x 256 tokens with
eager attention, 16 x 256 and 4 x 1024 with sdpa, and full fine-tuning at 8 x 128: the estimate came out 4-23%
above the measured peaks), and the direct forward's on random-weight models in real shapes (bench/bench_sizes.py,
bench/README.md): it is meant to err on the side of refusing a little early.

`fit_memory` is the pre-flight the recipes call: it estimates from the micro-batches the data gives after length
grouping, and when the run's own settings do not fit it picks a smaller micro-batch (more accumulation, the same
global batch) or gradient checkpointing, and refuses only when nothing fits.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from honellm.errors import HoneError
from honellm.training.setup import enable_checkpointing

GiB = 2**30
# Values per token per layer proportional to the hidden size (norms in fp32 count double), through transformers'
# forward with sdpa: 24 fitted a DPO micro-batch of 8 x 320 tokens; a DPO run on HH-RLHF at 16 x 320 (8 pairs, no
# padding in most micro-batches) peaked at 8.22 GiB against 6.82 estimated, and one forward and backward of
# SmolLM2-135M with LoRA at 16 x 320 kept 48.5 KB per token per layer without a padding mask (33 KB with one):
# 32 covers the unpadded case.
ACT_HIDDEN = 32
ACT_FFN = 4  # values per token per layer proportional to the MLP's intermediate size
# The same through Hone's direct LLaMA-family forward (`fastpath`: eager attention, fused LoRA), which keeps less;
# fitted on the SmolLM2-135M and Qwen2.5-0.5B shapes (bench/bench_sizes.py: 19.5 and 43.8 KB per token per layer
# besides the attention scores, against 35 KB through transformers' forward with sdpa on SmolLM2-135M).
ACT_HIDDEN_FAST = 10
ACT_FFN_FAST = 2.75
ATTN_BYTES = 8  # eager attention: bf16 scores + fp32 softmax + bf16 probabilities per head and position pair
CPU_OVERHEAD = int(0.5 * GiB)  # torch, transformers, tokenizers and allocator slack in a CPU process (0.35-0.4 measured)
GPU_OVERHEAD = int(0.6 * GiB)  # CUDA context, kernels and allocator fragmentation


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder the estimate needs."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    kv_heads: int | None = None  # grouped-query attention (None: as many as `heads`)
    head_dim: int | None = None  # None: hidden // heads
    tied: bool = True  # the LM head shares the input embedding
    model_type: str = ""

    @classmethod
    def of(cls, config) -> ModelShape:
        """The shape of a transformers config object, or of a config.json read as a dict."""
        if isinstance(config, dict):
            from types import SimpleNamespace

            config = SimpleNamespace(**config)
        config = getattr(config, "text_config", None) or config

        def first(*names, default=None):
            for name in names:
                value = getattr(config, name, None)
                if value:
                    return int(value)
            return default

        hidden = first("hidden_size", "n_embd", "d_model", default=1024)
        heads = first("num_attention_heads", "n_head", default=max(1, hidden // 64))
        return cls(layers=first("num_hidden_layers", "n_layer", "num_layers", default=24), hidden=hidden,
                   intermediate=first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
                   heads=heads, vocab=first("vocab_size", default=32000),
                   kv_heads=first("num_key_value_heads", default=heads), head_dim=first("head_dim", default=None),
                   tied=bool(getattr(config, "tie_word_embeddings", True)),
                   model_type=str(getattr(config, "model_type", "") or ""))

    @property
    def attention_dims(self) -> tuple[int, int]:
        """(query / output width, key / value width)."""
        head_dim = self.head_dim or self.hidden // self.heads
        return self.heads * head_dim, (self.kv_heads or self.heads) * head_dim

    def parameters(self) -> int:
        """Parameters of a LLaMA-shaped decoder of this shape (norms and biases left out: under 0.1%)."""
        q, kv = self.attention_dims
        per_layer = self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied else 2)

    def lora_parameters(self, r: int = 16) -> int:
        """Trainable parameters of LoRA of rank `r` on every linear layer of attention and MLP."""
        q, kv = self.attention_dims
        h, f = self.hidden, self.intermediate
        return self.layers * r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + f) + (f + h))


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of a training run, by part, in bytes."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    evaluation: int = 0  # validation during training: the engine's packed weights and full-vocabulary logits

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead
                + self.evaluation)

    def describe(self) -> str:
        parts = ("weights", "gradients", "optimizer", "activations", "logits", "overhead", "evaluation")
        inner = ", ".join(f"{p} {getattr(self, p) / GiB:.2f}" for p in parts)
        return f"{self.total / GiB:.2f} GiB ({inner})"


def parameter_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(bytes of all parameters as stored, number of trainable parameters, number of all parameters)."""
    stored = trainable = count = 0
    for p in model.parameters():  # each shared (tied) parameter once
        stored += p.numel() * p.element_size()
        count += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return stored, trainable, count


def estimate_training_memory(model: torch.nn.Module, *, micro_batch_size: int, seq_len: int,
                             loss_tokens: int | None = None, gradient_checkpointing: bool = False,
                             compute_dtype: torch.dtype = torch.bfloat16, distributed: bool = False,
                             device_type: str = "cpu", optimizer_states: int = 2,
                             attention: str = "sdpa", evaluation_batch: int = 0) -> MemoryEstimate:
    """Estimate the peak memory of training `model` on micro-batches of `micro_batch_size` x `seq_len` tokens.

    `loss_tokens` is the number of positions per micro-batch where logits are computed (all of them when None).
    `evaluation_batch`: sequences per forward pass of the validation runs during training (0: none); they add
    the generation engine's derived weights (a packed copy, plus row-major copies of the concatenated and the
    merged LoRA matrices: up to two copies in all) and fp32 logits over the vocabulary for that batch.
    """
    shape = ModelShape.of(getattr(model, "config", None) or object())
    stored, trainable, _ = parameter_bytes(model)
    return estimate_for_shape(shape, stored_bytes=stored, trainable=trainable, micro_batch_size=micro_batch_size,
                              seq_len=seq_len, loss_tokens=loss_tokens, gradient_checkpointing=gradient_checkpointing,
                              compute_dtype=compute_dtype, distributed=distributed, device_type=device_type,
                              optimizer_states=optimizer_states, attention=attention,
                              evaluation_batch=evaluation_batch)


def estimate_for_shape(shape: ModelShape, *, stored_bytes: int, trainable: int, micro_batch_size: int, seq_len: int,
                       loss_tokens: int | None = None, gradient_checkpointing: bool = False,
                       compute_dtype: torch.dtype = torch.bfloat16, distributed: bool = False,
                       device_type: str = "cpu", optimizer_states: int = 2, attention: str = "sdpa",
                       evaluation_batch: int = 0) -> MemoryEstimate:
    """`estimate_training_memory` from a model's shape and parameter sizes alone (no model in memory: `hone
    advise`, and shapes too large to build)."""
    stored = stored_bytes
    width = torch.finfo(compute_dtype).bits // 8
    tokens = micro_batch_size * seq_len
    fast = attention == "eager" and shape.model_type in _fast_types()
    per_token_layer = int(width * ((ACT_HIDDEN_FAST if fast else ACT_HIDDEN) * shape.hidden
                                   + (ACT_FFN_FAST if fast else ACT_FFN) * shape.intermediate))
    scores = ATTN_BYTES * micro_batch_size * shape.heads * seq_len * seq_len if attention == "eager" else 0
    if gradient_checkpointing:
        activations = tokens * shape.layers * shape.hidden * width + tokens * per_token_layer + scores
    else:
        activations = (tokens * per_token_layer + scores) * shape.layers
    if trainable == 0:
        activations = 0
    from honellm.training.logprobs import LOGIT_CHUNK

    n_logits = tokens if loss_tokens is None else loss_tokens
    # above LOGIT_CHUNK targets the head runs chunk by chunk, recomputed in backward (see `logprobs`)
    logits = min(n_logits, LOGIT_CHUNK) * shape.vocab * 4 * 3
    gradients = trainable * 4 * (2 if distributed else 1)
    evaluation = 2 * stored + evaluation_batch * seq_len * shape.vocab * 4 * 2 if evaluation_batch else 0
    return MemoryEstimate(
        weights=stored, gradients=gradients, optimizer=trainable * 4 * optimizer_states, activations=activations,
        logits=logits, overhead=GPU_OVERHEAD if device_type == "cuda" else CPU_OVERHEAD,
        micro_batch_size=micro_batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
        evaluation=evaluation)


def _fast_types() -> tuple[str, ...]:
    """Model types Hone's direct training forward covers (with eager attention; honellm.core.support decides)."""
    from honellm.core.support import TRAINING_TYPES

    return TRAINING_TYPES


def available_memory(device: torch.device | str) -> tuple[int, str]:
    """Bytes this process may use on `device` (what it holds now plus what is free), and a description."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_reserved(device)
        name = torch.cuda.get_device_name(device)
        return free + held, f"GPU memory on {name} ({total / GiB:.1f} GiB in all)"
    import psutil

    free = psutil.virtual_memory().available
    limit = _cgroup_limit()
    held = psutil.Process().memory_info().rss
    if limit is not None:
        used = _cgroup_usage()
        if used is not None:
            free = min(free, max(0, limit - used))
    return free + held, "RAM available to this process"


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def _cgroup_usage() -> int | None:
    for path in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        try:
            return int(Path(path).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


# ------------------------------------------------------------------------------------------------ fitting


@dataclass(frozen=True)
class MicroBatchShape:
    """One micro-batch a run will train on: sequences, padded length, and positions that take a loss."""

    sequences: int
    length: int
    loss_tokens: int


def micro_batch_shapes(sampler, *, loss_tokens, grad_accum: int, world: int = 1,
                       sequences_per_example: int = 1, max_length: int | None = None) -> list[MicroBatchShape]:
    """The shapes of the micro-batches `sampler` (a `LengthGroupedBatches`) gives in its first epoch with
    `grad_accum` micro-batches per process, the ones no other dominates (the largest padded length, the most
    sequences x length, the most loss tokens): the pre-flight estimates from these, the lengths the data actually
    has after length grouping, not from max_length. `loss_tokens[i]` is example i's loss positions (for a pair, the
    longer answer's; counted for each of its `sequences_per_example` sequences)."""
    lengths = np.asarray(sampler.lengths)
    losses = np.asarray(loss_tokens, dtype=np.int64)
    found: dict[tuple[int, int, int], MicroBatchShape] = {}
    for step in range(sampler.steps_per_epoch):
        for rank in range(world):
            for index in sampler.micro_batches(step, rank=rank, world_size=world, grad_accum=grad_accum):
                if not len(index):
                    continue
                length = int(lengths[index].max())
                if max_length is not None:
                    length = min(length, max_length)
                n = len(index) * sequences_per_example
                shape = MicroBatchShape(n, length, int(losses[index].sum()) * sequences_per_example)
                found[(shape.sequences, shape.length, shape.loss_tokens)] = shape
    shapes = list(found.values())
    keys = (lambda s: s.length, lambda s: s.sequences * s.length, lambda s: s.sequences * s.length ** 2,
            lambda s: s.loss_tokens)
    return list({id(s): s for s in (max(shapes, key=key) for key in keys)}.values()) if shapes else []


@dataclass(frozen=True)
class MemoryPlan:
    """What the pre-flight decided: the micro-batch, accumulation and checkpointing the run trains with."""

    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    estimate: MemoryEstimate
    capacity: int
    first_choice: MemoryEstimate
    note: str | None = None  # one line, when the run's own settings would not fit and others were chosen

    @property
    def changed(self) -> bool:
        return self.note is not None

    def apply(self, config, model=None, run=None):
        """`config` with the chosen settings (the same object when nothing changed), gradient checkpointing turned
        on in `model` when it was chosen, and the note said on stderr and written to `run`'s metrics.jsonl."""
        if not self.changed:
            return config
        if os.environ.get("HONE_QUIET") != "1" and run is not None:
            print(f"hone: {self.note}", file=sys.stderr, flush=True)
        if run is not None:
            run.log_metrics(event="memory_fit", message=self.note, batch_size=self.batch_size,
                            grad_accum=self.grad_accum, gradient_checkpointing=self.gradient_checkpointing,
                            estimated_peak_memory_bytes=self.estimate.total)
        if self.gradient_checkpointing and not config.gradient_checkpointing and model is not None:
            enable_checkpointing(model)
        return config.model_copy(update={"batch_size": self.batch_size, "grad_accum": self.grad_accum,
                                         "gradient_checkpointing": self.gradient_checkpointing})


def fit_memory(model, sampler, *, loss_tokens, batch_size: int, grad_accum: int, gradient_checkpointing: bool,
               device: torch.device | str, world: int = 1, sequences_per_example: int = 1,
               max_length: int | None = None, limit_gb: float | None = None, trains_all_weights: bool = False,
               capacity: int | None = None, packed: bool = False, **estimate_kwargs) -> MemoryPlan:
    """Estimate the run's peak from the micro-batches the data gives (`micro_batch_shapes`); when it exceeds the
    memory at hand, pick the largest micro-batch that fits with more accumulation (the global batch, hence the
    results, stay the same), then gradient checkpointing; raise a HoneError naming what to change when nothing
    fits. `estimate_kwargs` go to `estimate_training_memory` (compute_dtype, attention, evaluation_batch, ...).

    A smaller micro-batch is tried only where the sampler's batches stay the same (it drops a global batch too
    small to fill every micro-batch: more accumulation must not drop one more). `packed`: each micro-batch runs as
    one row of its sequences end to end, estimated at its padded size (an upper bound on its tokens; an attention
    kernel without varlen support computes over the whole row).
    """
    from honellm.training.batching import LengthGroupedBatches

    def peak(b: int, accum: int, checkpointing: bool) -> MemoryEstimate:
        shapes = micro_batch_shapes(sampler, loss_tokens=loss_tokens, grad_accum=accum, world=world,
                                    sequences_per_example=sequences_per_example, max_length=max_length)
        estimates = [estimate_training_memory(model, micro_batch_size=1 if packed else s.sequences,
                                              seq_len=s.sequences * s.length if packed else s.length,
                                              loss_tokens=s.loss_tokens, gradient_checkpointing=checkpointing,
                                              distributed=world > 1, device_type=torch.device(device).type,
                                              **estimate_kwargs) for s in shapes]
        return max(estimates, key=lambda e: e.total)

    first = peak(batch_size, grad_accum, gradient_checkpointing)
    plan = MemoryPlan(batch_size, grad_accum, gradient_checkpointing, first, 0, first)
    if os.environ.get("HONE_SKIP_MEMORY_CHECK") == "1":
        return plan
    if capacity is not None:
        what = "the memory given"
    elif limit_gb is not None:
        capacity, what = int(limit_gb * GiB), f"the memory limit (memory_limit_gb={limit_gb:g})"
    else:
        capacity, what = available_memory(device)
    plan = MemoryPlan(batch_size, grad_accum, gradient_checkpointing, first, capacity, first)
    if first.total <= capacity:
        return plan
    global_batch = sampler.global_batch_size

    def same_batches(accum: int) -> bool:
        if world * accum == sampler.slots:
            return True
        if global_batch < world * accum:
            return False
        other = LengthGroupedBatches(sampler.lengths, global_batch, seed=sampler.seed, shuffle=sampler.shuffle,
                                     window=sampler.window, slots=world * accum)
        return other.steps_per_epoch == sampler.steps_per_epoch

    found = _first_that_fits(peak, capacity, batch_size=batch_size, grad_accum=grad_accum,
                             gradient_checkpointing=gradient_checkpointing, allowed=same_batches)
    if found is not None:
        b, accum, checkpointing, estimate = found
        settings = f"batch_size={b} grad_accum={accum}" + (" gradient_checkpointing=true" if checkpointing
                                                            and not gradient_checkpointing else "")
        note = (f"memory: batch_size={batch_size} grad_accum={grad_accum} would need about "
                f"{first.total / GiB:.2f} GiB of {capacity / GiB:.2f} GiB; training with {settings} "
                f"(the same global batch), about {estimate.total / GiB:.2f} GiB")
        return MemoryPlan(b, accum, checkpointing, estimate, capacity, first, note)
    fixes = []
    if max_length is not None or first.seq_len > 64:
        fixes.append(f"a shorter max_length (the longest micro-batch has {first.seq_len} tokens; longer examples "
                     "lose the start of their prompt)")
    if trains_all_weights:
        fixes.append("a parameter-efficient method (--method lora) instead of full fine-tuning")
    fixes.append("a smaller base model, or a machine with more memory")
    raise HoneError(
        f"this run needs about {first.total / GiB:.2f} GiB at its peak ({first.describe()}), more than {what}: "
        f"{capacity / GiB:.2f} GiB, and even micro-batches of one example with gradient checkpointing need "
        f"{peak(1, grad_accum * batch_size, True).total / GiB:.2f} GiB",
        where="memory pre-flight",
        fix="try " + "; or ".join(fixes) + " (set HONE_SKIP_MEMORY_CHECK=1 to train anyway)")


def _first_that_fits(peak: Callable[[int, int, bool], MemoryEstimate], capacity: int, *, batch_size: int,
                     grad_accum: int, gradient_checkpointing: bool, accumulate: bool = True,
                     allowed: Callable[[int], bool] = lambda accum: True):
    """The fitting search both pre-flights share: smaller micro-batches (divisors of `batch_size`, largest first)
    with more accumulation (when `accumulate`, and where `allowed(accum)`), then the same with gradient
    checkpointing; the first whose `peak(micro_batch, accum, checkpointing)` fits `capacity`, as
    (micro_batch, accum, checkpointing, estimate), or None."""
    smaller = [b for b in range(batch_size, 0, -1) if batch_size % b == 0]
    for checkpointing in ([False, True] if not gradient_checkpointing else [True]):
        for b in smaller:
            if (b, checkpointing) == (batch_size, gradient_checkpointing):
                continue
            accum = grad_accum * batch_size // b if accumulate else grad_accum
            if not allowed(accum):
                continue
            estimate = peak(b, accum, checkpointing)
            if estimate.total <= capacity:
                return b, accum, checkpointing, estimate
    return None


def fit_micro_batch(estimate_for: Callable[[int, int, bool], MemoryEstimate], *, batch_size: int, seq_len: int,
                    grad_accum: int, gradient_checkpointing: bool, device: torch.device | str,
                    limit_gb: float | None = None, trains_all_weights: bool = False,
                    accumulate: bool = True) -> MemoryPlan:
    """`fit_memory` for recipes whose micro-batches are not known before training (online RL's completions, RFT's
    kept samples): the worst micro-batch is `batch_size` sequences of `seq_len` tokens. When it does not fit, the
    largest smaller micro-batch that does is chosen, then gradient checkpointing, and said in one line
    (`MemoryPlan.apply`); when nothing fits, `check_memory`'s error names what to change.

    `accumulate`: a smaller micro-batch takes more accumulation (`grad_accum` scaled: the same global batch, as
    `fit_memory`); without it (online RL, whose updates are split into as many micro-batches as they need),
    `grad_accum` stays as it is and each update keeps its completions.
    """
    first = estimate_for(batch_size, seq_len, gradient_checkpointing)
    if os.environ.get("HONE_SKIP_MEMORY_CHECK") == "1":
        return MemoryPlan(batch_size, grad_accum, gradient_checkpointing, first, 0, first)
    capacity = int(limit_gb * GiB) if limit_gb is not None else available_memory(device)[0]
    if first.total <= capacity:
        return MemoryPlan(batch_size, grad_accum, gradient_checkpointing, first, capacity, first)
    found = _first_that_fits(lambda b, accum, checkpointing: estimate_for(b, seq_len, checkpointing), capacity,
                             batch_size=batch_size, grad_accum=grad_accum,
                             gradient_checkpointing=gradient_checkpointing, accumulate=accumulate)
    if found is not None:
        b, accum, checkpointing, estimate = found
        settings = f"batch_size={b}" + (f" grad_accum={accum}" if accumulate else "") + (
            " gradient_checkpointing=true" if checkpointing and not gradient_checkpointing else "")
        same = "the same global batch" if accumulate else "the same updates, in more micro-batches"
        note = (f"memory: batch_size={batch_size} would need about {first.total / GiB:.2f} GiB of "
                f"{capacity / GiB:.2f} GiB; training with {settings} ({same}), about {estimate.total / GiB:.2f} GiB")
        return MemoryPlan(b, accum, checkpointing, estimate, capacity, first, note)
    check_memory(estimate_for, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum,
                 gradient_checkpointing=gradient_checkpointing, device=device, limit_gb=limit_gb,
                 trains_all_weights=trains_all_weights)  # raises: nothing fits
    raise AssertionError("unreachable: check_memory accepted what fit_micro_batch could not fit")


def check_memory(estimate_for: Callable[[int, int, bool], MemoryEstimate], *, batch_size: int, seq_len: int,
                 grad_accum: int, gradient_checkpointing: bool, device: torch.device | str,
                 limit_gb: float | None = None, trains_all_weights: bool = False) -> MemoryEstimate:
    """Estimate the run's peak; raise a HoneError naming what to change when it exceeds the memory at hand.

    `estimate_for(micro_batch_size, seq_len, gradient_checkpointing)` gives the estimate of a variant of the run,
    so that the message can propose settings that fit (smaller micro-batches with more accumulation keep the
    global batch, hence the results, the same).
    """
    estimate = estimate_for(batch_size, seq_len, gradient_checkpointing)
    if os.environ.get("HONE_SKIP_MEMORY_CHECK") == "1":
        return estimate
    if limit_gb is not None:
        capacity, what = int(limit_gb * GiB), f"the memory limit (memory_limit_gb={limit_gb:g})"
    else:
        capacity, what = available_memory(device)
    if estimate.total <= capacity:
        return estimate
    fixes = []
    for b in (batch_size // 2, batch_size // 4, batch_size // 8, 1):
        if 1 <= b < batch_size and estimate_for(b, seq_len, gradient_checkpointing).total <= capacity:
            fixes.append(f"batch_size={b} grad_accum={grad_accum * batch_size // b} (the same global batch)")
            break
    if not gradient_checkpointing and estimate_for(batch_size, seq_len, True).total <= capacity:
        fixes.append("gradient_checkpointing=true (about 30% slower)")
    for length in (seq_len // 2, seq_len // 4):
        if length >= 64 and estimate_for(batch_size, length, gradient_checkpointing).total <= capacity:
            fixes.append(f"max_length={length} (longer examples lose the start of their prompt)")
            break
    if trains_all_weights:
        fixes.append("a parameter-efficient method (--method lora) instead of full fine-tuning")
    fixes.append("a smaller base model, or a machine with more memory")
    raise HoneError(
        f"this run needs about {estimate.describe()} at its peak, more than {what}: {capacity / GiB:.2f} GiB "
        f"(micro-batches of {batch_size} x {seq_len} tokens)",
        where="memory pre-flight",
        fix="try " + "; or ".join(fixes) + " (set HONE_SKIP_MEMORY_CHECK=1 to train anyway)")
