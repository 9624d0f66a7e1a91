"""Log-probabilities of target tokens, computing the vocabulary projection only where a loss needs it.

A causal LM computes `logits = lm_head(hidden)` at every position: for SmolLM2 that is 49,152 logits per token,
a fifth of the model's FLOPs and, in fp32 with its softmax and gradient, ~600 KB of memory per token. A loss on
the answer tokens needs them only at the positions that predict an answer token. We compute exactly those: a
pre-forward hook on the model's output embedding (the LM head) keeps the hidden states of the selected
(batch, sequence) positions only, so the head returns logits of shape (n_selected, vocab). The base model still
runs over every real token (attention needs them); the head runs on a few. (transformers' own boolean
`logits_to_keep` does the same in recent versions; the hook works with every version and architecture.)

The same function serves every recipe: SFT sums the negative log-probabilities (`sft_loss`); DPO and its family
sum them per sequence (`sequence_logprobs`); GRPO/PPO use them per token with their row and position
(`TokenLogprobs`).

PEFT prompt-learning methods (prompt tuning, p-tuning) prepend virtual tokens to the input, so the mask gets as
many leading False columns; prefix tuning prepends key/values only, and the sequence keeps its length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from honellm.core import fastpath, liger, varlen
from honellm.training.batching import IGNORE, Batch, needed_width, predicting_index, predicting_positions  # noqa: F401 - re-exported


@dataclass
class TokenLogprobs:
    """Log-probabilities of the target tokens, flattened in (row, position) order.

    values[i] = log p(labels[rows[i], positions[i] + 1] | tokens up to positions[i]).
    """

    values: torch.Tensor  # [n] float32
    rows: torch.Tensor  # [n] long: which sequence of the batch (of a packed batch: which of its sequences)
    positions: torch.Tensor  # [n] long: the position whose hidden state predicts the token (in its row)
    batch_size: int  # how many sequences
    entropy: torch.Tensor | None = None  # [n] float32, when asked for

    def per_sequence(self) -> torch.Tensor:
        """Sum of log-probabilities per sequence, shape [batch_size]."""
        return torch.zeros(self.batch_size, dtype=self.values.dtype, device=self.values.device).index_add_(
            0, self.rows, self.values)

    def counts(self) -> torch.Tensor:
        """Target tokens per sequence, shape [batch_size]."""
        ones = torch.ones_like(self.values)
        return torch.zeros(self.batch_size, dtype=ones.dtype, device=ones.device).index_add_(0, self.rows, ones)


@dataclass
class LossOutput:
    """What a recipe's loss function returns for one micro-batch.

    `total` is a SUM over the micro-batch's loss units (tokens for SFT, pairs for DPO) and `count` their number;
    the shared training step divides by the global count of the whole optimizer step, so any split into
    micro-batches and processes gives the same gradient. `metrics` are sums too (averaged the same way): floats,
    or 0-d tensors that the step reads in one transfer with the loss (no wait for the device per micro-batch).
    """

    total: torch.Tensor
    count: int
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


def metric_sums(metrics: dict, n: float, names: dict | None = None) -> dict[str, float | torch.Tensor]:
    """A micro-batch's metric means as the sums `LossOutput.metrics` holds (each times `n`, renamed by `names`),
    kept where they are: a 0-d tensor stays on the device for the step's one transfer (`float()` here would make
    the host wait for the device once per metric and micro-batch), a number stays a number."""
    names = names or {}
    return {names.get(k, k): v.detach() * n if isinstance(v, torch.Tensor) else float(v) * n
            for k, v in metrics.items()}


def virtual_tokens(model) -> int:
    """How many virtual tokens a PEFT prompt-learning model prepends to the input sequence (0 otherwise)."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    from peft import PeftType

    if config.peft_type == PeftType.PREFIX_TUNING:  # key/values only: the sequence keeps its length
        return 0
    return int(config.num_virtual_tokens)


