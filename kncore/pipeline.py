"""The one pipeline under ``kncore localise/trace/edit/eval``, the demo and the
experiments, and the schema of the tables it writes.

Each step is written once here and called from :mod:`kncore.cli`,
:mod:`kncore.demo` and :mod:`kncore.experiments`:

* :func:`attribute_bags` - integrated gradients of every prompt of some fact
  bags, their coarse neurons, and each bag's R1^2 (the ``prompts``,
  ``coarse`` and ``bags`` tables);
* :func:`refine_groups` - Niu et al.'s refinement per group (relation or
  paradigm; one adaptive sharing threshold each): the ``localisation`` and
  ``kn`` tables;
* :func:`edit_cases` / :func:`keyed_cases` - edit cases from a data set, a
  file or inline prompts, each with a unique key;
* :func:`trace_rows` / :func:`trace_results` - a :class:`kncore.tracing.TraceResult`
  to the ``trace`` table's rows and back (:mod:`kncore.report` draws from them);
* :func:`prompt_row` / :func:`coarse_rows` - an :class:`kncore.Attribution`
  to table rows.

A fact bag is a dict ``{key, group, subject, prompts, targets}``
(:func:`kncore.data.records.fact_bags`).
"""
from __future__ import annotations

from pathlib import Path

from .errors import InputError

# -- the schema: table -> its columns, in order ------------------------------------------------
# The layout of these tables. The experiments record it in their run directory's
# config, so a directory written under another layout (the experiments' old
# ``task``/``fact`` columns and ``facts`` table) is refused, not mixed.
SCHEMA_VERSION = 2
# The columns other modules read back by name (kncore.report): one spelling each.
KEY, GROUP, LAYER, NEURON = "key", "relation", "layer", "neuron"
INTERVENTION, P_BEFORE, P_AFTER, METHOD = "intervention", "p_before", "p_after", "method"
PROMPT_COLUMNS = ("key", "j", "relation", "prompt", "target", "base_prob", "max_gap", "median_gap", "n_coarse")
COARSE_COLUMNS = ("key", "j", "relation", "layer", "neuron", "score")
BAG_COLUMNS = ("key", "relation", "subject", "n_prompts", "r1_sq")
KN_COLUMNS = ("key", "relation", "subject", "target", "layer", "neuron", "count", "n_prompts", "score")
EFFECT_COLUMNS = ("key", "relation", "prompt", "intervention", "n_kn", "p_before", "p_after")
TRACE_COLUMNS = ("key", "prompt", "subject", "target", "kind", "tokens", "subject_start", "subject_end",
                 "target_position", "scores", "low_score", "high_score", "window", "samples", "input_ids",
                 "target_id", "noise", "seed")
# what trace_results needs of a ``trace`` table (the others have defaults)
TRACE_REQUIRED = ("scores", "tokens", "subject_start", "subject_end", "target_position", "low_score", "high_score")
TRACE_RECORD_COLUMNS = ("key", "prompt", "subject", "attribute", "status", "answer", "high", "low")
TABLES = {"prompts": PROMPT_COLUMNS, "coarse": COARSE_COLUMNS, "bags": BAG_COLUMNS, "kn": KN_COLUMNS,
          "effect": EFFECT_COLUMNS, "trace": TRACE_COLUMNS, "records": TRACE_RECORD_COLUMNS}
INTERVENTIONS = ("suppress", "enhance")


# -- attribution -> rows ------------------------------------------------------------------------
def prompt_row(att, i: int, kn_set, **fields) -> dict:
    """The ``prompts`` row of prompt ``i`` of an :class:`kncore.Attribution`:
    ``fields`` (key, j, relation, prompt, target...), its base probability, the
    largest and the median completeness gap over layers, its coarse-neuron count."""
    gap = att.completeness_gap[i]
    return {**fields, "base_prob": float(att.base_probs[i]), "max_gap": float(gap.max()),
            "median_gap": float(gap.median()), "n_coarse": len(kn_set)}


def coarse_rows(kn_set, **fields) -> list[dict]:
    """One ``coarse`` row per neuron of a :class:`kncore.KNSet`: ``fields`` + layer, neuron, score."""
    return [{**fields, "layer": layer, "neuron": neuron, "score": score}
            for (layer, neuron), score in zip(kn_set.neurons, kn_set.scores)]


