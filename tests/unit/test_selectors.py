"""Each example selector picks the right examples on a small fixture; BM25 against a hand computation."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from honellm.errors import HoneError
from honellm.program import SelectorSpec
from honellm.runtime.bm25 import BM25
from honellm.runtime.selectors import SELECTORS, DemoPool, get_selector, register_selector, select_indices

TEXTS = [
    "my card was charged twice for the order",      # 0 billing
    "refund the double charge on my card",          # 1 billing
    "the invoice shows the wrong amount",           # 2 billing
    "the app crashes when I open it",               # 3 technical
    "error message when the app starts",            # 4 technical
    "my parcel has not arrived yet",                 # 5 shipping
    "where is my parcel, the delivery is late",     # 6 shipping
    "I cannot log in to my account",                # 7 account
]
LABELS = ["billing", "billing", "billing", "technical", "technical", "shipping", "shipping", "account"]
TOPIC = [0, 0, 0, 1, 1, 2, 2, 3]


@pytest.fixture
def pool():
    return DemoPool(records=[{"text": t, "label": lab} for t, lab in zip(TEXTS, LABELS, strict=True)],
                    queries=list(TEXTS), answers=list(LABELS))


class TopicEncoder:
    """A stand-in embedding: a one-hot vector of each text's topic (queries name their topic in a table)."""

    def __init__(self, extra: dict[str, int] | None = None):
        self.topic = dict(zip(TEXTS, TOPIC, strict=True)) | (extra or {})

    def __call__(self, texts):
        return np.stack([np.eye(4, dtype=np.float32)[self.topic[t]] for t in texts])


def spec(name, k, **params):
    return SelectorSpec(name=name, k=k, params=params)


def test_registry():
    assert set(SELECTORS) >= {"random", "balanced", "bm25", "embedding", "mmr"}
    with pytest.raises(ValueError, match="twice"):
        register_selector("bm25")(lambda *a, **k: [])
    with pytest.raises(HoneError, match="did you mean 'bm25'"):
        get_selector("bm52")


def test_random_is_seeded_by_query_and_never_picks_the_query_itself(pool):
    a = select_indices(spec("random", 3), [TEXTS[0], "another query"], pool, seed=1)
    b = select_indices(spec("random", 3), ["another query", TEXTS[0]], pool, seed=1)
    assert a[0] == b[1] and a[1] == b[0]  # the same query gets the same draw in any order
    assert 0 not in a[0] and len(set(a[0])) == 3
    draws = {tuple(select_indices(spec("random", 3), ["another query"], pool, seed=s)[0]) for s in range(5)}
    assert len(draws) > 1  # the seed matters
    assert select_indices(spec("random", 0), ["q"], pool) == [[]]


def test_balanced_spreads_the_labels_evenly(pool):
    for seed in range(5):
        (picked,) = select_indices(spec("balanced", 4), ["q"], pool, seed=seed)
        assert sorted(pool.answers[i] for i in picked) == ["account", "billing", "shipping", "technical"]
        (picked,) = select_indices(spec("balanced", 6), ["q"], pool, seed=seed)
        counts = Counter(pool.answers[i] for i in picked)
        assert max(counts.values()) - min(counts.values()) <= 1
        assert len(picked) == 6 and len(set(picked)) == 6


def test_bm25_scores_by_hand():
    docs = ["a b", "a c c", "d"]
    index = BM25(docs, k1=1.5, b=0.75)
    # df(c) = 1, N = 3 -> idf = ln(1 + 2.5 / 1.5); doc 1: tf 2, |d| = 3, avgdl = 2
    idf = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    expected = idf * 2 * 2.5 / (2 + 1.5 * (1 - 0.75 + 0.75 * 3 / 2))
    scores = index.scores("c")
    assert scores[1] == pytest.approx(expected) and scores[0] == 0 and scores[2] == 0
    # "a" in two documents: the shorter one scores higher at equal tf
    a = index.scores("a")
    assert a[0] > a[1] > 0 == a[2]


def test_bm25_picks_lexical_neighbours_most_relevant_last(pool):
    (picked,) = select_indices(spec("bm25", 2), ["the parcel delivery is late"], pool)
    assert set(picked) == {5, 6} and picked[-1] == 6  # doc 6 shares parcel, delivery, is, late
    (picked,) = select_indices(spec("bm25", 3), ["charged on my card twice"], pool)
    assert picked[-1] == 0 and set(picked[-2:]) == {0, 1}


def test_embedding_picks_nearest_neighbours(pool):
    encoder = TopicEncoder({"q-ship": 2, "q-tech": 1})
    picked = select_indices(spec("embedding", 2), ["q-ship", "q-tech"], pool, encoder=encoder)
    assert set(picked[0]) == {5, 6} and set(picked[1]) == {3, 4}


def test_mmr_trades_relevance_for_diversity(pool):
    encoder = TopicEncoder({"q-bill": 0})
    (nearest,) = select_indices(spec("embedding", 3), ["q-bill"], pool, encoder=encoder)
    (diverse,) = select_indices(spec("mmr", 3, diversity=0.7), ["q-bill"], pool, encoder=encoder)
    assert {TOPIC[i] for i in nearest} == {0}
    assert len({TOPIC[i] for i in diverse}) == 3 and TOPIC[diverse[-1]] == 0  # most relevant still last
    (pure,) = select_indices(spec("mmr", 3, diversity=0.0), ["q-bill"], pool, encoder=encoder)
    assert set(pure) == set(nearest)  # without the diversity term MMR is nearest neighbours


def test_fixed_set_for_all_queries(pool):
    encoder = TopicEncoder()
    (typical,) = select_indices(spec("embedding", 3), [None], pool, encoder=encoder)
    assert {TOPIC[i] for i in typical} == {0}  # the most common topic is nearest the pool's centroid
    (fixed,) = select_indices(spec("balanced", 4), [None], pool, seed=0)
    assert len({pool.answers[i] for i in fixed}) == 4


def test_select_demonstrations_renders_the_template(tiny_model):
    from honellm.program import PromptProgram
    from honellm.runtime.selectors import select_demonstrations
    from honellm.task import Task

    task = Task.load("intents")
    program = PromptProgram.from_task(task).model_copy(update={"selector": spec("bm25", 2)})
    train = task.split("train")
    demos = select_demonstrations(program.selector, task, program, task.split("validation")[:2], train)
    assert len(demos) == 2 and all(len(d) == 2 for d in demos)
    for d in demos[0]:
        assert d.query.startswith("Message: ") and d.answer in task.config.choices


def test_text_encoder_on_the_tiny_model(tiny_model):
    from honellm.runtime.embeddings import TextEncoder

    model, tok = tiny_model
    encoder = TextEncoder(model, tok)
    vectors = encoder(["hello there", "a much longer sentence about billing", "hello there"])
    assert vectors.shape[0] == 3 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(vectors[0], vectors[2]) and len(encoder.cache) == 2
    # padding must not change a text's vector: alone or beside a longer text, the same
    alone = TextEncoder(model, tok)(["hello there"])
    assert np.allclose(alone[0], vectors[0], atol=1e-5)