def token_logprobs(model, batch: Batch, *, with_entropy: bool = False) -> TokenLogprobs:
    """Log-probabilities of `batch.labels` under `model`, with the LM head applied at target positions only."""
    width = batch.labels.shape[1]
    index = getattr(batch, "predicting_index", None)
    if index is None:
        index = predicting_index(batch.labels)
    rows, positions = index // width, index % width
    targets = batch.labels.flatten().index_select(0, index + 1)
    # No position after the last one that predicts a target is read by anything (attention is causal): the forward
    # runs on the columns up to it (an answer's final end-of-turn token is a target, never an input that matters).
    needed = _needed_width(batch, index)
    input_ids, attention_mask = batch.input_ids[:, :needed], batch.attention_mask[:, :needed]
    index = rows * needed + positions if needed != width else index
    position_ids = batch.position_ids[:, :needed] if getattr(batch, "position_ids", None) is not None else None
    owners, count = _owners(batch, rows, positions)
    head = _unwrap(model).get_output_embeddings()
    # Liger's fused linear cross-entropy where `honellm.core.liger` was applied (CUDA): no logits at all.
    fused_loss = not with_entropy and liger.active(model)
    hidden = fastpath.hidden_states(model, input_ids, attention_mask, index, position_ids=position_ids)
    if hidden is not None and not fused_loss and hidden.shape[0] > LOGIT_CHUNK:  # many targets: the head in chunks
        return _chunked_logprobs(head, hidden, targets, owners, positions, count, with_entropy)
    if hidden is not None:  # the direct LLaMA-family forward (honellm.core.fastpath), at `index` only
        logits = None if fused_loss else head(hidden)
    else:
        offset = virtual_tokens(_unwrap(model))
        # Row-major positions in the model's sequence (prompt-learning methods prepend `offset` virtual tokens).
        model_index = rows * (needed + offset) + positions + offset if offset else index
        kept: list[torch.Tensor] = []
        chunked = not fused_loss and index.numel() > LOGIT_CHUNK and _plain_head(_unwrap(model))

        def select(module, args):
            selected = args[0].flatten(0, 1).index_select(0, model_index)
            if fused_loss or chunked:  # keep the states; the head runs on none of them here (fused loss, or chunks)
                kept.append(selected)
                selected = selected[:0]
            return (selected, *args[1:])

        handle = head.register_forward_pre_hook(select)
        try:
            if position_ids is None:
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            else:
                with varlen.packed_forward():
                    logits = model(input_ids=input_ids, use_cache=False,
                                   **packed_inputs(model, batch, position_ids)).logits
        finally:
            handle.remove()
        if chunked:
            return _chunked_logprobs(head, kept[0], targets, owners, positions, count, with_entropy)
        hidden = kept[0] if fused_loss else None
    if fused_loss:
        values = liger.token_logprobs(head, hidden, targets)
        return TokenLogprobs(values, owners, positions, count)
    values, entropy = _target_logprobs(logits, targets, with_entropy)
    return TokenLogprobs(values, owners, positions, count, entropy)