def r1_or_none(vectors) -> float | None:
    """R1^2 (:func:`kncore.localisation.r1_squared`) of a fact's attribution
    vectors; None with fewer than two, or with an all-zero one (no direction to compare)."""
    import torch

    from .localisation import r1_squared

    if len(vectors) < 2:
        return None
    x = torch.stack([v.flatten() for v in vectors])
    if not bool((x.norm(dim=1) > 0).all()):
        return None
    return float(r1_squared(x))


def attribute_bags(lm, bags: list[dict], *, adaptive_threshold: float, **attribute_kwargs) -> dict:
    """Step 1 of localisation: one :func:`kncore.attribute` call for every
    prompt of ``bags`` (batched together), coarse neurons above
    ``adaptive_threshold`` x each prompt's maximum, and each bag's R1^2.
    Returns the rows ``{"bags", "prompts", "coarse"}``."""
    from .attribution import attribute
    from .selection import select_coarse

    flat = [(b, j, q, t) for b in bags for j, (q, t) in enumerate(zip(b["prompts"], b["targets"]))]
    att = attribute(lm, [f[2] for f in flat], [f[3] for f in flat], **attribute_kwargs)
    coarse = select_coarse(att, adaptive_threshold=adaptive_threshold)
    prow, crow, brow = [], [], []
    for i, ((b, j, q, t), ks) in enumerate(zip(flat, coarse)):
        prow.append(prompt_row(att, i, ks, key=b["key"], j=j, relation=b["group"], prompt=q, target=t))
        crow += coarse_rows(ks, key=b["key"], j=j, relation=b["group"])
    start = 0
    for b in bags:
        n = len(b["prompts"])
        vec = att.scores[start:start + n]
        start += n
        brow.append({"key": b["key"], "relation": b["group"], "subject": b["subject"], "n_prompts": n,
                     "r1_sq": r1_or_none(list(vec))})
    return {"bags": brow, "prompts": prow, "coarse": crow}


# -- refinement ---------------------------------------------------------------------------------
def coarse_sets(rows, key_field: str = "key") -> dict:
    """``{(bag key, j): KNSet}`` from ``coarse`` rows (score order kept)."""
    from .selection import KNSet

    by: dict = {}
    for r in rows:
        by.setdefault((r[key_field], r["j"]), []).append(((r["layer"], r["neuron"]), r["score"]))
    return {k: KNSet(tuple(n for n, _ in v), tuple(s for _, s in v)) for k, v in by.items()}


def bag_kn_sets(key: str, n_prompts: int, sets: dict) -> list:
    """The coarse :class:`kncore.KNSet` of each of a bag's ``n_prompts`` prompts
    (from :func:`coarse_sets`; an empty set where a prompt had none)."""
    from .selection import KNSet

    return [sets.get((key, j), KNSet((), ())) for j in range(n_prompts)]


def kn_rows(group: str, bag: dict, kn_set) -> list[dict]:
    """The ``kn`` rows of one bag's refined :class:`kncore.KNSet`."""
    return [{"key": bag["key"], "relation": group, "subject": bag["subject"], "target": bag["targets"][0],
             "layer": layer, "neuron": neuron, "count": c, "n_prompts": len(bag["prompts"]), "score": s}
            for (layer, neuron), c, s in zip(kn_set.neurons, kn_set.counts, kn_set.scores or [None] * len(kn_set))]


def refine_groups(rd, bags: list[dict], p, n_layers: int) -> None:
    """Step 2: refine each group's (relation's, paradigm's) bags at once, the
    adaptive p chosen per group, from the run directory's ``coarse`` and
    ``bags`` tables. One commit per group: its ``localisation`` row (Niu et
    al.'s table) and its ``kn`` rows; groups already done are skipped."""
    from .localisation import layer_counts, localisation_row
    from .selection import refine

    done = rd.done_keys("localisation")
    groups: dict = {}
    for b in bags:
        groups.setdefault(b["group"], []).append(b)
    todo = [g for g in groups if g not in done]
    if not todo:
        return
    sets = coarse_sets(rd.read("coarse").to_pylist())
    r1: dict = {}
    for r in rd.read("bags").to_pylist():
        if r["r1_sq"] is not None:
            r1.setdefault(r["relation"], []).append(r["r1_sq"])
    for g in todo:
        ref = refine([bag_kn_sets(b["key"], len(b["prompts"]), sets) for b in groups[g]], p)
        row = localisation_row(g, ref)
        row.update(key=g, r1_sq=(sum(r1[g]) / len(r1[g])) if r1.get(g) else None, converged=ref.converged,
                   layer_counts=layer_counts(ref, n_layers))
        rows = [r for b, ks in zip(groups[g], ref.sets) for r in kn_rows(g, b, ks)]
        rd.commit({"localisation": [row], "kn": rows},
                  keys={"localisation": [g], "kn": [b["key"] for b in groups[g]]})


