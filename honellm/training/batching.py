"""From conversations to padded tensors, with as little compute as possible spent on padding.

- `encode_conversation` turns messages + answer into token ids and labels (-100 where no loss is taken:
  the prompt, by default), through the model's chat template (`honellm.data.chat`).
- `LengthGroupedBatches` orders examples so that each micro-batch holds examples of similar length (padding is a
  few percent instead of half), in an order that depends only on the seed and the epoch, so that a resumed run
  sees exactly the batches the uninterrupted run would have seen, and so that one process and N processes with
  the same global batch see the same examples in each step.
- `collate` pads a micro-batch on the right.

Preference recipes encode chosen and rejected answers with `encode_conversation` too, and batch them with
`LengthGroupedBatches` over pair lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from honellm.data.chat import has_chat_template, render_answer, render_prompt

IGNORE = -100  # label of a position that takes no loss (PyTorch's cross-entropy convention)


@dataclass
class TokenSequence:
    """One training sequence: token ids, and labels equal to the ids where a loss is taken, -100 elsewhere."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        # The first token is never predicted (nothing comes before it), so it never counts.
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def encode_conversation(tokenizer, messages: list[dict], answer: str, *, max_length: int,
                        completion_only: bool = True) -> TokenSequence:
    """Token ids of `messages` + `answer` as the chat template writes them; labels on the answer only by default.

    The prompt and the answer are tokenized separately (the answer's text starts right after the template's
    generation prompt, a clean token boundary), so the label mask is exact. Too long a sequence loses the
    start of its prompt first (the answer and the context nearest to it are kept), then the end of its answer.
    """
    prompt_text = render_prompt(tokenizer, messages)
    answer_text = render_answer(tokenizer, messages, answer)
    # A chat template writes its own special tokens; a plain layout gets the tokenizer's (e.g. a BOS token).
    special = not has_chat_template(tokenizer)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=special)["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    truncated = len(prompt_ids) + len(answer_ids) > max_length
    if truncated:
        answer_ids = answer_ids[: max_length - 1]
        keep = max_length - len(answer_ids)
        prompt_ids = prompt_ids[len(prompt_ids) - keep:]
    labels = ([IGNORE] * len(prompt_ids) if completion_only else list(prompt_ids)) + list(answer_ids)
    return TokenSequence(list(prompt_ids) + list(answer_ids), labels, truncated)


@dataclass
class Batch:
    """A right-padded micro-batch. `num_tokens` counts real tokens (what tokens/s reports), `num_loss_tokens` the
    predicted tokens the loss is taken on (what the loss is averaged over)."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    labels: torch.Tensor  # [B, T] long, -100 where no loss
    num_tokens: int
    num_loss_tokens: int
    # Flat indices (row * T + position) of the positions whose hidden state predicts a labelled token, computed
    # where the labels were built (on the CPU) and moved with them: on a GPU, finding them from device labels
    # would wait for the device (a synchronisation per micro-batch). None: `token_logprobs` finds them itself.
    predicting_index: torch.Tensor | None = None
    # 1 + the last of those positions (the columns a forward needs), found on the CPU with the index.
    needed_width: int | None = None

    def to(self, device: torch.device | str) -> Batch:
        index, needed = self.predicting_index, self.needed_width
        if index is None and self.labels.device.type == "cpu":
            index = predicting_index(self.labels)
        if needed is None and index is not None and index.device.type == "cpu":
            needed = needed_width(index, self.labels.shape[1])
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.num_tokens, self.num_loss_tokens, index.to(device) if index is not None else None, needed)

    @property
    def num_loss_units(self) -> int:
        return self.num_loss_tokens


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean [B, T]: True at position t when token t+1 takes a loss (the hidden state at t predicts it)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def predicting_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into [B, T] of `predicting_positions` (row-major order)."""
    return predicting_positions(labels).flatten().nonzero().squeeze(1)


def needed_width(index: torch.Tensor, width: int) -> int:
    """The columns a forward needs for flat `predicting_index` positions into [B, width]: up to the last of them
    (attention is causal, so no later column is read by anything)."""
    return int((index % width).max()) + 1 if index.numel() else 1


def collate(sequences: list[TokenSequence], pad_id: int) -> Batch:
    """Right-pad to the longest sequence of the micro-batch (length grouping keeps that close to all of them)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    for row, s in enumerate(sequences):
        n = len(s)
        ids[row, :n] = torch.tensor(s.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(s.labels)
    return Batch(ids, mask, labels, int(mask.sum()), sum(s.num_loss_tokens for s in sequences))


class LengthGroupedBatches:
    """Global batches of examples of similar length, in a seeded order that depends only on (seed, epoch).

    Each epoch: shuffle all examples, cut the shuffled list into windows of `window` global batches, sort each
    window by length, cut it into global batches, and shuffle the order of the batches. This keeps batches
    random from epoch to epoch while their members have similar lengths (the grouping of
    transformers' `LengthGroupedSampler`).

    A global batch is then split among `world_size` processes x `grad_accum` micro-batches: sorted by length and
    cut into that many contiguous chunks, chunk k going to process k % world_size as its micro-batch
    k // world_size. One process with grad_accum=2 and two processes with grad_accum=1 so compute the same
    micro-batches, hence the same gradient. A last global batch too small to give every micro-batch an
    example is dropped (its examples come back, in other batches, in the next epoch).
    """

    def __init__(self, lengths: list[int], global_batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 window: int = 50, slots: int = 1):
        if global_batch_size < 1:
            raise ValueError("global_batch_size must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.window = window
        self.slots = slots  # world_size x grad_accum: a batch needs at least this many examples
        self._cache: dict[int, list[np.ndarray]] = {}
        # Every epoch has the same number of batches (windows have the same sizes; only their members change).
        self.steps_per_epoch = len(self.epoch_batches(0))
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.lengths)} examples cannot fill one batch of {self.slots} micro-batches")

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The global batches of `epoch` (arrays of example indices)."""
        if epoch in self._cache:
            return self._cache[epoch]
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        span = self.global_batch_size * self.window
        batches: list[np.ndarray] = []
        for start in range(0, n, span):
            chunk = order[start:start + span]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i:i + self.global_batch_size] for i in range(0, len(chunk), self.global_batch_size))
        batches = [b for b in batches if len(b) >= self.slots]
        if self.shuffle and len(batches) > 1:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = {epoch: batches}  # one epoch at a time is all a run needs
        return batches

    def global_batch(self, step: int) -> np.ndarray:
        """The examples of optimizer step `step` (0-based, counted over all epochs)."""
        per_epoch = self.steps_per_epoch
        epoch, index = divmod(step, per_epoch)
        return self.epoch_batches(epoch)[index]

    def micro_batches(self, step: int, *, rank: int = 0, world_size: int = 1, grad_accum: int = 1) -> list[np.ndarray]:
        """This process's micro-batches of step `step` (see the class docstring for the split)."""
        batch = self.global_batch(step)
        batch = batch[np.argsort(-self.lengths[batch], kind="stable")]
        chunks = np.array_split(batch, world_size * grad_accum)
        return [chunks[k] for k in range(rank, len(chunks), world_size)]

    def max_micro_batch_tokens(self, *, micro_batch_size: int) -> int:
        """An upper bound on the padded tokens of one micro-batch: its size times the longest example."""
        return int(min(micro_batch_size, len(self.lengths)) * self.lengths.max())
