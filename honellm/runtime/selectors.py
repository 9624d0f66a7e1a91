"""Example selectors: which training examples become the demonstrations of a prompt.

Each selector is a plain function registered by name in `SELECTORS` (a name taken twice is an error):

    selector(queries: list[str | None], pool: DemoPool, k: int, *, seed: int, encoder, **params) -> list[list[int]]

It returns, for each query, the indices of `k` pool examples in the order they are shown (the most relevant
last, nearest the query: Liu et al. 2022, "What Makes Good In-Context Examples for GPT-3?"). A query of
`None` asks for one fixed set for every query: random and balanced draw as usual; the similarity selectors
then pick the examples most typical of the pool (nearest its centroid), MMR the typical-yet-diverse ones.

| name      | picks                                                                 |
|-----------|-----------------------------------------------------------------------|
| random    | k at random (seeded by the seed and the query's text, so reproducible) |
| balanced  | k at random with the labels as even as possible, labels interleaved   |
| bm25      | the k lexical nearest neighbours (Okapi BM25)                          |
| embedding | the k nearest neighbours by cosine of mean-pooled hidden states        |
| mmr       | maximal marginal relevance: relevant to the query, unlike each other (Carbonell & Goldstein 1998) |

A pool example whose query text equals the query is never picked (no answer leaks into its own prompt).
"""

from __future__ import annotations

import random
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from honellm.errors import HoneError
from honellm.runtime.bm25 import BM25


@dataclass
class DemoPool:
    """Candidate demonstrations: the pool records, their user turns as the program renders them, and answers."""

    records: list[dict]
    queries: list[str]
    answers: list[str]

    @classmethod
    def build(cls, task, program, records: list[dict]) -> DemoPool:
        usable = [r for r in records if task.target(r) is not None]
        return cls(usable, [query_text(task, program, r) for r in usable], [str(task.target(r)) for r in usable])

    def __len__(self) -> int:
        return len(self.records)


def query_text(task, program, record: dict) -> str:
    """The user turn a record becomes under `program` (for chat records: the last user message)."""
    turns = program.turns(task, record)
    users = [t["content"] for t in turns if t["role"] == "user"]
    return users[-1] if users else ""


@dataclass(frozen=True)
class Selector:
    name: str
    fn: Callable[..., list[list[int]]]
    needs_embeddings: bool = False
    describe: str = ""


SELECTORS: dict[str, Selector] = {}


