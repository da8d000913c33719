"""The experiments of Niu et al. (ICLR 2024), "What does the Knowledge Neuron
Thesis Have to do with Knowledge?", one call each:

* :func:`localise` - knowledge neurons of BLiMP paradigms and PARAREL
  relations, with KN (mean neurons per fact), tau (mean sharing threshold),
  R1^2 (n-sample similarity) and the layer distribution;
* :func:`kn_edit_effects` - suppress (x0) or enhance (x2) the neurons:
  minimal-pair accuracy before and after, and the probability changes of a set
  of tokens (the paper's bar plot);
* :func:`edit_eval` - ROME and KN edits: reliability, generality, locality,
  bijective symmetry, synonymous invariance, CounterFact's ES/PS/NS/EM.

Each takes an LM, a task or data set, a run directory (``out``; a path, or an
open :class:`kncore.rundir.RunDir`) and options; writes Parquet tables,
``results/*.md`` and ``*.csv``, and ``plots/*.png`` into it; resumes work
items already done when called again; and returns its tables.

    import kncore
    from kncore import experiments as X
    lm = kncore.load("smollm2-135m")
    X.localise(lm, ["blimp:determiner_noun_agreement_2", "pararel:P101"], "runs/loc", limit=20)
    X.kn_edit_effects(lm, "blimp:determiner_noun_agreement_2", "runs/effects", kns="runs/loc")
    X.edit_eval(lm, "counterfact", "runs/rome", editor="rome", limit=20)
    X.run("localise", "smollm2-135m", "pararel:P36", "runs/p36", limit=20)   # the same, by name

The built pieces live in :mod:`kncore.experiments.common` (tasks and facts),
:mod:`~kncore.experiments.localising`, :mod:`~kncore.experiments.effects` and
:mod:`~kncore.experiments.editing`. See docs/results.md for SmolLM2's numbers.
"""
from __future__ import annotations

from ..lm import InputError
from .common import (DETERMINERS, PAPER_ACCURACY, PAPER_REFERENCE, Fact, blimp_pair_prompts, parse_task,
                     task_facts, task_name)
from .editing import KNWeightEdit, edit_cases, edit_eval, kn_fact_edit
from .effects import kn_edit_effects
from .localising import localise, read_kns

EXPERIMENTS = {"localise": localise, "kn_edit_effects": kn_edit_effects, "edit_eval": edit_eval}
_ALIASES = {"localize": "localise", "localisation": "localise", "kn-edit-effects": "kn_edit_effects",
            "edit-effects": "kn_edit_effects", "effects": "kn_edit_effects", "edit-eval": "edit_eval",
            "eval": "edit_eval", "edit": "edit_eval"}


def run(name: str, lm, target, out, **options):
    """Run an experiment by name: ``run("localise", lm, "pararel:P36", out,
    limit=20)``, ``run("kn_edit_effects", lm, "blimp:...", out)``,
    ``run("edit_eval", lm, "counterfact", out, editor="rome")``.

    ``lm``: an :class:`kncore.LM` or a model name (an embedded name such as
    ``smollm2-135m``, a local Hugging Face folder, or ``tiny-<arch>[:seed]``).
    ``target``: the task(s) (localise, kn_edit_effects) or the data set
    (edit_eval). ``options`` go to the experiment function.
    """
    key = _ALIASES.get(name, name)
    if key not in EXPERIMENTS:
        raise InputError(f"unknown experiment {name!r}; choose from {sorted(EXPERIMENTS)}")
    if isinstance(lm, str):
        from ..jobs import load_model
        lm = load_model(lm)
    return EXPERIMENTS[key](lm, target, out, **options)


__all__ = ["run", "EXPERIMENTS", "localise", "kn_edit_effects", "edit_eval", "read_kns", "edit_cases",
           "kn_fact_edit", "KNWeightEdit", "Fact", "task_facts", "blimp_pair_prompts", "parse_task", "task_name",
           "PAPER_REFERENCE", "PAPER_ACCURACY", "DETERMINERS"]
