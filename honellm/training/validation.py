"""Scoring during training: log-likelihoods of sequences and greedy answers, on the in-memory model.

These are the quick measurements a recipe takes every `eval_every` steps (validation loss, the label a
classification task's model finds most likely, greedy answers for a text metric). The final, reported
scores come from `honellm.evaluation`.
"""

from __future__ import annotations

import numpy as np
import torch

from honellm.training.batching import TokenSequence, collate
from honellm.training.logprobs import sequence_logprobs
from honellm.training.precision import Precision


@torch.no_grad()
def score_sequences(model, sequences: list[TokenSequence], *, pad_id: int, precision: Precision,
                    batch_size: int = 16, device: torch.device | str = "cpu",
                    on_batch=None) -> tuple[np.ndarray, np.ndarray]:
    """Sum of label log-probabilities and label count of each sequence (in the given order); `on_batch(n)` is
    called after each batch of n sequences (a progress bar's `update`)."""
    was_training = model.training
    model.eval()
    sums = np.zeros(len(sequences))
    counts = np.zeros(len(sequences), dtype=np.int64)
    order = np.argsort([-len(s) for s in sequences], kind="stable")  # similar lengths together: little padding
    try:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = collate([sequences[i] for i in index], pad_id).to(device)
            with precision.autocast():
                logp, n = sequence_logprobs(model, batch)
            sums[index] = logp.double().cpu().numpy()
            counts[index] = n.long().cpu().numpy()
            if on_batch is not None:
                on_batch(len(index))
    finally:
        model.train(was_training)
    return sums, counts


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int, precision: Precision,
                   batch_size: int = 16, device: torch.device | str = "cpu") -> list[str]:
    """Greedy completions of prompt texts (left-padded batches, the model's own `generate`)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = [""] * len(prompts)
    order = np.argsort([-len(p) for p in prompts], kind="stable")
    try:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in index], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            with precision.autocast():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            for row, i in enumerate(index):
                answers[i] = tokenizer.decode(out[row, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers
