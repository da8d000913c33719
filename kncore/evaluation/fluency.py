"""Fluency of generations: MEMIT's weighted n-gram entropy (Meng et al. 2023).

MEMIT's CounterFact evaluation (``compute_n_gram_entropy``) scores a text by
the Shannon entropy (bits) of its bigram and trigram frequency distributions,
weighted 2/3 and 4/3 and averaged; a set of texts scores the mean over its
texts. A model that collapses into repeating itself scores low.

Differences from MEMIT, on purpose:

* words are split by a regular expression (runs of letters and digits with an
  inner apostrophe, or single punctuation marks) instead of NLTK's Treebank
  tokenizer, so kncore needs no NLTK; the two agree on plain prose and differ
  on contractions ("don't" is one word here, two for NLTK);
* :func:`generation_entropy` generates greedily (deterministic, so a resumed
  sequential run measures the same texts); MEMIT's ``generate_fast`` samples
  from the top 5 tokens. Both stop at ``max_out_len`` tokens in all, prompt
  included (MEMIT: 100).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_WORD = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
NS = (2, 3)
WEIGHTS = (2 / 3, 4 / 3)


def words(text: str) -> list[str]:
    """The words and punctuation marks of ``text``, in order."""
    return _WORD.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = NS, weights: Sequence[float] = WEIGHTS) -> float:
    """MEMIT's score of one text: mean over n of weight_n x H(n-gram frequencies) in bits.
    A text shorter than n words has no n-grams; its H is 0 (MEMIT's numpy gives nan)."""
    toks = words(text)
    parts = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


def mean_ngram_entropy(texts: Sequence[str]) -> float:
    """Mean :func:`ngram_entropy` over texts (MEMIT's ``n_gram_entropy``, arithmetic mean)."""
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to score")
    return sum(ngram_entropy(t) for t in texts) / len(texts)


def generation_entropy(lm, prompts: Sequence[str], max_out_len: int = 100) -> tuple[float, list[str]]:
    """Greedy generations of ``prompts`` (``max_out_len`` tokens in all) and
    their mean n-gram entropy: ``(entropy, texts)``."""
    from ..rome.templates import generate

    texts = generate(lm, list(prompts), 1, max_out_len, top_k=1, seed=0)
    return mean_ngram_entropy(texts), texts


__all__ = ["words", "ngram_entropy", "mean_ngram_entropy", "generation_entropy"]
