"""Localisation statistics of knowledge neurons (Niu et al. 2024, §3-4).

Pure functions on attribution tensors and knowledge-neuron sets:

* :func:`mean_kn_count` - mean number of KNs per fact (after the adaptive
  refinement of :func:`kncore.refine`, which targets [2, 5]);
* :func:`mean_threshold` - mean final sharing threshold p (the paper's tau);
* :func:`r1_squared` - the n-sample similarity of attribution vectors;
* :func:`layer_counts` / :func:`plot_layer_distribution` - where the KNs are.

KN sets are :class:`kncore.selection.KNSet`, sets/lists of ``(layer,
index)`` pairs or ``[k, 2]`` tensors; a :class:`kncore.selection.Refined`
(one relation or paradigm) stands for its sets and its p.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .lm import InputError
from .plots import plot_layer_distribution  # noqa: F401 - re-exported; the figure lives with the others


def _sets(kn) -> list:
    """A list of KN sets from a Refined, one set, or a list of sets."""
    from .selection import KNSet

    if hasattr(kn, "sets") and hasattr(kn, "p"):  # a Refined
        return list(kn.sets)
    if isinstance(kn, KNSet) or torch.is_tensor(kn):
        return [KNSet.of(kn)]
    return [KNSet.of(s) for s in kn]


def mean_kn_count(kn_sets) -> float:
    """Mean number of knowledge neurons per fact.

    ``kn_sets``: a Refined, a list of KN sets (one per fact), or a list of
    Refined (relations or paradigms; the mean is over all their facts).
    """
    sets = _flatten(kn_sets)
    if not sets:
        raise InputError("no KN sets given")
    return sum(len(s) for s in sets) / len(sets)


def _flatten(kn_sets) -> list:
    if isinstance(kn_sets, (list, tuple)) and kn_sets and all(hasattr(r, "sets") and hasattr(r, "p")
                                                              for r in kn_sets):
        return [s for r in kn_sets for s in _sets(r)]
    return _sets(kn_sets)


def mean_threshold(refined: Sequence) -> float:
    """Mean final sharing threshold p (tau) over Refined results (e.g. one per
    relation or paradigm), or over plain numbers."""
    if hasattr(refined, "p") and hasattr(refined, "sets"):
        refined = [refined]
    ps = [float(r.p) if hasattr(r, "p") else float(r) for r in refined]
    if not ps:
        raise InputError("no thresholds given")
    return sum(ps) / len(ps)


def _matrix(attributions) -> torch.Tensor:
    if hasattr(attributions, "scores") and not torch.is_tensor(attributions):  # an Attribution
        attributions = attributions.scores
    x = torch.as_tensor(attributions)
    if x.dim() < 2:
        raise InputError(f"attributions must be [n, ...] with n samples, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).double()


def r1_squared(attributions) -> float:
    """The n-sample similarity R1^2 of attribution vectors.

    ``attributions``: ``[n, n_layers, d_ff]`` or ``[n, n_layers * d_ff]`` (or
    an ``Attribution``): one attribution vector per prompt. Each row is
    scaled to unit length; with s1 the largest singular value of the
    resulting n x m matrix, R1^2 = (s1^2 - 1) / (n - 1): 1 when all vectors
    point the same way, 0 when they are mutually orthogonal. (s1^2 is the
    largest eigenvalue of the n x n Gram matrix, which is how it is computed:
    n is small and m = n_layers * d_ff is not.)
    """
    x = _matrix(attributions)
    n = x.shape[0]
    if n < 2:
        raise InputError(f"R1^2 needs at least 2 vectors, got {n}")
    norms = x.norm(dim=1)
    if (norms == 0).any():
        bad = (norms == 0).nonzero().flatten().tolist()
        raise InputError(f"attribution vector(s) {bad} are all zero; R1^2 needs a direction for each")
    if not torch.isfinite(x).all():
        raise InputError("attributions contain NaN or infinity")
    u = x / norms[:, None]
    s1_sq = torch.linalg.eigvalsh(u @ u.T)[-1].item()
    return (s1_sq - 1.0) / (n - 1)


def mean_r1_squared(groups: Sequence) -> float:
    """Mean R1^2 over groups of attribution vectors (e.g. one group per fact:
    its paraphrases' vectors; groups with fewer than 2 vectors are skipped)."""
    vals = [r1_squared(g) for g in groups if _matrix(g).shape[0] >= 2]
    if not vals:
        raise InputError("no group has at least 2 attribution vectors")
    return sum(vals) / len(vals)


def layer_counts(kn_sets, n_layers: int) -> list[int]:
    """Number of knowledge neurons in each layer, over all the sets given."""
    counts = [0] * n_layers
    for s in _flatten(kn_sets):
        for layer, _ in s:
            if not 0 <= layer < n_layers:
                raise InputError(f"neuron in layer {layer}, outside 0..{n_layers - 1}")
            counts[layer] += 1
    return counts


def localisation_row(name: str, refined, attributions=None) -> dict:
    """One table row: ``{"task", "n_facts", "kn", "tau", "r1_sq"}`` for a task
    (relation or paradigm). ``refined``: a Refined or a list of them;
    ``attributions``: per-fact groups of attribution vectors for R1^2 (None
    leaves it out)."""
    rs = refined if isinstance(refined, (list, tuple)) else [refined]
    row = {"task": name, "n_facts": len(_flatten(rs)), "kn": mean_kn_count(rs), "tau": mean_threshold(rs)}
    if attributions is not None:
        row["r1_sq"] = mean_r1_squared(attributions)
    return row
