"""Measurements of the paper: minimal-pair accuracy, probability changes under
a knowledge-neuron edit, and the evaluation of an edit (ROME or KN).

The package's modules: :mod:`~kncore.evaluation.scoring` (target scores,
minimal pairs), :mod:`~kncore.evaluation.cases` (probes, edit cases, their
loader and builders), :mod:`~kncore.evaluation.knowledge` (symmetric relations,
synonyms), :mod:`~kncore.evaluation.edits` (edit evaluation). The t-test of the
probability change and its bar plot live in :mod:`kncore.plots` with the other
figures; every name is importable from ``kncore.evaluation`` as before.

Everything is built on one batched scorer, :func:`score_targets`: for each
(prompt, target) it returns the target's token log-probabilities and the
model's greedy token at each target position, teacher-forced (the prompt
followed by the gold target tokens), from one forward per batch of distinct
token sequences. The head is applied only at the scored positions.

Tables are plain lists of dicts (one row per pair, prompt or edit case), so
the experiment runners can write them to JSON or Parquet as they are.

Edits plug in as context managers: ``apply_edit`` is a zero-argument
callable returning one (``lambda: kncore.patch_neurons(lm, kns)``, a ROME
edit context) or a context manager object. Whatever changes the model inside
the ``with`` (weights, ``patch_neurons``' runtime patches) is seen by the
runtime; if the context yields a list of :class:`~kncore.runtime.Patch`, they
are applied to every forward too.
"""
from __future__ import annotations

from ..plots import plot_probability_changes, probability_change_stats, relative_change
from .cases import (KINDS, EditCase, Probe, counterfact_case, load_edit_cases, pararel_cases,
                    zsre_case)
from .edits import applied, before_after, evaluate_edit, evaluate_edits, summarise_edits
from .knowledge import (BUILTIN_SYNONYMS, REVERSE_TEMPLATES, SYMMETRIC_RELATIONS, EditKnowledge, SynonymRule,
                        edit_knowledge)
from .scoring import (TargetScore, minimal_pair_accuracy, minimal_pair_scores, score_targets, sentence_logprobs,
                      summarise_pairs, token_probabilities)

__all__ = ["KINDS", "TargetScore", "score_targets", "sentence_logprobs", "token_probabilities",
           "minimal_pair_scores", "summarise_pairs", "minimal_pair_accuracy", "applied", "before_after",
           "relative_change", "probability_change_stats", "plot_probability_changes", "Probe", "EditCase",
           "load_edit_cases", "SYMMETRIC_RELATIONS", "REVERSE_TEMPLATES", "SynonymRule", "BUILTIN_SYNONYMS",
           "EditKnowledge", "edit_knowledge", "counterfact_case", "zsre_case", "pararel_cases", "evaluate_edits",
           "evaluate_edit", "summarise_edits"]
