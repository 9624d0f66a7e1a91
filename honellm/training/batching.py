"""From conversations to padded tensors, with as little compute as possible spent on padding.

- `encode_conversation` turns messages + answer into token ids and labels (-100 where no loss is taken:
  the prompt, by default), through the model's chat template (`honellm.data.chat`).
- `encode_turns` does the same for a whole conversation with several assistant turns (a tool episode's call, then
  its final answer): every assistant turn takes the loss, the other turns (system, user, tool results) take none,
  as TRL's `assistant_only_loss` does.
- `LengthGroupedBatches` orders examples so that each micro-batch holds examples of similar length (padding is a
  few percent instead of half), in an order that depends only on the seed and the epoch, so that a resumed run
  sees exactly the batches the uninterrupted run would have seen, and so that one process and N processes with
  the same global batch see the same examples in each step.
- `collate` pads a micro-batch on the right.
- `pack` lays a micro-batch out padding-free instead: its sequences end to end in one row, each sequence's
  boundaries carried by `position_ids` (restarting at 0) and `cu_seqlens` (cumulative lengths, for varlen
  attention kernels), attention kept inside each sequence by the forward (`honellm.training.logprobs`).
  `token_budget_micro_batches` cuts a global batch into packed micro-batches of at most `max_tokens` tokens
  (`packing=true max_tokens_per_batch=N`): the global batch, hence the update, is the same as unpacked.

Preference recipes encode chosen and rejected answers with `encode_conversation` too, and batch them with
`LengthGroupedBatches` over pair lengths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from honellm.data.chat import has_chat_template, render_answer, render_conversation, render_prompt
from honellm.errors import HoneError

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


Render = Callable[[list[dict], bool], str]  # (messages, generation_prompt) -> the text the model sees


def encode_turns(tokenizer, messages: list[dict], *, max_length: int, completion_only: bool = True,
                 render: Render | None = None, add_special_tokens: bool | None = None) -> TokenSequence:
    """Token ids of a whole conversation, labels on every assistant turn (end-of-turn included) by default.

    The text is cut at each assistant turn: the text before it (`render(messages[:i], True)`, the prompt the model
    answers from) and the turn as the template writes it after that prompt. Each piece is tokenized on its own, as
    `encode_conversation` does with one prompt and one answer (a conversation whose last turn is the only assistant
    turn gives exactly its ids and labels), and as a tool episode does (`ToolEnvironment.run` tokenizes the tool
    turns between the model's turns on their own), so the ids trained on are the ids an episode shows the model.
    `render` is how messages become text (default: the chat template; a task with tools passes
    `ToolEnvironment.render`). Too long a sequence loses the start first; a last answer longer than `max_length`
    keeps its start, as in `encode_conversation`.
    """
    if render is None:
        def render(turns: list[dict], generation_prompt: bool) -> str:
            return render_conversation(tokenizer, turns, generation_prompt=generation_prompt)
    special = not has_chat_template(tokenizer) if add_special_tokens is None else add_special_tokens
    pieces: list[tuple[str, bool]] = []  # (text, trained)
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        prompt = render(messages[:i], True)
        full = render(messages[:i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise HoneError("the model's chat template renders a conversation differently from its prefix (it edits "
                            "earlier turns), so every assistant turn of it cannot be trained at once",
                            fix="use a model whose template renders earlier turns verbatim (ChatML, Llama 3, Qwen2)")
        answer = full[len(prompt):]
        if full.endswith("\n") and not message["content"].endswith("\n"):
            answer = answer.rstrip("\n")  # the separator after the turn belongs to the next turn (render_answer)
        pieces += [(prompt[len(done):], False), (answer, True)]
        done = prompt + answer
    if not pieces:
        raise ValueError("a conversation to train needs an assistant turn after the first message")
    ids: list[int] = []
    labels: list[int] = []
    last = 0
    for k, (text, trained) in enumerate(pieces):
        piece = tokenizer(text, add_special_tokens=special and k == 0)["input_ids"]
        ids += piece
        labels += list(piece) if trained or not completion_only else [IGNORE] * len(piece)
        last = len(piece)
    truncated = len(ids) > max_length
    if truncated:  # keep the end (the last answer and the context nearest to it); a too-long last answer its start
        head_ids, head_labels = ids[: len(ids) - last], labels[: len(labels) - last]
        tail_ids, tail_labels = ids[len(ids) - last:][: max_length - 1], labels[len(labels) - last:][: max_length - 1]
        keep = max_length - len(tail_ids)
        ids = head_ids[len(head_ids) - keep:] + tail_ids
        labels = head_labels[len(head_labels) - keep:] + tail_labels
    return TokenSequence(ids, labels, truncated)


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
    # A packed batch (`pack`): one row [1, N], each sequence's positions from 0 ([1, N] long) and the cumulative
    # sequence lengths [k + 1] int32 (0, len0, len0 + len1, ...). None: a right-padded batch.
    position_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None  # the longest sequence of a packed batch (for varlen attention kernels)

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    def to(self, device: torch.device | str) -> Batch:
        index, needed = self.predicting_index, self.needed_width
        if index is None and self.labels.device.type == "cpu":
            index = predicting_index(self.labels)
        if needed is None and index is not None and index.device.type == "cpu":
            needed = needed_width(index, self.labels.shape[1])
        moved = [t.to(device) if t is not None else None for t in (index, self.position_ids, self.cu_seqlens)]
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.num_tokens, self.num_loss_tokens, moved[0], needed, moved[1], moved[2], self.max_seqlen)

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


def pack(sequences: list[TokenSequence], *, width: int | None = None, slots: int | None = None,
         pad_id: int = 0) -> Batch:
    """The sequences end to end in one row, no padding: `position_ids` restart at 0 at each sequence and
    `cu_seqlens` holds the cumulative lengths. The first token of each sequence takes no loss (nothing of its own
    sequence comes before it; the previous sequence's last token must not learn to predict it), which is what
    `num_loss_tokens` counts unpacked, so the loss is the same sum over the same tokens.

    Static shapes (CUDA graphs replay one shape): `width` fills the row to exactly that many tokens with a filler
    sequence of `pad_id` (no loss, attending to itself only), `slots` gives `cu_seqlens` exactly `slots + 1`
    entries (empty sequences at the end), and `max_seqlen` is `width`, a bound every micro-batch shares. The loss,
    `num_tokens` and `num_loss_tokens` are those of the real sequences."""
    ids, labels, positions, cu = [], [], [], [0]
    for s in sequences:
        ids.extend(s.input_ids)
        labels.append(IGNORE)
        labels.extend(s.labels[1:])
        positions.extend(range(len(s)))
        cu.append(cu[-1] + len(s))
    real, longest = len(ids), max(len(s) for s in sequences)
    if width is not None:
        if real > width:
            raise ValueError(f"{real} tokens do not fit a packed row of {width}")
        if width > real:  # the filler: a sequence of its own, no loss
            ids.extend([pad_id] * (width - real))
            labels.extend([IGNORE] * (width - real))
            positions.extend(range(width - real))
            cu.append(width)
        longest = width
    if slots is not None:
        if len(cu) - 1 > slots:
            raise ValueError(f"{len(cu) - 1} sequences do not fit {slots} slots")
        cu.extend([cu[-1]] * (slots + 1 - len(cu)))
    ids_t = torch.tensor([ids], dtype=torch.long)
    return Batch(ids_t, torch.ones_like(ids_t), torch.tensor([labels], dtype=torch.long), real,
                 sum(s.num_loss_tokens for s in sequences), position_ids=torch.tensor([positions], dtype=torch.long),
                 cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=longest)


def token_budget_micro_batches(indices: np.ndarray, lengths: np.ndarray, max_tokens: int, *, parts: int = 1,
                               part: int = 0) -> list[np.ndarray]:
    """Split the examples `indices` (a global batch) into micro-batches of at most `max_tokens` tokens each
    (an example longer than the budget gets a micro-batch of its own), for process `part` of `parts`.

    First-fit decreasing over lengths: few micro-batches, each filled close to the budget, in an order that
    depends only on the examples (a resumed run packs the same micro-batches). With several processes the
    examples are dealt to them first (sorted by length, round robin), so each holds about as many tokens; every
    process then packs its own share (one process with the whole batch and N processes each with their share
    compute the same sum, hence the same update)."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    order = np.asarray(indices)[np.argsort(-np.asarray(lengths)[indices], kind="stable")]
    mine = order[part::parts]
    bins: list[list[int]] = []
    room: list[int] = []
    for i in mine:
        n = int(lengths[i])
        for b, left in enumerate(room):
            if n <= left:
                bins[b].append(int(i))
                room[b] -= n
                break
        else:
            bins.append([int(i)])
            room.append(max_tokens - n)
    return [np.asarray(b, dtype=np.int64) for b in bins]


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
