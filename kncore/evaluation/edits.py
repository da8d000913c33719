"""Edit evaluation: edits as context managers (:func:`applied`,
:func:`before_after`) and the probes of an edit case scored before and while
its edit is applied (:func:`evaluate_edits`), with ROME's and EasyEdit's metrics."""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Callable, Sequence

from ..family import family
from ..lm import LM, InputError
from ..runtime import Patch
from .cases import EditCase
from .scoring import check_patches, score_request, score_sequences


# =============================================================================
# edits as context managers
# =============================================================================
def _is_cm(x) -> bool:
    """A context manager object (not a class such as ``contextlib.nullcontext``)."""
    return hasattr(x, "__enter__") and hasattr(x, "__exit__") and not isinstance(x, type)


@contextlib.contextmanager
def applied(apply_edit):
    """Enter an edit; yields the extra patches it gives (a list, maybe empty).

    ``apply_edit``: None (no edit), a context manager, or a zero-argument
    callable returning one.
    """
    if apply_edit is None:
        yield []
        return
    cm = apply_edit
    if not _is_cm(cm):
        if not callable(cm):
            raise InputError(f"apply_edit must be a context manager or a callable returning one, "
                             f"got {type(cm).__name__}")
        cm = cm()
        if not _is_cm(cm):
            raise InputError(f"apply_edit() returned {type(cm).__name__}, not a context manager")
    with cm as got:
        if isinstance(got, Patch):
            got = [got]
        extra = list(got) if isinstance(got, (list, tuple)) and all(isinstance(p, Patch) for p in got) else []
        yield check_patches(extra)


def before_after(fn: Callable, apply_edit):
    """``(fn(patches=[]), fn(patches=edit's patches))``: ``fn`` run before and
    while the edit is applied, e.g. ``before_after(lambda patches:
    minimal_pair_accuracy(lm, prompts, method="target", patches=patches), edit)``."""
    before = fn(patches=[])
    with applied(apply_edit) as extra:
        after = fn(patches=extra)
    return before, after



# =============================================================================
# evaluating edits
# =============================================================================
def _case_requests(lm: LM, case: EditCase):
    reqs, index = [], []  # index[k] = (probe, which) with which in ("target", "foil")
    fam = family(lm)
    for p in case.probes:
        q = fam.probe_prompt(lm, p.prompt)
        for which, ans in (("target", p.target), ("foil", p.foil)):
            if ans is None:
                continue
            try:
                reqs.append(score_request(lm, q, ans))
            except InputError as e:
                raise InputError(f"edit case {case.case_id}, {p.kind} probe {p.prompt[:50]!r} -> {ans!r}: {e}") \
                    from None
            index.append((p, which))
    return reqs, index


def _case_row(case: EditCase, index, pre, post, details: bool) -> dict:
    by: dict = {}
    for (p, which), a, b in zip(index, pre, post):
        by.setdefault(id(p), {"probe": p})[which] = (a, b)
    row = {"case_id": case.case_id, "relation": case.relation, "subject": case.subject,
           "target_new": case.target_new, "target_true": case.target_true}
    kinds = list(dict.fromkeys(p.kind for p in case.probes))
    per_probe = []
    for kind in kinds:
        ent = [e for e in by.values() if e["probe"].kind == kind]
        row[f"n_{kind}"] = len(ent)
        for t, when in ((0, "pre"), (1, "post")):
            sc = [_ts(e["target"][t]) for e in ent]
            row[f"{kind}_prob_{when}"] = _mean([s["prob"] for s in sc])
            row[f"{kind}_acc_{when}"] = _mean([s["acc"] for s in sc])
            fo = [(s, _ts(e["foil"][t])) for s, e in zip(sc, ent) if "foil" in e]
            if fo:
                row[f"{kind}_success_{when}"] = _mean([float(s["mean_prob"] > f["mean_prob"]) for s, f in fo])
                row[f"{kind}_margin_{when}"] = _mean([s["mean_prob"] - f["mean_prob"] for s, f in fo])
        if kind == "locality":
            # EasyEdit's locality: post-edit top tokens agree with pre-edit ones.
            row["locality_agree"] = _mean([_agree(e["target"][0], e["target"][1]) for e in ent])
        if details:
            for e in ent:
                d = {"kind": kind, "prompt": e["probe"].prompt, "target": e["probe"].target,
                     "foil": e["probe"].foil}
                for t, when in ((0, "pre"), (1, "post")):
                    s = _ts(e["target"][t])
                    d[f"prob_{when}"], d[f"acc_{when}"] = s["prob"], s["acc"]
                    if "foil" in e:
                        d[f"foil_prob_{when}"] = _ts(e["foil"][t])["prob"]
                per_probe.append(d)
    for name, col in (("ES", "reliability_success_post"), ("PS", "generality_success_post"),
                      ("NS", "locality_success_post"), ("EM", "reliability_margin_post"),
                      ("PM", "generality_margin_post"), ("NM", "locality_margin_post")):
        if col in row:
            row[name] = row[col]
    if details:
        row["probes"] = per_probe
    return row


