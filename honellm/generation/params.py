"""What a caller asks of the generation engine and what it gets back: plain dataclasses, no torch."""

from __future__ import annotations

from dataclasses import dataclass

from honellm.errors import HoneError

FINISH_STOP = "stop"  # the model ended its turn (an EOS id) or produced one of the stop strings
FINISH_LENGTH = "length"  # max_new_tokens, or the model's context length, was reached
MAX_TOP_LOGPROBS = 20  # alternatives per token, OpenAI's limit
GRAMMAR_KINDS = ("json_schema", "lark", "regex")


@dataclass(frozen=True)
class Grammar:
    """A constraint on the text a completion may have, enforced token by token (see `generation.constrained`).

    `kind` is "json_schema" (`source` is the schema as JSON text; `{"type": "object"}` is any JSON object),
    "lark" (a Lark grammar, llguidance's dialect) or "regex". Hashable, so requests with the same grammar batch.
    """

    kind: str
    source: str

    def __post_init__(self):
        if self.kind not in GRAMMAR_KINDS:
            raise HoneError(f"unknown grammar kind {self.kind!r}", where="Grammar(kind=...)",
                            fix=f"use one of: {', '.join(GRAMMAR_KINDS)}")

    @classmethod
    def json_schema(cls, schema: dict | bool) -> Grammar:
        import json

        # Key order is kept: a schema's property order is the order the answer writes them in.
        return cls("json_schema", json.dumps(schema, ensure_ascii=False))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token and when to stop.

    The order of the knobs follows Hugging Face and vLLM: logits / temperature, then top-k, then top-p.
    `temperature=0` is greedy decoding (top-k and top-p are then ignored). `seed` makes sampling reproducible
    for the same prompts and settings. `stop` strings end a completion at the text level (the string is trimmed
    from the text). `logprobs=True` returns, per generated token, its log-probability under the model's own
    distribution (before temperature, top-k, top-p and any grammar), which is what policy-gradient methods compare
    against, and what vLLM and OpenAI report; `top_logprobs=k` also returns the k most likely tokens of that
    distribution at every step (it implies `logprobs`). `grammar` constrains every completion to a JSON schema,
    a Lark grammar or a regex: tokens the grammar forbids are masked out before sampling, and a completion ends
    when its grammar is complete.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: Grammar | None = None

    def __post_init__(self):
        if self.top_logprobs and not self.logprobs:
            object.__setattr__(self, "logprobs", True)
        if isinstance(self.stop, str):  # a single string is a common slip; accept it as one stop string
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature}); 0 means greedy")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (got {self.top_k}); 0 disables it")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            problems.append(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}] (got {self.top_logprobs})")
        if any(not s for s in self.stop):
            problems.append("stop strings must be non-empty")
        if problems:
            raise HoneError("invalid sampling parameters: " + "; ".join(problems), where="SamplingParams",
                            fix="correct the values above")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One generated continuation.

    `token_ids` are the generated tokens, including the EOS token when the model ended its turn, and the token
    that completed a stop string (as vLLM does); `text` excludes both (a stop string is trimmed with whatever
    followed it). `logprobs[i]` belongs to `token_ids[i]` when requested; `top_logprobs[i]` then lists the
    `(token id, log-probability)` pairs of the most likely tokens at that step, most likely first. A tool
    episode's completion (`honellm.generation.tools`) also carries `episode`, the turns after the prompt (the
    model's and the tools'), and `tool_calls`, how many calls the model made; `text` is then its final answer.
    """

    text: str
    token_ids: list[int]
    finish_reason: str  # FINISH_STOP | FINISH_LENGTH
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    episode: list[dict] | None = None
    tool_calls: int | None = None


@dataclass(frozen=True)
class ContinuationScore:
    """Log-likelihood of a continuation given its context, as lm-evaluation-harness defines it."""

    logprob_sum: float  # sum of log p(token | everything before it) over the continuation's tokens
    n_tokens: int  # how many tokens the continuation has (after the joint tokenization split)
    is_greedy: bool  # True when every continuation token is the model's argmax at its position

