"""From attribution scores to knowledge neurons (Dai et al. 2022, §3.3).

Two steps:

* :func:`select_coarse`: per prompt, keep the neurons whose score is above a
  threshold: ``t x max`` (adaptive; Dai et al. and Niu et al. use t = 0.2), an
  absolute value, or a percentile of that prompt's scores. The comparison is
  strict (``score > threshold``), as in ``knowledge-neurons``.
* :func:`refine`: per fact, keep the neurons found in the coarse sets of more
  than ``n x p`` of its n paraphrases. With ``p="adaptive"`` the sharing
  threshold p starts at 0.7 and moves by 0.05 until the mean number of
  knowledge neurons per fact lies in [2, 5] (Niu et al. 2024, ``run_kn_alg``).

Neurons are ``(layer, index)`` pairs; a :class:`KNSet` holds them with their
scores and converts to a tensor, a mask, a dict (JSON) or the
``knowledge-neurons`` ``[[layer, index], ...]`` list.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from . import validation as V
from .lm import InputError

DEFAULT_ADAPTIVE_THRESHOLD = 0.2  # Dai et al. 2022, Niu et al. 2024 (knowledge-neurons' docstring says 0.3)


@dataclass(frozen=True)
class KNSet:
    """A set of neurons ``(layer, index)``, sorted, with an optional score each.

    ``scores[i]`` belongs to ``neurons[i]`` (for coarse sets: the attribution
    score; for refined sets: the mean score over the paraphrases whose coarse
    set holds the neuron). ``counts[i]``, for refined sets, is in how many
    paraphrases the neuron was found.
    """

    neurons: tuple = ()
    scores: tuple | None = None
    counts: tuple | None = None

    def __post_init__(self):
        pairs = [(int(l), int(i)) for l, i in self.neurons]
        order = sorted(range(len(pairs)), key=lambda k: pairs[k])
        if len({pairs[k] for k in order}) != len(pairs):
            raise InputError("a KNSet cannot hold the same neuron twice")
        for name in ("scores", "counts"):
            vals = getattr(self, name)
            if vals is not None:
                if len(vals) != len(pairs):
                    raise InputError(f"{name} has {len(vals)} entries for {len(pairs)} neurons")
                cast = float if name == "scores" else int
                object.__setattr__(self, name, tuple(cast(vals[k]) for k in order))
        object.__setattr__(self, "neurons", tuple(pairs[k] for k in order))

    # -- set behaviour ---------------------------------------------------------
    def __len__(self) -> int:
        return len(self.neurons)

    def __iter__(self):
        return iter(self.neurons)

    def __contains__(self, neuron) -> bool:
        return tuple(int(x) for x in neuron) in self._index

    @property
    def _index(self) -> dict:
        idx = self.__dict__.get("_idx")
        if idx is None:
            idx = {n: k for k, n in enumerate(self.neurons)}
            object.__setattr__(self, "_idx", idx)
        return idx

    def score(self, neuron) -> float | None:
        """The score of one neuron (None when the set carries no scores)."""
        k = self._index.get(tuple(int(x) for x in neuron))
        if k is None:
            raise KeyError(f"neuron {tuple(neuron)} is not in this set")
        return None if self.scores is None else self.scores[k]

    def as_set(self) -> set:
        return set(self.neurons)

    @property
    def layers(self) -> list[int]:
        """The layers that hold at least one neuron, ascending."""
        return sorted({l for l, _ in self.neurons})

    def by_layer(self) -> dict[int, list[int]]:
        """``{layer: [index, ...]}``, indices ascending."""
        out: dict[int, list[int]] = {}
        for l, i in self.neurons:
            out.setdefault(l, []).append(i)
        return out

    # -- conversions -----------------------------------------------------------
    def to_tensor(self, device=None) -> torch.Tensor:
        """``[k, 2]`` long tensor of (layer, index) rows."""
        return torch.tensor(self.neurons, dtype=torch.long, device=device).reshape(-1, 2)

    def mask(self, n_layers: int, d_ff: int, device=None) -> torch.Tensor:
        """Boolean ``[n_layers, d_ff]`` mask of the set."""
        m = torch.zeros(n_layers, d_ff, dtype=torch.bool, device=device)
        if self.neurons:
            t = self.to_tensor(device)
            if t[:, 0].max() >= n_layers or t[:, 1].max() >= d_ff:
                raise InputError(f"neurons outside a [{n_layers}, {d_ff}] grid")
            m[t[:, 0], t[:, 1]] = True
        return m

    def to_list(self) -> list[list[int]]:
        """The ``knowledge-neurons`` format: ``[[layer, index], ...]``."""
        return [[l, i] for l, i in self.neurons]

    def to_dict(self) -> dict:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        d = {"neurons": self.to_list()}
        if self.scores is not None:
            d["scores"] = list(self.scores)
        if self.counts is not None:
            d["counts"] = list(self.counts)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "KNSet":
        return cls(tuple(tuple(n) for n in d["neurons"]), d.get("scores"), d.get("counts"))

    @classmethod
    def of(cls, neurons) -> "KNSet":
        """Coerce a KNSet, a set/list of pairs or a ``[k, 2]`` tensor."""
        if isinstance(neurons, KNSet):
            return neurons
        if torch.is_tensor(neurons):
            if neurons.numel() and (neurons.dim() != 2 or neurons.shape[1] != 2):
                raise InputError(f"a neuron tensor must be [k, 2], got {tuple(neurons.shape)}")
            neurons = neurons.reshape(-1, 2).tolist()
        pairs = []
        for n in neurons:
            if isinstance(n, (str, bytes)) or len(n) != 2:
                raise InputError(f"a neuron is a (layer, index) pair, got {n!r}")
            # integers only: int(5.5) would quietly patch neuron 5
            pairs.append((V.check("layer", n[0], f"neuron {tuple(n)!r}: layer"),
                          V.check("neuron", n[1], f"neuron {tuple(n)!r}: index")))
        return cls(tuple(dict.fromkeys(pairs)))

    def __repr__(self):
        shown = ", ".join(f"({l}, {i})" for l, i in self.neurons[:8])
        more = f", ... {len(self) - 8} more" if len(self) > 8 else ""
        return f"KNSet([{shown}{more}])"


# -- coarse selection ------------------------------------------------------------
def _scores_and_layers(scores, layers):
    if hasattr(scores, "scores") and not torch.is_tensor(scores):  # an Attribution
        if layers is None:
            layers = getattr(scores, "layers", None)
        scores = scores.scores
    scores = torch.as_tensor(scores)
    if scores.dim() not in (2, 3):
        raise InputError(f"scores must be [n_layers, d_ff] or [n_prompts, n_layers, d_ff], "
                         f"got shape {tuple(scores.shape)}")
    n_l = scores.shape[-2]
    layers = list(range(n_l)) if layers is None else [int(l) for l in layers]
    if len(layers) != n_l:
        raise InputError(f"{len(layers)} layer numbers given for scores with {n_l} layers")
    return scores, layers


def coarse_threshold(scores: torch.Tensor, *, adaptive_threshold=None, threshold=None,
                     percentile=None) -> float:
    """The score a neuron must exceed in one prompt's ``[n_layers, d_ff]`` scores."""
    given = sum(x is not None for x in (adaptive_threshold, threshold, percentile))
    if given != 1:
        raise InputError("give exactly one of adaptive_threshold=, threshold= or percentile=")
    if torch.isnan(scores).any():
        raise InputError("attribution scores contain NaN")
    if adaptive_threshold is not None:
        return scores.max().item() * adaptive_threshold
    if threshold is not None:
        return float(threshold)
    if not 0 <= percentile <= 100:
        raise InputError(f"percentile must be in [0, 100], got {percentile}")
    # numpy's linear interpolation on the float32 scores, as knowledge-neurons does.
    return float(np.percentile(scores.detach().flatten().float().cpu().numpy(), percentile))