def _ts(res) -> dict:
    lps, am, ids = res
    lp = sum(lps)
    return {"prob": math.exp(lp), "mean_prob": math.exp(lp / len(lps)),
            "acc": sum(int(a == t) for a, t in zip(am, ids)) / len(ids)}


def _agree(pre, post) -> float:
    return sum(int(a == b) for a, b in zip(pre[1], post[1])) / len(pre[1])


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def _call_make(make_edit, case):
    """make_edit(case) -> context manager; a zero-argument callable or a
    context manager is used as it is."""
    if make_edit is None or _is_cm(make_edit) or not callable(make_edit):
        return make_edit  # applied() accepts it or says what is wrong
    try:
        n_req = sum(1 for p in inspect.signature(make_edit).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    except (TypeError, ValueError):
        n_req = 1
    return make_edit(case) if n_req >= 1 else make_edit


def evaluate_edits(lm: LM, cases: Sequence[EditCase], make_edit, *, batch_size: int = 32,
                   details: bool = False) -> list[dict]:
    """Evaluate one edit per case; returns one row per case.

    ``make_edit(case)`` returns the context manager that applies that case's
    edit (a ROME edit, ``kncore.patch_neurons``...). Every case's probes are
    scored (in one batch when they fit ``batch_size``) before and while its
    edit is applied.

    Row columns, for each probe kind present (reliability, generality,
    locality, symmetry, synonymy, or your own): ``{kind}_prob_{pre,post}``
    (mean P(target), the product of its token probabilities),
    ``{kind}_acc_{pre,post}`` (teacher-forced token accuracy, EasyEdit's), and
    where probes have a foil ``{kind}_success_{pre,post}`` (ROME's comparison:
    P(target) > P(foil), probabilities per token as ROME's
    ``test_batch_prediction``) and ``{kind}_margin_{pre,post}``
    (P(target) - P(foil)). ``locality_agree`` is EasyEdit's locality (post-edit
    top tokens equal pre-edit ones). ROME's CounterFact names: ES, PS, NS
    (post-edit success of reliability, generality and locality probes) and
    EM, PM, NM (their margins). ``details=True`` adds per-probe rows.
    """
    cases = list(cases)
    built = [_case_requests(lm, c) for c in cases]  # tokenisation errors surface before any edit
    rows = []
    for case, (reqs, index) in zip(cases, built):
        # Before and after run the same batches, so a no-op edit gives
        # bit-identical numbers (batching cases together changes the float
        # rounding by ~1e-7).
        pre = [(lps, am, r[2]) for (lps, am), r in zip(score_sequences(lm, reqs, [], batch_size), reqs)]
        with applied(_call_make(make_edit, case)) as extra:
            got = score_sequences(lm, reqs, extra, batch_size)
        post = [(lps, am, r[2]) for (lps, am), r in zip(got, reqs)]
        rows.append(_case_row(case, index, pre, post, details))
    return rows


def score_cases(lm: LM, cases: Sequence[EditCase], *, batch_size: int = 32) -> list[dict]:
    """Each case's probes scored on the model as it is now (no edit is
    applied): the rows of :func:`evaluate_edits` with ``_pre`` = ``_post``,
    all cases' probes batched together. For models edited elsewhere (a
    sequential run scores every fact edited so far after each batch)."""
    cases = list(cases)
    built = [_case_requests(lm, c) for c in cases]
    flat = [r for reqs, _ in built for r in reqs]
    got = score_sequences(lm, flat, [], batch_size)
    rows, at = [], 0
    for case, (reqs, index) in zip(cases, built):
        res = [(lps, am, r[2]) for (lps, am), r in zip(got[at:at + len(reqs)], reqs)]
        at += len(reqs)
        rows.append(_case_row(case, index, res, res, False))
    return rows


def evaluate_edit(lm: LM, case: EditCase, apply_edit, *, batch_size: int = 32, details: bool = False) -> dict:
    """Evaluate one edit: ``apply_edit`` is a context manager or a
    zero-argument callable returning one (``lambda: kncore.patch_neurons(lm,
    kns, mode="suppress")``). See :func:`evaluate_edits` for the columns."""
    return evaluate_edits(lm, [case], apply_edit, batch_size=batch_size, details=details)[0]


def summarise_edits(rows: Sequence[dict]) -> dict:
    """Mean of every numeric column over the cases that have it (NaN-free),
    and ROME's score S = harmonic mean of ES, PS and NS."""
    rows = list(rows)
    if not rows:
        raise InputError("no edit rows to summarise")
    cols: dict = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "case_id" and not math.isnan(v):
                cols.setdefault(k, []).append(float(v))
    out = {"n_cases": len(rows)}
    out.update({k: sum(v) / len(v) for k, v in cols.items()})
    if all(k in out for k in ("ES", "PS", "NS")):
        v = [out["ES"], out["PS"], out["NS"]]
        out["S"] = 0.0 if min(v) == 0 else 3 / sum(1 / x for x in v)
    return out