def register_selector(name: str, *, needs_embeddings: bool = False, describe: str = ""):
    def wrap(fn):
        if name in SELECTORS:
            raise ValueError(f"selector {name!r} registered twice")
        SELECTORS[name] = Selector(name, fn, needs_embeddings, describe or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


def get_selector(name: str) -> Selector:
    if name not in SELECTORS:
        import difflib

        close = difflib.get_close_matches(name, list(SELECTORS), n=1)
        raise HoneError(f"unknown example selector {name!r}", where="selector",
                        fix=(f"did you mean {close[0]!r}? " if close else "") + f"selectors: {', '.join(SELECTORS)}")
    return SELECTORS[name]


# ------------------------------------------------------------------------------------------------ helpers


def _rng(seed: int, query: str | None) -> random.Random:
    """A generator seeded by the seed and the query's text: the same query gets the same draw in any order."""
    return random.Random(seed * 1_000_003 + zlib.crc32((query or "").encode("utf-8")))


def _candidates(query: str | None, pool: DemoPool) -> list[int]:
    return [i for i, q in enumerate(pool.queries) if query is None or q != query]


def _top_k(scores: np.ndarray, allowed: list[int], k: int) -> list[int]:
    """The k best of `allowed` by score (ties to the lower index), returned least relevant first."""
    ranked = sorted(allowed, key=lambda i: (-scores[i], i))[:k]
    return ranked[::-1]


# ------------------------------------------------------------------------------------------------ selectors


@register_selector("random", describe="k pool examples at random (seeded)")
def select_random(queries, pool: DemoPool, k: int, *, seed: int = 0, **_) -> list[list[int]]:
    """k examples drawn at random; the draw depends on the seed and the query's text."""
    return [_rng(seed, q).sample(_candidates(q, pool), min(k, len(_candidates(q, pool)))) for q in queries]


@register_selector("balanced", describe="k random examples with the labels as even as possible")
def select_balanced(queries, pool: DemoPool, k: int, *, seed: int = 0, **_) -> list[list[int]]:
    """Round-robin over the labels (in a random label order), a random example of each; interleaving keeps
    the last demonstration's label from being always the same (the recency bias of Zhao et al. 2021)."""
    out = []
    for q in queries:
        rng = _rng(seed, q)
        by_label: dict[str, list[int]] = defaultdict(list)
        for i in _candidates(q, pool):
            by_label[pool.answers[i]].append(i)
        labels = sorted(by_label)
        rng.shuffle(labels)
        for label in labels:
            rng.shuffle(by_label[label])
        picked: list[int] = []
        while len(picked) < k and any(by_label[label] for label in labels):
            for label in labels:
                if by_label[label] and len(picked) < k:
                    picked.append(by_label[label].pop())
        out.append(picked)
    return out


@register_selector("bm25", describe="k lexical nearest neighbours (BM25)")
def select_bm25(queries, pool: DemoPool, k: int, *, k1: float = 1.5, b: float = 0.75, **_) -> list[list[int]]:
    """The k pool examples with the highest BM25 score against the query (for a fixed set: against the whole
    pool, i.e. the examples sharing the most common vocabulary)."""
    index = BM25(pool.queries, k1=k1, b=b)
    out = []
    for q in queries:
        text = q if q is not None else " ".join(pool.queries)
        out.append(_top_k(np.asarray(index.scores(text)), _candidates(q, pool), k))
    return out


def _pool_and_query_vectors(queries, pool: DemoPool, encoder) -> tuple[np.ndarray, np.ndarray]:
    """Centred, re-normalised embeddings: mean-pooled LM states share a large common direction, and removing the
    pool's mean makes cosine similarity reflect what differs between texts (Ethayarajh 2019; Su et al. 2021)."""
    if encoder is None:
        raise HoneError("this selector needs sentence embeddings and no encoder was given",
                        fix="evaluate through honellm.evaluation.evaluate, which builds one from the model")
    pool_vectors = encoder(pool.queries)
    center = pool_vectors.mean(axis=0, keepdims=True)
    known = [q for q in queries if q is not None]
    query_vectors = encoder(known) if known else np.zeros((0, pool_vectors.shape[1]), dtype=np.float32)

    def norm(x):
        x = x - center
        return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-8, None)

    pool_vectors = norm(pool_vectors)
    rows, j = [], 0
    for q in queries:
        if q is None:  # a fixed set: the centroid of the (centred) pool
            centroid = pool_vectors.mean(axis=0)
            rows.append(centroid / max(float(np.linalg.norm(centroid)), 1e-8))
        else:
            rows.append(norm(query_vectors[j:j + 1])[0])
            j += 1
    return pool_vectors, np.stack(rows) if rows else np.zeros((0, pool_vectors.shape[1]))


@register_selector("embedding", needs_embeddings=True, describe="k nearest neighbours by embedding cosine")
def select_embedding(queries, pool: DemoPool, k: int, *, encoder=None, **_) -> list[list[int]]:
    """The k pool examples whose embeddings are closest (cosine) to the query's."""
    pool_vectors, query_vectors = _pool_and_query_vectors(queries, pool, encoder)
    similarities = query_vectors @ pool_vectors.T
    return [_top_k(similarities[n], _candidates(q, pool), k) for n, q in enumerate(queries)]


@register_selector("mmr", needs_embeddings=True, describe="maximal marginal relevance: relevant yet diverse")
def select_mmr(queries, pool: DemoPool, k: int, *, encoder=None, diversity: float = 0.3, fetch: int = 50,
               **_) -> list[list[int]]:
    """Greedy MMR: next = argmax (1 - diversity) * sim(query, d) - diversity * max sim(d, already picked),
    over the `fetch` nearest candidates (Carbonell & Goldstein 1998)."""
    pool_vectors, query_vectors = _pool_and_query_vectors(queries, pool, encoder)
    similarities = query_vectors @ pool_vectors.T
    out = []
    for n, q in enumerate(queries):
        relevance = similarities[n]
        candidates = sorted(_candidates(q, pool), key=lambda i: (-relevance[i], i))[:max(fetch, k)]
        picked = _mmr_order(relevance, pool_vectors, candidates, k, diversity)
        out.append(picked[::-1])  # the most relevant (picked first) ends up last, nearest the query
    return out


