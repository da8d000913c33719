"""Experiment 3: evaluate ROME edits and KN edits (Niu et al. 2024, §4):
reliability, generality, locality, bijective symmetry and synonymous
invariance, as probabilities and teacher-forced token accuracy, beside
CounterFact's ES, PS, NS and EM."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from ..family import EDITORS, family  # noqa: F401  (EDITORS: still importable from here)
from ..lm import LM, InputError
from .common import open_run, parse_task, progress_bar, uniform, write_result

KINDS = ("reliability", "generality", "locality", "symmetry", "synonymy")


# -- the KN editor (Dai et al. 2022, §5.2 "updating facts") -------------------------------------
class KNWeightEdit:
    """Dai et al.'s fact update on given knowledge neurons: each neuron's value
    vector (its row of the down-projection) loses ``scale`` x the embedding of
    the old answer's token and gains ``scale`` x the new one's (the
    ``knowledge-neurons`` package's ``edit_knowledge``: scale 2, word
    embeddings). A context manager: on exit the rows are restored bit for bit.
    """

    def __init__(self, lm: LM, neurons, old_id: int, new_id: int, scale: float = 2.0):
        from ..selection import KNSet

        self.lm = lm
        self.neurons = KNSet.of(neurons)
        self.old_id, self.new_id, self.scale = int(old_id), int(new_id), float(scale)
        V = lm.adapter.embedding_module().weight.shape[0]
        for t in (self.old_id, self.new_id):
            if not 0 <= t < V:
                raise InputError(f"token id {t} outside the vocabulary of {V}")
        for l, i in self.neurons:
            if not (0 <= l < lm.n_layers and 0 <= i < lm.d_ff):
                raise InputError(f"neuron ({l}, {i}) outside {lm.n_layers} layers x {lm.d_ff}")
        self._saved = None

    @torch.no_grad()
    def __enter__(self):
        if self._saved is not None:
            raise RuntimeError("this KN edit is already applied")
        emb = self.lm.adapter.embedding_module().weight
        delta = (emb[self.new_id].float() - emb[self.old_id].float()) * self.scale
        self._saved = []
        try:
            for l, i in self.neurons:
                w = self.lm.adapter.down_weight(l)  # [d_ff, d_model] view: row i is neuron i's value vector
                self._saved.append((w, i, w[i].clone()))
                w[i] = (w[i].float() + delta.to(w.device)).to(w.dtype)
        except BaseException:
            self.__exit__()
            raise
        return self

    @torch.no_grad()
    def __exit__(self, *exc):
        for w, i, old in reversed(self._saved or []):
            w[i] = old
        self._saved = None
        return False


def kn_fact_edit(lm: LM, case, *, steps: int = 20, layers=None, adaptive_threshold: float = 0.2,
                 scale: float = 2.0, batch_size="auto") -> KNWeightEdit:
    """A :class:`KNWeightEdit` for an edit case: the fact's knowledge neurons
    are localised from its reliability and generality prompts with the old
    answer as target (:func:`kncore.attribute`, coarse at ``adaptive_threshold``
    x max, :func:`kncore.refine` with the adaptive p), and the first token of
    the old and the new answer (after the edited prompt) are swapped in their
    value vectors. On T5 the neurons are the decoder's, attributed with
    :func:`kncore.t5.attribute` (the answer teacher-forced in the decoder,
    its input shifted right); :mod:`kncore.family` picks the attribution."""
    from ..selection import refine, select_coarse

    if case.target_true is None:
        raise InputError(f"edit case {case.case_id}: a KN edit needs the old answer (target_true) to localise")
    fam = family(lm)
    prompts = list(dict.fromkeys(p.prompt for p in case.probes if p.kind in ("reliability", "generality")))
    attr = fam.attribute(lm, [fam.probe_prompt(lm, p) for p in prompts], case.target_true, steps=steps,
                         layers=layers, batch_size=batch_size)
    ref = refine([select_coarse(attr, adaptive_threshold=adaptive_threshold)], "adaptive")
    old = fam.target_ids(lm, case.prompt, case.target_true)[0]
    new = fam.target_ids(lm, case.prompt, case.target_new)[0]
    e = KNWeightEdit(lm, ref.sets[0], old, new, scale)
    e.p = ref.p
    return e


# -- data sets ------------------------------------------------------------------------------------
def edit_cases(lm: LM, dataset, *, limit: int | None = None, extra_probes: bool = True, data_dir=None) -> list:
    """``[(key, EditCase)]`` of a data set: ``"counterfact"``, ``"zsre"``,
    ``"pararel:<relation>"`` (Niu et al.'s edit sets; P36/P1376 carry
    symmetry probes, P101 synonymy probes), or a file (CounterFact in ROME's
    or EasyEdit's layout, or kncore's edit-case JSON). Symmetry and synonymy
    probes are added wherever the relation allows (``extra_probes``)."""
    from .. import evaluation
    from ..pipeline import edit_cases as load_cases
    from ..pipeline import keyed_cases

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive integer or None, got {limit!r}")
    know = evaluation.edit_knowledge(data_dir) if extra_probes else None
    if not isinstance(dataset, (str, Path)):
        raise InputError(f"dataset must be a name or a path, got {type(dataset).__name__}")
    ds = str(dataset)
    if ds.startswith("pararel:") or (ds.startswith("P") and ds[1:].isdigit()):
        _, rel = parse_task(ds)
        cases = load_cases("pararel", relations=[rel], know=know, limit=limit, data_dir=data_dir)
    elif ds in ("counterfact", "zsre") or Path(ds).is_file():
        cases = load_cases(ds, know=know, data_dir=data_dir)
    else:
        raise InputError(f"unknown edit data set {ds!r}: use counterfact, zsre, pararel:<relation> or a file")
    cases = cases[:limit] if limit is not None else cases
    if not cases:
        raise InputError(f"no edit cases in {ds}")
    return keyed_cases(cases)


def _rome_editor(lm, hparams, stats_corpus, stats_samples, stats_cache, progress):
    from .. import rome

    hp = rome.hparams_for(lm) if hparams is None else rome.load_hparams(hparams)
    hp.validate()
    hp.check_model(lm)
    stats = None
    if hp.mom2_adjustment:
        stats = rome.layer_stats(lm, hp.layers, stats_corpus or hp.mom2_dataset,
                                 n_samples=stats_samples or hp.mom2_n_samples, dtype=hp.mom2_dtype,
                                 cache_dir=stats_cache, progress=progress)
    return hp, stats


def edit_eval(lm: LM, dataset, out, *, editor: str = "rome", limit: int | None = None, hparams=None,
              stats_corpus=None, stats_samples: int | None = None, stats_cache=None, kn_steps: int = 20,
              kn_layers=None, kn_scale: float = 2.0, kn_threshold: float = 0.2, extra_probes: bool = True,
              data_dir=None, batch_size: int = 32, chunk: int = 4, progress: bool = True) -> dict:
    """Evaluate one edit per case with ROME or the KN editor.

    ``dataset``: see :func:`edit_cases`. ``editor="rome"``:
    :func:`kncore.rome.edit` with ``hparams`` (None: the model's shipped
    file); when they use ROME's C^-1 the statistics come from
    :func:`kncore.rome.layer_stats` over ``stats_corpus`` (None: the hparams'
    ``mom2_dataset``), cached. ``editor="kn"``: :func:`kn_fact_edit` (IG with
    ``kn_steps`` over ``kn_layers``, coarse threshold ``kn_threshold``, value
    vectors changed by ``kn_scale`` x the embeddings).

    Every probe (reliability, generality, locality, and where the relation
    allows symmetry and synonymy) is scored before and during the edit by
    :func:`kncore.evaluation.evaluate_edits`: mean probability and
    teacher-forced token accuracy, success against a foil, and CounterFact's
    ES, PS, NS, EM (S their harmonic mean). Written into ``out`` (resumable
    per case): Parquet ``edits`` (one row per case) and ``probes``,
    ``results/summary.md|csv`` and ``results/edits.csv``. Returns
    ``{"summary": dict, "kinds": rows, "edits": rows}``.
    """
    from .. import evaluation
    from ..rundir import run_items

    family(lm).check_editor(editor)  # e.g. ROME through edit_eval on T5: refused in one line
    cases = edit_cases(lm, dataset, limit=limit, extra_probes=extra_probes, data_dir=data_dir)
    config = {"experiment": "edit_eval", "dataset": str(dataset), "editor": editor, "limit": limit,
              "extra_probes": extra_probes}
    if editor == "rome":
        hp, stats = _rome_editor(lm, hparams, stats_corpus, stats_samples, stats_cache, progress)
        import dataclasses
        config["hparams"] = {f.name: getattr(hp, f.name) for f in dataclasses.fields(hp) if f.name != "ignored"}
        config["stats"] = {L: {"n_tokens": s.n_tokens, "corpus": s.meta.get("corpus")} for L, s in
                           (stats or {}).items()}

        def make_edit(case):
            from .. import rome
            return rome.edit(lm, case.request(), hp, stats=stats)
    else:
        from ..attribution import check_layers
        config.update(kn_steps=kn_steps, kn_layers=check_layers(lm, kn_layers), kn_scale=kn_scale,
                      kn_threshold=kn_threshold)
        info: dict = {}

        def make_edit(case):
            e = kn_fact_edit(lm, case, steps=kn_steps, layers=kn_layers, adaptive_threshold=kn_threshold,
                             scale=kn_scale)
            info[id(case)] = e
            return e
    rd, mine = open_run(out, config, lm, "experiments.edit_eval")
    bar = progress_bar(len(cases) - len(rd.done_keys("edits") & {k for k, _ in cases}), f"{editor} edits", progress,
                       "edit")
    try:
        def work(chunk_items):
            keys = [k for k, _ in chunk_items]
            cs = [c for _, c in chunk_items]  # payloads are (key, case)
            rows = evaluation.evaluate_edits(lm, cs, make_edit, batch_size=batch_size, details=True)
            edits, probes = [], []
            for k, c, r in zip(keys, cs, rows):
                r = dict(r, key=k, editor=editor, case_id=None if r.get("case_id") is None else str(r["case_id"]))
                for j, p in enumerate(r.pop("probes")):
                    probes.append({"key": k, "j": j, **p})
                if editor == "kn":
                    e = info.pop(id(c))
                    r.update(n_kn=len(e.neurons), kn_p=e.p, kn_layers=sorted({l for l, _ in e.neurons}))
                edits.append(r)
                if bar is not None:
                    bar.update(1)
            return {"edits": uniform(edits), "probes": uniform(probes)}

        run_items(rd, [(k, (k, c)) for k, c in cases], work, table="edits", chunk=chunk)
        rows = rd.read("edits").to_pylist()
        summary = evaluation.summarise_edits(rows)
        kinds = _kind_table(summary, rows)
        write_result(rd, "summary", kinds, title=f"{editor} edits on {dataset} ({lm.name}, {summary['n_cases']} cases)",
                     notes=[f"ES {summary.get('ES', math.nan):.3f}, PS {summary.get('PS', math.nan):.3f}, "
                            f"NS {summary.get('NS', math.nan):.3f}, EM {summary.get('EM', math.nan):.3f}, "
                            f"S {summary.get('S', math.nan):.3f} (CounterFact's metrics, post-edit)",
                            "prob: mean P(target) (product of its token probabilities); acc: teacher-forced token "
                            "accuracy; success: P(target) > P(foil) per token (ROME's comparison); locality's "
                            "target is the neighbour's own answer, symmetry's the edited subject"])
        write_result(rd, "edits", rows, columns=[c for c in dict.fromkeys(k for r in rows for k in r)
                                                 if not c.startswith("n_")])
        rd.update_manifest(summary=summary)
        return {"summary": summary, "kinds": kinds, "edits": rows}
    finally:
        if bar is not None:
            bar.close()
        if mine:
            rd.close()


def _kind_table(summary: dict, edits: Sequence[dict]) -> list[dict]:
    """One row per probe kind: cases that have it, probes, probability,
    accuracy and success, pre and post (means over those cases)."""
    rows = []
    for k in KINDS:
        if f"{k}_prob_pre" not in summary:
            continue
        have = [r for r in edits if isinstance(r.get(f"n_{k}"), (int, float)) and r[f"n_{k}"]]
        rows.append({"kind": k, "cases": len(have), "probes": int(sum(r[f"n_{k}"] for r in have)),
                     "prob_pre": summary.get(f"{k}_prob_pre"), "prob_post": summary.get(f"{k}_prob_post"),
                     "acc_pre": summary.get(f"{k}_acc_pre"), "acc_post": summary.get(f"{k}_acc_post"),
                     "success_pre": summary.get(f"{k}_success_pre"), "success_post": summary.get(f"{k}_success_post")})
    return rows
