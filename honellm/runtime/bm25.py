"""Okapi BM25 (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework: BM25 and Beyond"), for
lexical nearest-neighbour demonstration selection. Short on purpose: no stemming, no stop words.

score(q, d) = sum over terms t of q:  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
idf(t) = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5))     (Lucene's variant: never negative)
"""

from __future__ import annotations

import math
import re
from collections import Counter

_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(str(text).lower())


class BM25:
    """An index over `documents`; `scores(query)` gives one relevance score per document."""

    def __init__(self, documents: list[str], *, k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.term_counts = [Counter(tokenize(d)) for d in documents]
        self.lengths = [sum(c.values()) for c in self.term_counts]
        self.avgdl = (sum(self.lengths) / len(self.lengths)) if self.lengths else 0.0
        df: Counter = Counter()
        for counts in self.term_counts:
            df.update(counts.keys())
        n = len(documents)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        # postings: term -> [(document index, term frequency)], so a query touches only documents sharing a term
        self.postings: dict[str, list[tuple[int, int]]] = {}
        for i, counts in enumerate(self.term_counts):
            for t, f in counts.items():
                self.postings.setdefault(t, []).append((i, f))

    def scores(self, query: str) -> list[float]:
        out = [0.0] * len(self.term_counts)
        avgdl = self.avgdl or 1.0
        for term, qf in Counter(tokenize(query)).items():
            idf = self.idf.get(term)
            if idf is None:
                continue
            for i, tf in self.postings[term]:
                norm = tf + self.k1 * (1 - self.b + self.b * self.lengths[i] / avgdl)
                out[i] += qf * idf * tf * (self.k1 + 1) / norm
        return out