def select_coarse(scores, *, adaptive_threshold: float | None = None, threshold: float | None = None,
                  percentile: float | None = None, layers: Sequence[int] | None = None):
    """Coarse knowledge neurons of one prompt or of each prompt of a batch.

    ``scores``: ``[n_layers, d_ff]`` (returns one :class:`KNSet`),
    ``[n, n_layers, d_ff]`` or an ``Attribution`` (returns a list, one per
    prompt). Exactly one rule, applied per prompt: ``adaptive_threshold=t``
    keeps ``score > t * max(score)`` (the default, t = 0.2),
    ``threshold=v`` keeps ``score > v``, ``percentile=q`` keeps scores above
    the q-th percentile of that prompt's scores. ``layers`` names the model
    layer of each score row (default: ``Attribution.layers`` or 0..n-1).
    """
    if adaptive_threshold is not None:
        V.check("adaptive_threshold", adaptive_threshold)
    if adaptive_threshold is None and threshold is None and percentile is None:
        adaptive_threshold = DEFAULT_ADAPTIVE_THRESHOLD
    s, layer_ids = _scores_and_layers(scores, layers)
    single = s.dim() == 2
    s3 = s[None] if single else s
    out = []
    lid = torch.tensor(layer_ids, dtype=torch.long)
    for one in s3:
        one = one.detach()
        thr = coarse_threshold(one, adaptive_threshold=adaptive_threshold, threshold=threshold,
                               percentile=percentile)
        idx = torch.nonzero(one > thr).cpu()
        vals = one[idx[:, 0], idx[:, 1]].float().cpu().tolist() if len(idx) else []
        pairs = list(zip(lid[idx[:, 0]].tolist(), idx[:, 1].tolist()))
        out.append(KNSet(tuple(pairs), tuple(vals)))
    return out[0] if single else out