def read_kns(rd) -> dict:
    """``{bag key: [(layer, neuron), ...]}`` from the ``kn`` table."""
    out: dict = {}
    for r in rd.read("kn").to_pylist():
        out.setdefault(r["key"], []).append((r["layer"], r["neuron"]))
    return out


def sharing_p(s: str):
    """``--p``: ``"adaptive"`` or a number in [0, 1)."""
    if s == "adaptive":
        return s
    try:
        p = float(s)
    except ValueError:
        p = -1.0
    if not 0 <= p < 1:
        raise InputError(f"--p must be a number in [0, 1) or 'adaptive', got {s!r}")
    return p


# -- step 3: interventions ----------------------------------------------------------------------
def target_probs(lm, prompts, tids, batch: int = 32) -> list[float]:
    """P(target token ``tids[i]``) after ``prompts[i]``, in batches."""
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        pr = lm.next_token_probs(prompts[i:i + batch])
        out += pr.gather(1, torch.tensor(tids[i:i + batch], device=pr.device)[:, None])[:, 0].tolist()
    return out


def relative_change_pct(rd) -> dict:
    """The paper's relative change ``(after - before) / min(before, after)`` of
    the ``effect`` table, in percent, per intervention (rows with a zero probability left out)."""
    import numpy as np

    eff = rd.read("effect")
    out = {}
    if eff.num_rows:
        pb = np.asarray(eff.column("p_before").to_pylist())
        pa = np.asarray(eff.column("p_after").to_pylist())
        it = np.asarray(eff.column("intervention").to_pylist())
        lo = np.minimum(pa, pb)
        for mode in INTERVENTIONS:
            m = (it == mode) & (lo > 0)
            if m.any():
                out[f"{mode}_mean_change_pct"] = float(100 * ((pa[m] - pb[m]) / lo[m]).mean())
    return out


def localise_summary(rd) -> dict:
    """Run-wide figures: facts, prompts, mean KNs per fact and tau (Niu et al.'s
    table, over all relations), mean R1^2, and the mean relative probability
    change of suppression and enhancement."""
    import numpy as np

    loc = rd.read("localisation").to_pylist()
    n_facts = sum(r["n_facts"] for r in loc)
    out = {"facts": n_facts, "prompts": rd.read("prompts").num_rows,
           "mean_kn_per_fact": rd.read("kn").num_rows / max(1, n_facts),
           "mean_tau": float(np.mean([r["tau"] for r in loc])) if loc else None,
           "facts_with_kn": len(rd.read("kn").column("key").unique()) if rd.read("kn").num_rows else 0}
    r1 = [r["r1_sq"] for r in rd.read("bags").to_pylist() if r["r1_sq"] is not None]
    out["mean_r1_sq"] = float(np.mean(r1)) if r1 else None
    out.update(relative_change_pct(rd))
    return out


# -- tracing -> rows and back -------------------------------------------------------------------
def trace_rows(key: str, res) -> list[dict]:
    """The ``trace`` rows of a :class:`kncore.tracing.TraceResult`: one per kind."""
    return [{"key": key, "prompt": res.prompt, "subject": res.subject, "target": res.answer, "kind": k,
             "tokens": list(res.tokens), "subject_start": res.subject_range[0], "subject_end": res.subject_range[1],
             "target_position": res.target_position, "scores": res.scores[k].tolist(), "low_score": res.low,
             "high_score": res.high, "window": res.window, "samples": res.samples, "input_ids": list(res.input_ids),
             "target_id": res.target, "noise": res.noise, "seed": res.seed} for k in res.kinds]


def trace_record_row(rec: dict, status: str, res=None) -> dict:
    """The ``records`` row of a trace input ``rec`` (key, prompt, subject, attribute): its status and result."""
    return {"key": rec["key"], "prompt": rec["prompt"], "subject": rec["subject"], "attribute": rec["attribute"],
            "status": status, "answer": res.answer if res else None, "high": res.high if res else None,
            "low": res.low if res else None}


