"""Grammar-constrained decoding: the tokens a JSON schema (or a Lark grammar, or a regex) allows at each step.

Built on llguidance (`pip install llguidance`), chosen over xgrammar and outlines for this engine:

- It computes one row's mask on the fly from the grammar's current state (an Earley parser over a lexer, in Rust),
  so a new schema costs well under a millisecond to compile. A server gets a different schema with almost every
  request; xgrammar and outlines compile each grammar ahead against the whole vocabulary (milliseconds to
  seconds per schema, then cached), which pays off for a few fixed grammars on a GPU, less so here.
- It is a self-contained wheel with no dependencies: it cannot pull another torch (xgrammar requires torch,
  triton and apache-tvm-ffi; outlines brings a stack of its own). Its Python side takes a Hugging Face fast
  tokenizer as it is (`llguidance.hf.from_tokenizer`), and hands back a 32-bit bitmask per row that we apply to
  the engine's own logits on any device.
- It supports the JSON Schema subset OpenAI's structured outputs do and more, and vLLM and SGLang ship it as a
  structured-output backend, so answers match what those servers give under the same schema.

The engine keeps one `RowGrammar` per sequence: before each sampling step `mask` turns every constrained row's
forbidden logits to -inf (rows without a grammar are untouched), and after it `advance` feeds the chosen token.
A grammar that is complete and can take no more text ends its sequence (finish reason "stop"); while it can
still end, the model's end-of-turn token stays allowed.
"""

from __future__ import annotations

import json
import threading
import weakref

import torch

from honellm.errors import HoneError, MissingDependency
from honellm.generation.params import Grammar

# JSON without optional whitespace: a small model that may emit spaces or newlines between tokens could otherwise
# pad an answer until max_tokens. OpenAI's own JSON mode answers compactly too.
JSON_OPTIONS = {"whitespace_flexible": False}
_BITS = None  # torch.arange(32) as int32, made on first use
_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError as err:
        raise MissingDependency(f"constrained decoding (JSON schemas, response_format, tool_choice) needs llguidance "
                                f"({err.name} is missing)", fix="pip install 'honellm[serve]' (or: pip install "
                                "llguidance)") from None
    return llguidance


def compile_grammar(grammar: Grammar) -> str:
    """The grammar in llguidance's own form; a HoneError (with llguidance's reason) when it is not valid."""
    llg = _llguidance()
    if grammar.kind == "json_schema":
        try:
            text = llg.LLMatcher.grammar_from_json_schema(grammar.source, overrides=JSON_OPTIONS)
        except ValueError as err:
            raise HoneError(f"the JSON schema cannot be read: {err}", where="grammar",
                            fix="send a JSON Schema object") from None
    elif grammar.kind == "lark":
        text = llg.LLMatcher.grammar_from_lark(grammar.source)
    else:
        text = llg.LLMatcher.grammar_from_regex(grammar.source)
    problem = llg.LLMatcher.validate_grammar(text)
    if problem:
        what = {"json_schema": "JSON schema", "lark": "Lark grammar", "regex": "regex"}[grammar.kind]
        raise HoneError(f"the {what} cannot be used for constrained decoding: {problem}", where="grammar",
                        fix="use the JSON Schema features OpenAI's structured outputs support (types, properties, "
                            "required, enum, const, anyOf, items, $ref, string patterns and formats, number bounds)")
    return text


def check_json_schema(schema) -> None:
    """Raise a HoneError when `schema` cannot constrain decoding (the server calls this before queueing)."""
    compile_grammar(Grammar("json_schema", json.dumps(schema)))


def llg_tokenizer(tokenizer, vocab_size: int, eos_ids):
    """llguidance's view of a Hugging Face tokenizer (built once per tokenizer object; it reads the whole vocab)."""
    llg = _llguidance()
    with _lock:
        cached = _tokenizers.get(tokenizer)
        key = (vocab_size, tuple(sorted(eos_ids)))
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            made = llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids))
        except ValueError as err:
            raise HoneError(f"constrained decoding cannot read this tokenizer ({err})", where="grammar",
                            fix="use a model with a fast (tokenizer.json) tokenizer") from None
        _tokenizers[tokenizer] = (key, made)
        return made


class RowGrammar:
    """The grammar state of one sequence being generated."""

    def __init__(self, compiled: str, ll_tokenizer):
        llg = _llguidance()
        self.matcher = llg.LLMatcher(ll_tokenizer, compiled, log_level=0)
        if self.matcher.is_error():
            raise HoneError(f"the grammar cannot be used: {self.matcher.get_error()}", where="grammar",
                            fix="check the schema or grammar")
        self.words = (ll_tokenizer.vocab_size + 31) // 32

    def fill(self, bitmask: torch.Tensor) -> None:
        """Write this row's allowed tokens into `bitmask` (int32 [words], on the CPU)."""
        self.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * bitmask.element_size())

    def advance(self, token: int) -> bool:
        """Take the sampled token; True when the grammar is complete and takes no more text (the row ends)."""
        if not self.matcher.consume_token(token):
            raise HoneError(f"the grammar refused token {token}: {self.matcher.get_error()}", where="grammar",
                            fix="report this: the token mask should have forbidden it")
        return self.matcher.is_stopped()


def new_row_grammar(grammar: Grammar, tokenizer, vocab_size: int, eos_ids) -> RowGrammar:
    return RowGrammar(compile_grammar(grammar), llg_tokenizer(tokenizer, vocab_size, eos_ids))


def allowed_tokens(grammars: list[RowGrammar | None], vocab: int, device: torch.device) -> torch.Tensor | None:
    """[batch, vocab] bool: which tokens each row may take next (every token for a row without a grammar).

    None when no row has a grammar, so unconstrained batches take no extra work at all."""
    global _BITS
    if all(g is None for g in grammars):
        return None
    if _BITS is None:
        _BITS = torch.arange(32, dtype=torch.int32)
    words = max(g.words for g in grammars if g is not None)
    bitmask = torch.full((len(grammars), max(words, (vocab + 31) // 32)), -1, dtype=torch.int32)
    for j, g in enumerate(grammars):
        if g is not None:
            g.fill(bitmask[j, : g.words])
            bitmask[j, g.words:] = 0  # tokens beyond the tokenizer's vocabulary (padding rows of the embedding)
    allowed = ((bitmask[:, :, None] >> _BITS) & 1).bool().view(len(grammars), -1)[:, :vocab]
    return allowed.to(device)