# -- refinement -----------------------------------------------------------------------
@dataclass
class Refined:
    """Knowledge neurons of each fact, and the sharing threshold that chose them.

    ``p`` is the final sharing threshold (the paper's tau): a neuron is kept
    when more than ``n x p`` of a fact's n paraphrases have it in their coarse
    set. ``history`` lists every ``(p, mean count)`` tried, in order.
    """

    sets: list                # one KNSet per fact
    p: float
    mean_count: float
    converged: bool = True    # False: the adaptive search stopped outside the target range
    history: list = field(default_factory=list)
    negative_p: float | None = None

    def __len__(self):
        return len(self.sets)

    def __getitem__(self, i) -> KNSet:
        return self.sets[i]

    def counts(self) -> list[int]:
        return [len(s) for s in self.sets]

    def to_dict(self) -> dict:
        return {"p": self.p, "mean_count": self.mean_count, "converged": self.converged,
                "history": [list(h) for h in self.history], "negative_p": self.negative_p,
                "sets": [s.to_dict() for s in self.sets]}

    @classmethod
    def from_dict(cls, d: dict) -> "Refined":
        return cls([KNSet.from_dict(s) for s in d["sets"]], d["p"], d["mean_count"], d["converged"],
                   [tuple(h) for h in d["history"]], d.get("negative_p"))


def _coerce_coarse(c) -> tuple[dict, bool]:
    """A coarse set as {neuron: score or None}."""
    if isinstance(c, KNSet):
        sc = c.scores
        return {n: (None if sc is None else sc[k]) for k, n in enumerate(c.neurons)}, sc is not None
    if isinstance(c, dict):
        raise InputError("a coarse set is a KNSet, a set or a list of (layer, index) pairs, not a dict")
    return {n: None for n in KNSet.of(c).neurons}, False


class _Fact:
    """Counts of one fact's coarse sets, so each p costs one pass over a dict."""

    def __init__(self, coarse, negatives):
        if isinstance(coarse, (KNSet, set, frozenset)) or torch.is_tensor(coarse):
            raise InputError("refine() takes a list of facts, each a list of coarse sets "
                             "(one per paraphrase); got a single coarse set")
        coarse = list(coarse)
        if not coarse:
            raise InputError("a fact has no coarse sets (no paraphrases)")
        self.n = len(coarse)
        self.count: dict = {}
        self.score_sum: dict = {}
        self.score_n: dict = {}
        for c in coarse:
            d, _ = _coerce_coarse(c)
            for nrn, sc in d.items():
                self.count[nrn] = self.count.get(nrn, 0) + 1
                if sc is not None:
                    self.score_sum[nrn] = self.score_sum.get(nrn, 0.0) + sc
                    self.score_n[nrn] = self.score_n.get(nrn, 0) + 1
        self.neg_count: dict = {}
        self.n_neg = 0
        if negatives is not None:
            negatives = list(negatives)
            self.n_neg = len(negatives)
            for c in negatives:
                for nrn in _coerce_coarse(c)[0]:
                    self.neg_count[nrn] = self.neg_count.get(nrn, 0) + 1
        self.has_scores = bool(self.score_n)

    def refined(self, p: float, negative_p: float) -> KNSet:
        t = self.n * p
        keep = [n for n, c in self.count.items() if c > t]
        if self.n_neg:
            tn = self.n_neg * negative_p
            keep = [n for n in keep if self.neg_count.get(n, 0) <= tn]
        scores = None
        if self.has_scores:
            scores = tuple(self.score_sum[n] / self.score_n[n] if n in self.score_n else math.nan
                           for n in keep)
        return KNSet(tuple(keep), scores, tuple(self.count[n] for n in keep))