def _owners(batch: Batch, rows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the sequence each target belongs to [n], how many sequences): the batch's rows, or in a packed row the
    sequence its cumulative lengths place the position in (a target's predicting position is never a sequence's
    last, so it and the token it predicts lie in the same one)."""
    cu = getattr(batch, "cu_seqlens", None)
    if getattr(batch, "position_ids", None) is None or cu is None:
        return rows, batch.input_ids.shape[0]
    return torch.searchsorted(cu[1:].to(positions.dtype), positions, right=True), cu.numel() - 1


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
    """(log-probabilities of `targets` [n], their distributions' entropies [n] or None) from logits [n, vocab],
    the log-softmax in fp32 as autocast would; computed once when the entropy is asked for too."""
    logits = logits.float()
    if not with_entropy:
        return -F.cross_entropy(logits, targets, reduction="none"), None
    logp = logits.log_softmax(-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


# Targets whose full-vocabulary logits exist at once. Above this many targets in a batch (DPO's long answers), the
# head and the log-softmax run chunk by chunk, and under autograd each chunk is recomputed in backward instead of
# keeping its fp32 log-softmax: 512 x 49,152 logits are ~100 MB in fp32 where a DPO micro-batch of 8 pairs with
# 320-token answers kept 2.5 GB. Each row's log-probability is computed by the same operations either way.
LOGIT_CHUNK = 512
# Config fields of models whose forward transforms the head's output (soft-capping, scaling): their logits come
# from the model itself, never from the head applied here.
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logits_scaling", "logit_scale", "output_multiplier")


def _plain_head(model) -> bool:
    """True when `model`'s logits are its output embedding's output as is (nothing applied after the head)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    config = getattr(config, "text_config", None) or config
    return config is not None and not any(getattr(config, name, None) not in (None, 1, 1.0)
                                          for name in _HEAD_TRANSFORMS)


def _head_chunk(head, hidden: torch.Tensor, targets: torch.Tensor, with_entropy: bool) -> torch.Tensor:
    values, entropy = _target_logprobs(head(hidden), targets, with_entropy)
    return values if entropy is None else torch.stack([values, entropy])


def _chunked_logprobs(head, hidden, targets, rows, positions, batch_size: int, with_entropy: bool) -> TokenLogprobs:
    """`TokenLogprobs` from the final hidden states at the target positions, the head run `LOGIT_CHUNK` rows at a
    time (each chunk recomputed in backward rather than its logits kept)."""
    from torch.utils.checkpoint import checkpoint

    found = []
    for h, t in zip(hidden.split(LOGIT_CHUNK), targets.split(LOGIT_CHUNK), strict=True):
        if torch.is_grad_enabled() and h.requires_grad:
            found.append(checkpoint(_head_chunk, head, h, t, with_entropy, use_reentrant=False))
        else:
            found.append(_head_chunk(head, h, t, with_entropy))
    out = torch.cat(found, dim=-1)
    if with_entropy:
        return TokenLogprobs(out[0], rows, positions, batch_size, out[1])
    return TokenLogprobs(out, rows, positions, batch_size)


def packed_inputs(model, batch: Batch, position_ids: torch.Tensor) -> dict:
    """transformers' inputs for a packed batch: the position ids and no attention mask, from which transformers
    builds a block-diagonal causal mask (eager, sdpa, flex: `masking_utils.find_packed_sequence_indices`) or, under
    flash-attention 2/3, the varlen kernel's cumulative lengths. Those are passed directly where a varlen kernel
    runs (transformers would otherwise derive them from the position ids, waiting for the device; PyTorch's own
    kernel, `honellm.core.varlen`, takes them from here only)."""
    if virtual_tokens(_unwrap(model)):
        raise ValueError("a packed batch cannot run under a prompt-learning adapter (its virtual tokens go in front "
                         "of the row, not of each sequence); the SFT recipe does not pack for such methods")
    inputs = {"position_ids": position_ids}
    config = getattr(_unwrap(model), "config", None)
    cu = getattr(batch, "cu_seqlens", None)
    implementation = str(getattr(config, "_attn_implementation", ""))
    if cu is not None and batch.max_seqlen and ("flash" in implementation or implementation == varlen.NAME):
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch.max_seqlen,
                      max_length_k=batch.max_seqlen)
    return inputs


def _needed_width(batch: Batch, index: torch.Tensor) -> int:
    """Columns the forward needs: up to the last position that predicts a target (read on the CPU where the batch
    was built; on a GPU without that figure, all of them rather than wait for the device)."""
    needed = getattr(batch, "needed_width", None)
    if needed is None and index.device.type == "cpu":
        needed = needed_width(index, batch.labels.shape[1])
    if needed is None or getattr(batch, "position_ids", None) is not None:
        return batch.labels.shape[1]  # packed: the row keeps every column (its cumulative lengths count them)
    return needed


def sequence_logprobs(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of target log-probabilities and the number of target tokens, shapes [B] and [B]."""
    found = token_logprobs(model, batch)
    return found.per_sequence(), found.counts()


def sft_loss(model, batch: Batch) -> LossOutput:
    """Summed negative log-likelihood of the target tokens (the step averages it over the global token count)."""
    found = token_logprobs(model, batch)
    nll = -found.values.sum()
    return LossOutput(nll, int(found.values.numel()), {"nll": nll.detach()})


def full_logits_nll(model, batch: Batch) -> torch.Tensor:
    """The textbook loss over the full logits (every position, whole vocabulary); a reference for tests only."""
    offset = virtual_tokens(_unwrap(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logits = logits[:, offset:].float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def _unwrap(model):
    """The model under a DDP/FSDP wrapper (the wrapper forwards calls but hides the PEFT config)."""
    return getattr(model, "module", model)
