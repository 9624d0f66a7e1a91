"""The generation engine: `Generator.generate`, `.score_continuations` and `.stream` over one model.

A call tokenizes its prompts, sorts them by length (less padding per batch), computes a shared prefix's keys
and values once, then runs each batch: one prefill of the right-aligned suffixes after the prefix, then a lean
decode loop (one forward per step, no logits-processor stack, no cache concatenation, finished rows dropped from
the batch once half of it is done; on a GPU the lean runner's step is recorded once per batch and replayed as a
CUDA graph, `runners.DecodeGraph`, and the batch then keeps its finished rows). A grammar
(`SamplingParams.grammar`) gives each row its own token mask before every choice (`constrained`); logprobs and
top_logprobs are always the raw model's. Outputs come back in input order.
"""

from __future__ import annotations

import collections.abc
import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from honellm.core import support
from honellm.core.runners import DecodeGraph, DecoderRunner, GraphUnavailable, make_runner
from honellm.errors import HoneError
from honellm.generation.params import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    ContinuationScore,
    SamplingParams,
)
from honellm.generation.sampling import choose_tokens_with_alternatives, make_generator
from honellm.generation.text import CompletionText

BACKENDS = ("auto", "torch", "vllm")
PREFILL_TOKENS = 8192  # tokens per prefill forward (batch x chunk); bounds activation memory on long prompts
GRAPH_MIN_STEPS = 16  # fewer decoding steps than this run eagerly: recording a CUDA graph costs about three steps
SCORE_LOGITS = 1 << 27  # logits kept per scoring batch (batch x continuation x vocab), about 256 MiB in bf16

Prompt = str | Sequence[int]
SharedPrefix = str | Sequence[int] | None


@dataclass
class _Row:
    """One prompt being completed."""

    index: int  # position in the caller's list
    prompt_ids: list[int]
    limit: int  # new tokens allowed (max_new_tokens, or less near the context length)
    text: CompletionText
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    ended_by_eos: bool = False
    grammar: object | None = None  # a constrained.RowGrammar when the completion follows a grammar

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def content_ids(self) -> list[int]:
        return self.token_ids[:-1] if self.ended_by_eos else self.token_ids

    def completion(self, params: SamplingParams) -> Completion:
        return Completion(
            text=self.text.final(self.content_ids()),
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason or FINISH_LENGTH,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.token_ids),
            logprobs=list(self.logprobs) if params.logprobs else None,
            top_logprobs=list(self.top_logprobs) if params.top_logprobs else None,
        )


def decode_graphs(runner, device: torch.device) -> bool:
    """Whether decoding steps are replayed as CUDA graphs (`runners.DecodeGraph`): the lean runner on a GPU, unless
    HONE_CUDA_GRAPHS=0 or HONE_FAST=0. (The tests stand a CPU in for a GPU here.)"""
    return (isinstance(runner, DecoderRunner) and device.type == "cuda" and os.environ.get("HONE_CUDA_GRAPHS", "1") != "0"
            and support.enabled())