def refine(coarse_sets_per_fact: Sequence[Sequence], p: float | str = 0.7, *,
           target: tuple[float, float] = (2, 5), step: float = 0.05, max_iter: int = 20,
           p0: float = 0.7, negatives: Sequence[Sequence] | None = None,
           negative_p: float = 0.0) -> Refined:
    """Refined knowledge neurons of each fact from its paraphrases' coarse sets.

    ``coarse_sets_per_fact[f]`` lists fact f's coarse sets, one per paraphrase
    (each a :class:`KNSet`, a set or a list of ``(layer, index)`` pairs). A
    neuron is kept for fact f when ``count > n_f * p``: more than a fraction p
    of its n_f paraphrases have it (knowledge-neurons' rule).

    ``p="adaptive"``: the search of Dai et al. as coded by Niu et al. (their
    ``run_kn_alg``), over the whole set of facts (a relation or a BLiMP
    paradigm): start at ``p0`` = 0.7; while the mean number of neurons per fact
    is above ``target[1]`` raise p by ``step``, below ``target[0]`` lower it,
    at most ``max_iter`` values of p in all (20, as in their code). The search
    also stops when p would leave [0, 1), and when the mean jumps across the
    whole target range between two neighbouring values of p (it would only
    oscillate); it then keeps the p whose mean is nearer the range (the larger
    p on a tie). Values of p are ``p0 + k * step`` rounded to 10 decimals, so
    0.65 is exactly 0.65 (Niu et al.'s ``p -= 0.05`` drifts to
    0.6499999999999999, which keeps a neuron found in exactly 13 of 20
    paraphrases; here it is not kept).

    ``negatives[f]`` (optional) lists coarse sets of fact f's negative prompts:
    a neuron is then dropped when it is in more than ``negative_p`` of them
    (default 0: in any). This is what knowledge-neurons' later
    ``get_refined_neurons(negative_examples=...)`` documents ("any neuron that
    appears in these examples will be excluded"); its code compares whole
    lists and never drops anything. Counts for the adaptive search are taken
    after this filter.
    """
    facts_in = list(coarse_sets_per_fact)
    if not facts_in:
        raise InputError("no facts given")
    if negatives is not None:
        negatives = list(negatives)
        if len(negatives) != len(facts_in):
            raise InputError(f"negatives has {len(negatives)} entries for {len(facts_in)} facts")
    if not 0 <= negative_p < 1:
        raise InputError(f"negative_p must be in [0, 1), got {negative_p}")
    facts = [_Fact(c, None if negatives is None else negatives[i]) for i, c in enumerate(facts_in)]

    def evaluate(pv):
        sets = [f.refined(pv, negative_p) for f in facts]
        return sets, sum(len(s) for s in sets) / len(sets)

    neg = None if negatives is None else negative_p
    if not isinstance(p, str):
        if not 0 <= p < 1:
            raise InputError(f"p must be in [0, 1), got {p}")
        sets, mean = evaluate(float(p))
        return Refined(sets, float(p), mean, True, [(float(p), mean)], neg)
    if p != "adaptive":
        raise InputError(f"p must be a float in [0, 1) or 'adaptive', got {p!r}")
    lo, hi = target
    if not (0 <= lo <= hi):
        raise InputError(f"target must be (low, high) with 0 <= low <= high, got {target}")
    if step <= 0 or max_iter < 1 or not 0 <= p0 < 1:
        raise InputError("need step > 0, max_iter >= 1 and 0 <= p0 < 1")

    def dist(m):
        return lo - m if m < lo else (m - hi if m > hi else 0.0)

    tried: dict = {}  # k -> (p, sets, mean)
    history = []
    k = 0
    while True:
        pv = round(p0 + k * step, 10)
        sets, mean = evaluate(pv)
        tried[k] = (pv, sets, mean)
        history.append((pv, mean))
        if lo <= mean <= hi:
            return Refined(sets, pv, mean, True, history, neg)
        nk = k + 1 if mean > hi else k - 1
        npv = round(p0 + nk * step, 10)
        if nk in tried or len(tried) >= max_iter or not 0 <= npv < 1:
            break
        k = nk
    best = k
    if nk in tried:  # jumped across the range: take the nearer side, the larger p on a tie
        a, b = sorted((k, nk))
        best = a if dist(tried[a][2]) < dist(tried[b][2]) else b
    pv, sets, mean = tried[best]
    return Refined(sets, pv, mean, False, history, neg)