def _mmr_order(relevance: np.ndarray, vectors: np.ndarray, candidates: list[int], k: int,
               diversity: float) -> list[int]:
    """Greedy MMR picks, in the order picked (most relevant first)."""
    picked: list[int] = []
    redundancy: dict[int, float] = {}  # a candidate's highest similarity to an example already picked
    candidates = list(candidates)
    while candidates and len(picked) < k:
        gains = {i: (1 - diversity) * float(relevance[i]) - diversity * redundancy.get(i, 0.0) for i in candidates}
        best = max(candidates, key=lambda i: (gains[i], -i))
        picked.append(best)
        candidates.remove(best)
        for i in candidates:
            similarity = float(vectors[i] @ vectors[best])
            redundancy[i] = max(redundancy.get(i, similarity), similarity)
    return picked


# ------------------------------------------------------------------------------------------------ entry point


def select_indices(spec, queries: list[str | None], pool: DemoPool, *, model=None, tokenizer=None, seed: int = 0,
                   encoder=None) -> list[list[int]]:
    """Run the selector `spec` names over `pool` for each query; builds an embedding encoder when needed."""
    selector = get_selector(spec.name)
    if spec.k == 0 or len(pool) == 0:
        return [[] for _ in queries]
    params = dict(spec.params)
    if selector.needs_embeddings and encoder is None:
        encoder = make_encoder(params, model, tokenizer)
    for key in ("embedding_model", "layer"):
        params.pop(key, None)
    return selector.fn(queries, pool, spec.k, seed=seed, encoder=encoder, **params)


def make_encoder(params: dict, model, tokenizer):
    """The encoder a selector spec asks for: `embedding_model: PATH`, else the base model (`layer` optional)."""
    from honellm.runtime.embeddings import TextEncoder

    if params.get("embedding_model"):
        return TextEncoder.from_path(params["embedding_model"])
    if model is None:
        raise HoneError("embedding selection needs a model to embed with", fix="pass the model (or embedding_model)")
    return TextEncoder(model, tokenizer, layer=params.get("layer"))


def select_demonstrations(spec, task, program, records: list[dict], pool_records: list[dict], *, model=None,
                          tokenizer=None, seed: int = 0, encoder=None) -> list[list]:
    """The demonstrations for each record, selected per query from `pool_records` (the evaluator's hook)."""
    from honellm.program import Demonstration

    pool = DemoPool.build(task, program, pool_records)
    queries = [query_text(task, program, r) for r in records]
    chosen = select_indices(spec, queries, pool, model=model, tokenizer=tokenizer, seed=seed, encoder=encoder)
    return [[Demonstration(query=pool.queries[i], answer=pool.answers[i]) for i in idx] for idx in chosen]


def build_selector(spec, pool_records: list[dict], *, task, program, model=None, tokenizer=None,
                   seed: int = 0, encoder=None) -> Callable[[str], list]:
    """A per-query picker for serving: `(query text) -> demonstrations` over `pool_records`.

    The pool is rendered (and, for embedding selectors, embedded) once; each call selects for one query the way
    the evaluator does, so a served artifact shows the demonstrations `hone eval` scored it with.
    """
    from honellm.program import Demonstration

    task.format_for(pool_records)  # the pool's own records fix the format: the task's data files may be elsewhere
    pool = DemoPool.build(task, program, pool_records)
    selector = get_selector(spec.name)
    if selector.needs_embeddings and encoder is None:
        encoder = make_encoder(dict(spec.params), model, tokenizer)

    def pick(query: str) -> list:
        idx = select_indices(spec, [query], pool, model=model, tokenizer=tokenizer, seed=seed, encoder=encoder)[0]
        return [Demonstration(query=pool.queries[i], answer=pool.answers[i]) for i in idx]

    return pick


def select_fixed_demonstrations(spec, task, program, pool_records: list[dict], *, model=None, tokenizer=None,
                                seed: int = 0, encoder=None) -> list:
    """One set of demonstrations for every query (stored in the program, so its KV prefix is shared)."""
    from honellm.program import Demonstration

    pool = DemoPool.build(task, program, pool_records)
    idx = select_indices(spec, [None], pool, model=model, tokenizer=tokenizer, seed=seed, encoder=encoder)[0]
    return [Demonstration(query=pool.queries[i], answer=pool.answers[i]) for i in idx]