class Generator:
    """Batched generation and scoring with a KV cache and shared-prefix reuse, for one model and tokenizer.

    `backend="auto"` uses vLLM where it is installed and a CUDA GPU is present (and the model is a plain
    Hugging Face model saved in a folder), else the torch engine here. The torch engine checks the model's
    weights at the start of every call (its fused copies are rebuilt when they changed), so it stays correct
    while a policy is being trained between calls; one Generator serves one thread at a time. `batch_size` is
    the number of sequences per forward; `max_length` caps prompt plus completion (default: the model's context
    length).
    Prompts are tokenized without adding special tokens (they are already formatted, a chat template included);
    pass `add_special_tokens=True` for raw text on models that expect a BOS token. LoRA layers are merged into the
    engine's weight copies (an adapted model decodes at its base's speed; a changed adapter costs one rebuild at
    the next call); `merge_adapters=False` runs them unmerged, for a model that switches adapters between calls.
    """

    def __init__(self, model, tokenizer, *, backend: str = "auto", batch_size: int = 16,
                 max_length: int | None = None, add_special_tokens: bool = False, merge_adapters: bool = True):
        if backend not in BACKENDS:
            raise HoneError(f"unknown generation backend {backend!r}", where="Generator(backend=...)",
                            fix=f"use one of: {', '.join(BACKENDS)}")
        if batch_size < 1:
            raise HoneError(f"batch_size must be at least 1 (got {batch_size})", where="Generator(batch_size=...)",
                            fix="pass a positive batch size")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.add_special_tokens = add_special_tokens
        self.max_length = max_length or context_length(model, tokenizer)
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        from honellm.generation import vllm_backend

        self.backend = vllm_backend.select_backend(backend, model)
        self._vllm = vllm_backend.VLLMBackend(model, tokenizer, max_length=self.max_length,
                                              add_special_tokens=add_special_tokens) if self.backend == "vllm" else None
        self._runner = make_runner(model, merge_adapters=merge_adapters) if self.backend == "torch" else None
        self._cuda_graphs = decode_graphs(self._runner, self.device)

    @property
    def runner_name(self) -> str:
        """Which forward runs: "decoder" (the lean Llama-family path), "transformers", or "vllm"."""
        return self._runner.name if self._runner is not None else "vllm"

    @property
    def decoding(self) -> str:
        """How decoding steps run, for run logs: the runner's name, with ", CUDA graphs" where steps are replayed as
        CUDA graphs (`runners.DecodeGraph`) or why they stopped being."""
        if self._runner is None or not self._cuda_graphs:
            return self.runner_name
        problem = self._runner.graphs_problem
        return f"{self.runner_name}, CUDA graphs" + (f" off: {problem}" if problem else "")

    def sync_weights(self) -> None:
        """Make the next generation use the model's current weights (call after an optimizer step).

        The torch engine reads the live weights on every forward, so this is a no-op there; vLLM holds its own
        copy, which this refreshes (merging a PEFT adapter in)."""
        if self._vllm is not None:
            self._vllm.sync_weights()

    def sleep(self) -> None:
        """Free the GPU between generation phases (vLLM's sleep mode; the next call wakes it). A no-op for the
        torch engine, which holds no memory of its own between calls."""
        if self._vllm is not None:
            self._vllm.sleep()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------------------ generate

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None, *,
                 shared_prefix: SharedPrefix = None, progress: bool = False) -> list[Completion]:
        """Complete every prompt; results in input order.

        `prompts` are formatted strings or token-id lists. `shared_prefix` reuses one prefix's keys and values
        for every prompt: "auto" finds the longest common token prefix of the prompts; a string or id list names
        it (every prompt must start with it). Either way only the tokens all prompts share after tokenization are
        reused, so the outputs are those without reuse (token for token in fp32; in bf16 up to the rounding of
        a differently shaped computation).
        """
        params = params or SamplingParams()
        if not prompts:
            return []
        encoded = self._encode_all(prompts)
        if self._vllm is not None:
            self._vllm_can_run(params)
            return self._vllm.generate(encoded, params, progress=progress)
        shared = self._shared_length(prompts, encoded, shared_prefix, cap=min(map(len, encoded)) - 1)
        rows = self._new_rows(encoded, params)
        order = sorted(range(len(rows)), key=lambda i: -len(encoded[i]))
        generator = make_generator(params.seed, self.device)
        with self._evaluating(), self._engine_call():  # once for the call, not per step (see `_evaluating`)
            with self._inference():
                prefix = self._runner.compute_prefix(encoded[order[0]][:shared]) if shared else None
            bar = _bar(len(rows), "generating", "prompt", progress)
            for start in range(0, len(order), self.batch_size):
                batch = [rows[i] for i in order[start: start + self.batch_size]]
                for _ in self._decode(batch, shared, prefix, params, generator):
                    pass
                bar.update(len(batch))
            bar.close()
        return [row.completion(params) for row in rows]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None
               ) -> collections.abc.Generator[str, None, Completion]:
        """Yield the completion of one prompt as text deltas while it is generated.

        Deltas never split a UTF-8 character and never show text that a stop string later trims; their
        concatenation equals `generate([prompt], params)[0].text` for the same seed. The generator's return value
        (`StopIteration.value`) is the whole `Completion`, for token counts and the finish reason.
        """
        pieces = self.stream_batch([prompt], params)
        try:
            while True:
                yield next(pieces)[1]
        except StopIteration as stop:
            return stop.value[0]

    def stream_batch(self, prompts: Sequence[Prompt], params: SamplingParams | None = None
                     ) -> collections.abc.Generator[tuple[int, str], None, list[Completion]]:
        """`stream` for several prompts decoded together in one batch (OpenAI's `n` with `stream`): yields
        `(index of the prompt, text delta)`; returns the Completions in input order. The prompts run as one batch
        (at most `batch_size` of them), so a row's text equals what `generate` gives it in the same batch."""
        params = params or SamplingParams()
        encoded = self._encode_all(prompts)
        if len(encoded) > self.batch_size:
            raise HoneError(f"stream_batch takes at most batch_size={self.batch_size} prompts (got {len(encoded)})",
                            where="Generator.stream_batch", fix="stream fewer prompts at once")
        if self._vllm is not None:  # vLLM's offline engine has no streaming: hand out the whole texts at once
            self._vllm_can_run(params)
            completions = self._vllm.generate(encoded, params)
            for i, completion in enumerate(completions):
                if completion.text:
                    yield i, completion.text
            return completions
        rows = self._new_rows(encoded, params)
        generator = make_generator(params.seed, self.device)
        with self._engine_call():
            for _ in self._decode(rows, 0, None, params, generator):
                for row in rows:
                    piece = row.text.delta(row.content_ids(), finished=row.done)
                    if piece:
                        yield row.index, piece
        for row in rows:
            piece = row.text.delta(row.content_ids(), finished=True)
            if piece:
                yield row.index, piece
        return [row.completion(params) for row in rows]

    def _vllm_can_run(self, params: SamplingParams) -> None:
        if params.grammar is not None or params.top_logprobs:
            raise HoneError("the vLLM backend here does not take grammars or top_logprobs",
                            where="Generator(backend='vllm')", fix="use backend='torch' for constrained decoding")

    def _new_rows(self, encoded: list[list[int]], params: SamplingParams) -> list[_Row]:
        rows = [self._new_row(i, ids, params) for i, ids in enumerate(encoded)]
        if params.grammar is not None:
            from honellm.generation import constrained

            compiled = constrained.compile_grammar(params.grammar)
            vocab = self.model.config.get_text_config().vocab_size
            tokenizer = constrained.llg_tokenizer(self.tokenizer, vocab, self.eos_ids)
            for row in rows:
                row.grammar = constrained.RowGrammar(compiled, tokenizer)
        return rows

    def _new_row(self, index: int, ids: list[int], params: SamplingParams) -> _Row:
        room = self.max_length - len(ids)
        if room < 1:
            raise HoneError(
                f"prompt {index} has {len(ids)} tokens, and the model's context holds {self.max_length}",
                where=f"prompts[{index}]",
                fix="shorten the prompt (fewer demonstrations, a shorter input), or raise Generator(max_length=...)",
            )
        return _Row(index, ids, min(params.max_new_tokens, room), CompletionText(self.tokenizer, ids, params.stop))

    def _decode(self, rows: list[_Row], shared: int, prefix, params: SamplingParams,
                generator: torch.Generator) -> Iterator[None]:
        """Complete one batch; yields after every step (for streaming). Rows are updated in place.

        Nothing is held across a yield (no inference mode, no eval mode), so a suspended stream leaves the
        caller's torch state alone. Rows with a grammar have their forbidden tokens masked before each choice.
        """
        runner, device = self._runner, self.device
        suffixes = [row.prompt_ids[shared:] for row in rows]
        width = max(map(len, suffixes))
        steps = max(row.limit for row in rows)
        ids, positions, valid = self._right_align(suffixes, width, shared, device)
        with self._inference():
            graphs = self._cuda_graphs and runner.graphs_problem is None and steps >= GRAPH_MIN_STEPS
            state = runner.new_state(len(rows), shared + width + steps, zeroed=graphs)
            if prefix is not None:
                runner.load_prefix(state, prefix)
            logits = self._prefill(state, ids, positions, valid, keep=1)[:, -1]
        next_positions = torch.tensor([shared + len(s) for s in suffixes], device=device)
        active = list(range(len(rows)))  # which row each batch row of the state belongs to
        constrained = any(row.grammar is not None for row in rows)
        graph = None  # the decoding step as a CUDA graph, from the first step on (`runners.DecodeGraph`)
        for _ in range(steps):
            allowed = None
            if constrained:
                from honellm.generation.constrained import allowed_tokens

                grammars = [None if rows[r].done else rows[r].grammar for r in active]
                allowed = allowed_tokens(grammars, logits.shape[-1], device)
            with self._inference():
                tokens, logprobs, top = choose_tokens_with_alternatives(logits, params, generator, allowed)
            chosen = tokens.tolist()
            chosen_logprobs = logprobs.tolist() if logprobs is not None else None
            top_ids, top_values = (top[0].tolist(), top[1].tolist()) if top is not None else (None, None)
            keep = []
            for j, r in enumerate(active):
                row = rows[r]
                if row.done:
                    continue
                if top_ids is not None:
                    row.top_logprobs.append(list(zip(top_ids[j], top_values[j], strict=True)))
                self._append(row, chosen[j], chosen_logprobs[j] if chosen_logprobs else None)
                if not row.done:
                    keep.append(j)
            yield
            if not keep:
                return
            with self._inference():
                # drop finished rows once they are half the batch (a graph keeps its batch: they run on, unread)
                if graph is None and len(keep) <= len(active) // 2:
                    index = torch.tensor(keep, device=device)
                    runner.select(state, index)
                    tokens, next_positions = tokens[index], next_positions[index]
                    active = [active[j] for j in keep]
                if graphs and graph is None:
                    graph = DecodeGraph(runner, state)
                logits = None
                if graph is not None:
                    try:
                        logits = graph.step(tokens, next_positions)
                    except GraphUnavailable as why:  # decode eagerly from here on, in this call and the next
                        runner.graphs_problem, graph, graphs = str(why), None, False
                if logits is None:
                    logits = runner.forward(state, tokens[:, None], next_positions[:, None],
                                            torch.ones_like(tokens[:, None], dtype=torch.bool), keep=1)[:, -1]
            next_positions = next_positions + 1

    def _append(self, row: _Row, token: int, logprob: float | None) -> None:
        row.token_ids.append(token)
        if logprob is not None:
            row.logprobs.append(logprob)
        if token in self.eos_ids:
            row.finish_reason, row.ended_by_eos = FINISH_STOP, True
        elif row.grammar is not None and row.grammar.advance(token):
            row.finish_reason = FINISH_STOP  # the grammar is complete and takes no more text
        elif row.text.stop and row.text.hits_stop(row.token_ids):
            row.finish_reason = FINISH_STOP
        elif len(row.token_ids) >= row.limit:
            row.finish_reason = FINISH_LENGTH

    # ------------------------------------------------------------------------------------------------- scoring

    def score_continuations(self, contexts: Sequence[str], continuations: Sequence[str], *,
                            shared_prefix: SharedPrefix = None, progress: bool = False) -> list[ContinuationScore]:
        """Log-likelihood of each continuation given its context (lm-evaluation-harness's `loglikelihood`).

        Each pair is tokenized jointly and split where the context's own tokens end (with trailing spaces of
        the context moved to the continuation), as lm-evaluation-harness does, so that a word is not split
        across the seam differently than the model would see it. Unlike lm-evaluation-harness, a trailing
        newline stays in the context: a chat prompt ends with one, and the answer is scored after it, as it
        would be generated. `shared_prefix` works as in `generate`.
        """
        if len(contexts) != len(continuations):
            raise HoneError(f"{len(contexts)} contexts but {len(continuations)} continuations",
                            where="score_continuations", fix="pass one continuation per context")
        if not contexts:
            return []
        pairs = [self._encode_pair(c, x) for c, x in zip(contexts, continuations, strict=True)]
        if self._vllm is not None:
            return self._vllm.score(pairs, progress=progress)
        inputs = [(ctx + cont)[:-1] for ctx, cont in pairs]
        too_long = [i for i, seq in enumerate(inputs) if len(seq) > self.max_length]
        if too_long:
            i = too_long[0]
            raise HoneError(f"context + continuation {i} has {len(inputs[i]) + 1} tokens, and the model's context "
                            f"holds {self.max_length}", where=f"contexts[{i}]", fix="shorten the context")
        scores: list[ContinuationScore | None] = [None] * len(pairs)
        scored = [i for i, (_, cont) in enumerate(pairs) if cont]
        for i, (_, cont) in enumerate(pairs):
            if not cont:
                scores[i] = ContinuationScore(0.0, 0, True)
        if not scored:
            return scores  # type: ignore[return-value]
        # Every logit we need (from the last context token on) must lie after the shared prefix.
        cap = min(len(pairs[i][0]) for i in scored) - 1
        shared = self._shared_length(None, [inputs[i] for i in scored], shared_prefix, cap=cap)
        order = sorted(scored, key=lambda i: -len(inputs[i]))
        vocab = self.model.config.get_text_config().vocab_size
        bar = _bar(len(scored), "scoring", "pair", progress)
        with self._engine_call(), self._inference():
            prefix = self._runner.compute_prefix(inputs[order[0]][:shared]) if shared else None
            for batch in _score_batches(order, [len(c) for _, c in pairs], self.batch_size, vocab):
                self._score_batch(batch, pairs, inputs, shared, prefix, scores)
                bar.update(len(batch))
        bar.close()
        return scores  # type: ignore[return-value]

    def _score_batch(self, batch: list[int], pairs, inputs, shared: int, prefix, scores: list) -> None:
        runner, device = self._runner, self.device
        suffixes = [inputs[i][shared:] for i in batch]
        width = max(map(len, suffixes))
        keep = max(len(pairs[i][1]) for i in batch)
        ids, positions, valid = self._right_align(suffixes, width, shared, device)
        state = runner.new_state(len(batch), shared + width)
        if prefix is not None:
            runner.load_prefix(state, prefix)
        logits = self._prefill(state, ids, positions, valid, keep=keep)
        for j, i in enumerate(batch):
            cont = pairs[i][1]
            # Rows are right-aligned: the last len(cont) logits of row j predict the continuation's tokens.
            row_logits = logits[j, keep - len(cont):].float()
            target = torch.tensor(cont, device=device)
            logprobs = row_logits.log_softmax(-1).gather(-1, target[:, None])[:, 0]
            greedy = bool((row_logits.argmax(-1) == target).all())
            scores[i] = ContinuationScore(float(logprobs.sum()), len(cont), greedy)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Only spaces move (lm-evaluation-harness moves all whitespace): a chat template's generation prompt ends
        # in a newline that belongs to the context, and the answer must be scored after it, as it is generated.
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode_text([context + continuation])[0]
        if not context:  # lm-evaluation-harness scores an empty context after its prefix token
            start = self.tokenizer.bos_token_id
            start = start if start is not None else min(self.eos_ids)
            return [start], whole
        ctx = self._encode_text([context])[0]
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------------------------------------- helpers

    def _prefill(self, state, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                 keep: int) -> torch.Tensor:
        """Run a block of prompt tokens in chunks of at most PREFILL_TOKENS; logits of the last `keep` slots."""
        batch, width = ids.shape
        chunk = max(1, PREFILL_TOKENS // batch)
        head = width - max(keep, min(chunk, width))  # the last chunk holds every slot whose logits we keep
        for start in range(0, head, chunk):
            end = min(start + chunk, head)
            self._runner.forward(state, ids[:, start:end], positions[:, start:end], valid[:, start:end], keep=1)
        return self._runner.forward(state, ids[:, head:], positions[:, head:], valid[:, head:], keep=keep)

    def _right_align(self, suffixes: list[list[int]], width: int, shared: int, device: torch.device):
        """Token ids, positions and validity of suffixes right-aligned in a block of `width` slots after a
        prefix of `shared` tokens (see `runners` for why)."""
        batch = len(suffixes)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        valid = torch.zeros(batch, width, dtype=torch.bool)
        positions = torch.full((batch, width), shared, dtype=torch.long)
        for j, suffix in enumerate(suffixes):
            pad = width - len(suffix)
            ids[j, pad:] = torch.tensor(suffix, dtype=torch.long)
            valid[j, pad:] = True
            positions[j, pad:] = torch.arange(shared, shared + len(suffix))
        return ids.to(device), positions.to(device), valid.to(device)

    def _encode_all(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        texts = [(i, p) for i, p in enumerate(prompts) if isinstance(p, str)]
        encoded: list[list[int] | None] = [None if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        if texts:
            for (i, _), ids in zip(texts, self._encode_text([p for _, p in texts]), strict=True):
                encoded[i] = ids
        empty = [i for i, ids in enumerate(encoded) if not ids]
        if empty:
            raise HoneError(f"prompt {empty[0]} is empty", where=f"prompts[{empty[0]}]",
                            fix="every prompt needs at least one token")
        return encoded  # type: ignore[return-value]

    def _encode_text(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=self.add_special_tokens)["input_ids"]

    def _shared_length(self, prompts: Sequence[Prompt] | None, encoded: list[list[int]], shared_prefix: SharedPrefix,
                       cap: int) -> int:
        """How many leading tokens every sequence shares with the requested prefix (0: no reuse)."""
        if shared_prefix is None or cap < 1 or not getattr(self._runner, "reuses_prefix", True):
            return 0  # (a runner that cannot lay a prefix out exactly for this model says so: core.runners)
        if isinstance(shared_prefix, str) and shared_prefix == "auto":
            reference = encoded[0]
        elif isinstance(shared_prefix, str):
            if prompts is not None:
                for i, p in enumerate(prompts):
                    if isinstance(p, str) and not p.startswith(shared_prefix):
                        raise HoneError(f"prompt {i} does not start with the shared prefix", where=f"prompts[{i}]",
                                        fix="pass shared_prefix='auto', or a prefix every prompt starts with")
            reference = self._encode_text([shared_prefix])[0]
        else:
            reference = [int(t) for t in shared_prefix]
        length = min(len(reference), cap)
        for ids in encoded:
            length = min(length, _common_prefix(reference, ids, length))
            if length == 0:
                break
        return length

    @contextlib.contextmanager
    def _engine_call(self):
        """The runner's `prepare` (derived weights brought up to date) before a call's work, and its `finish` after
        it, also when the call fails or a stream is closed early."""
        with self._inference():
            self._runner.prepare()
        try:
            yield
        finally:
            self._runner.finish()

    @contextlib.contextmanager
    def _inference(self):
        """Inference mode, and eval mode for the duration (dropout off) when the model is training."""
        with self._evaluating(), torch.inference_mode():
            yield

    @contextlib.contextmanager
    def _evaluating(self):
        """Eval mode for the duration when the model is training, its training mode back after.

        `generate` holds it for the whole call, so that the per-step `_inference` of `_decode` finds the model in
        eval mode and switches nothing: `train()` and `eval()` walk every module (about 2,500 in SmolLM2 with LoRA),
        and a training policy's rollouts (GRPO) spent about a quarter of their time in those walks, four per step.
        A stream keeps switching per step, so that nothing is held while it is suspended."""
        training = self.model.training
        if training:
            self.model.eval()
        try:
            yield
        finally:
            if training:
                self.model.train()


# ----------------------------------------------------------------------------------------------------- functions


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a turn: the tokenizer's EOS and the generation config's (SmolLM2's is <|im_end|>)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    return ids


def context_length(model, tokenizer) -> int:
    """The longest sequence the model takes: its config's max positions, or the tokenizer's max length."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    length = getattr(config, "max_position_embeddings", None)
    if length is None:
        length = getattr(tokenizer, "model_max_length", None)
        if length is None or length > 10**8:  # transformers' "unset" sentinel is about 1e30
            length = 2048
    return int(length)


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(limit, len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _score_batches(order: list[int], cont_lengths: list[int], batch_size: int, vocab: int) -> Iterator[list[int]]:
    """Batches of at most `batch_size` pairs whose kept logits stay under SCORE_LOGITS elements."""
    batch: list[int] = []
    keep = 0
    for i in order:
        new_keep = max(keep, cont_lengths[i])
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * new_keep * vocab > SCORE_LOGITS):
            yield batch
            batch, new_keep = [], cont_lengths[i]
        batch.append(i)
        keep = new_keep
    if batch:
        yield batch


def _bar(total: int, desc: str, unit: str, show: bool):
    from honellm.progress import progress

    return progress(total=total, desc=desc, unit=unit, disable=None if show else True)