def trace_results(rows) -> list:
    """``trace`` rows back to :class:`kncore.tracing.TraceResult`, one per key (first seen order)."""
    import torch

    from .tracing import TraceResult

    by_key: dict = {}
    for r in rows:
        by_key.setdefault(r.get("key"), []).append(r)
    out = []
    for rows in by_key.values():
        r0 = rows[0]
        out.append(TraceResult(
            scores={r.get("kind", "hidden"): torch.tensor(r["scores"], dtype=torch.float32) for r in rows},
            low=float(r0["low_score"]), high=float(r0["high_score"]), tokens=list(r0["tokens"]),
            input_ids=list(r0.get("input_ids") or []), subject_range=(r0["subject_start"], r0["subject_end"]),
            target=int(r0.get("target_id") if r0.get("target_id") is not None else -1),
            answer=str(r0.get("target") or ""), target_position=int(r0["target_position"]),
            prompt=str(r0.get("prompt") or ""), subject=str(r0.get("subject") or ""),
            kinds=tuple(r.get("kind", "hidden") for r in rows), window=int(r0.get("window") or 0),
            samples=int(r0.get("samples") or 0), noise=float(r0.get("noise") or 0.0), seed=int(r0.get("seed") or 0)))
    return out


# -- edit cases ---------------------------------------------------------------------------------
def keyed_cases(cases) -> list[tuple[str, object]]:
    """``[(key, case)]``: the case id (6 digits when an int), else the index; repeats get ``#i``."""
    out, seen = [], set()
    for i, c in enumerate(cases):
        key = f"{c.case_id:06d}" if isinstance(c.case_id, int) else str(c.case_id if c.case_id is not None else i)
        if key in seen:
            key = f"{key}#{i}"
        seen.add(key)
        out.append((key, c))
    return out


def inline_edit_cases(prompts, subjects, targets_new, targets_true=None) -> list:
    """Edit cases from ``--prompt --subject --target-new [--target]`` (a ``{}`` in a prompt is the subject)."""
    from .evaluation import EditCase

    n = len(prompts)
    if not (subjects and targets_new) or not (n == len(subjects) == len(targets_new)):
        raise InputError("an inline edit needs one --subject and one --target-new per --prompt")
    tt = targets_true or [None] * n
    if len(tt) != n:
        raise InputError("give one --target (the true answer) per --prompt, or none")
    cases = []
    for i, (p, sub, new, true) in enumerate(zip(prompts, subjects, targets_new, tt)):
        full = p.replace("{}", sub, 1) if "{}" in p else p
        cases.append(EditCase.from_dict({"case_id": i, "subject": sub, "prompt": full, "target_new": new,
                                         "target_true": true}, f"--prompt {i}"))
    return cases


def edit_cases(data: str, *, relations=None, know=None, limit: int | None = None, data_dir=None,
               command: str = "edit") -> list:
    """Edit cases (:class:`kncore.evaluation.EditCase`) of a data set: CounterFact,
    zsRE, PARAREL (``relations``; Niu et al.'s edit sets; ``limit`` per relation)
    or a file: CounterFact's layout (ROME's or EasyEdit's) or kncore's
    edit-case JSON. ``know`` (:func:`kncore.evaluation.edit_knowledge`) adds
    symmetry and synonymy probes where the relation allows."""
    from . import evaluation
    from .data import load_counterfact, load_zsre
    from .data.records import DATA_SETS, read_records

    if data == "counterfact":
        return [evaluation.counterfact_case(r, know) for r in load_counterfact(data_dir=data_dir)]
    if data == "zsre":
        return [evaluation.zsre_case(r, know) for r in load_zsre(data_dir=data_dir)]
    if data == "pararel":
        return [c for r in relations or ["P36"]
                for c in evaluation.pararel_cases(r, data_dir, know=know, limit=limit)]
    if data in DATA_SETS:
        raise InputError(f"'kncore {command}' reads edit cases (counterfact, zsre, pararel or a file), "
                         f"not --data {data}")
    path = Path(data)
    first = read_records(path)[0]
    if "requested_rewrite" in first or ("target_new" in first and "ground_truth" in first):
        return [evaluation.counterfact_case(r, know) for r in load_counterfact(path)]
    return evaluation.load_edit_cases(path)


def edit_rows(keys, rows, method: str) -> list[dict]:
    """``edit_eval``/``metrics`` rows: each evaluation row with its key, the method, and the case id as text."""
    out = []
    for k, r in zip(keys, rows):
        r = dict(r, key=k, method=method)
        r["case_id"] = None if r.get("case_id") is None else str(r["case_id"])
        out.append(r)
    return out
