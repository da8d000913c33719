"""Experiment 1: localise knowledge neurons of BLiMP paradigms and PARAREL
relations, with the paper's statistics (Niu et al. 2024, Table 1 and the
layer-distribution figure)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..lm import LM, InputError
from ..pipeline import (BAG_COLUMNS, GROUP, KEY, KN_COLUMNS, SCHEMA_VERSION, bag_kn_sets, coarse_rows,
                        coarse_sets, kn_rows, prompt_row, r1_or_none)
from .common import (PAPER_REFERENCE, Fact, open_run, progress_bar, run_items_closing, task_facts, task_list,
                     uniform, write_result)

SCOPES = ("fact", "task")


def _check(steps, adaptive_threshold, p, scope):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if not (isinstance(adaptive_threshold, (int, float)) and 0 < adaptive_threshold < 1):
        raise InputError(f"adaptive_threshold must be in (0, 1), got {adaptive_threshold!r}")
    if p != "adaptive" and not (isinstance(p, (int, float)) and 0 <= p < 1):
        raise InputError(f"p must be 'adaptive' or a number in [0, 1), got {p!r}")
    if scope not in SCOPES:
        raise InputError(f"adaptive_scope must be one of {SCOPES}, got {scope!r}")


def localise(lm: LM, task, out, *, steps: int = 20, layers: Sequence[int] | None = None,
             batch_size: int | str = "auto", limit: int | None = None, adaptive_threshold: float = 0.2,
             p: float | str = "adaptive", adaptive_scope: str = "fact", prompt_style: str = "paper",
             group_by: str = "class", scheme: str = "riemann-left", site: str = "act", data_dir=None,
             chunk: int = 4, progress: bool = True) -> dict:
    """Localise the knowledge neurons of one or more tasks and measure them.

    ``task``: ``"blimp:<paradigm>"``, ``"pararel:<relation>"`` (or a list of
    them, or a comma-separated string). For each fact (a PARAREL fact bag; a
    BLiMP class, its pairs as paraphrases, see :class:`Fact`): integrated
    gradients of every prompt (:func:`kncore.attribute`, ``steps`` points,
    ``layers``: all by default), coarse neurons above ``adaptive_threshold``
    x the prompt's maximum (Dai et al.'s 0.2), then :func:`kncore.refine`
    with the adaptive sharing threshold p (target 2 to 5 neurons), searched
    per fact (``adaptive_scope="fact"``, as Niu et al.'s ``run_kn_alg``, which
    gets one fact's scores) or once for all facts of a task (``"task"``).

    Statistics per task: ``kn`` (mean KNs per fact), ``tau`` (mean final p),
    ``r1_sq`` (mean over facts of :func:`kncore.localisation.r1_squared` of
    the fact's prompts' attribution vectors), ``r1_sq_task`` (R1^2 of all
    the task's prompts together), the layer distribution of the KNs.

    ``out``: a run directory path (resumable: prompts, facts and tasks already
    done are skipped) or an open :class:`kncore.rundir.RunDir`. Written, in
    the columns of :mod:`kncore.pipeline`'s schema (the task is the ``relation``
    column, a fact the ``key``, its label the ``subject``), as ``kncore
    localise`` writes them: Parquet tables ``prompts`` (per prompt), ``coarse``,
    ``bags`` (per fact; with its kind, target, KN count, p and convergence),
    ``kn`` (fact, layer, neuron, count, score), ``localisation`` (per task);
    attribution vectors (tensors ``attr``, one per prompt ``key#j``);
    ``results/*.md|csv``; ``plots/layer_distribution.png``. Returns
    ``{"localisation", "bags", "kn", "prompts"}`` as lists of dicts.

    ``scheme``/``site``: the quadrature and the neuron site of
    :func:`kncore.attribute` (``scheme="linspace", site="pre_act"`` is the
    ``knowledge-neurons`` package's setting for GPT models, which Niu et al.
    build on). ``limit``: BLiMP, pairs per class (Niu et al.: 100); PARAREL, facts per
    relation; one number for every task or ``{task: number}``.
    ``prompt_style``/``group_by``: see :func:`task_facts`.
    """
    from ..attribution import SITES, check_layers, scheme_points

    tasks = task_list(task)
    _check(steps, adaptive_threshold, p, adaptive_scope)
    scheme_points(scheme, steps)
    if site not in SITES:
        raise InputError(f"site must be one of {SITES}, got {site!r}")
    layers = check_layers(lm, layers)
    limits = _limits(limit, tasks)
    facts, infos = [], {}
    for t in tasks:
        fs, info = task_facts(lm, t, limit=limits[t], prompt_style=prompt_style, group_by=group_by, data_dir=data_dir)
        facts += fs
        infos[t] = info
    config = {"experiment": "localise", "schema": SCHEMA_VERSION, "tasks": tasks, "steps": steps, "layers": layers, "limit": limits,
              "adaptive_threshold": adaptive_threshold, "p": p, "adaptive_scope": adaptive_scope,
              "prompt_style": prompt_style, "group_by": group_by, "scheme": scheme, "site": site}
    rd, mine = open_run(out, config, lm, "experiments.localise")
    try:
        _attribute_prompts(lm, rd, facts, steps=steps, layers=layers, scheme=scheme, site=site, batch_size=batch_size,
                           threshold=adaptive_threshold, chunk=chunk, progress=progress)
        _refine_facts(lm, rd, facts, tasks, p=p, scope=adaptive_scope)
        result = _summarise(lm, rd, facts, tasks, infos)
        rd.update_manifest(summary={"localisation": result["localisation"], "data": infos})
        return result
    finally:
        if mine:
            rd.close()


def _limits(limit, tasks) -> dict:
    """``{task: limit}`` from one limit or a mapping (missing tasks: no limit)."""
    from .common import task_name

    if isinstance(limit, dict):
        given = {task_name(k): v for k, v in limit.items()}
        unknown = sorted(set(given) - set(tasks))
        if unknown:
            raise InputError(f"limit names tasks that are not run: {unknown}")
        return {t: given.get(t) for t in tasks}
    return {t: limit for t in tasks}


# -- stage 1: attribution and coarse neurons, per prompt -----------------------------------
def _attribute_prompts(lm, rd, facts: list[Fact], *, steps, layers, scheme, site, batch_size, threshold, chunk,
                       progress):
    from ..attribution import attribute
    from ..selection import select_coarse

    # one work item per prompt (its done key and its attribution tensor: _prompt_id);
    # the rows carry the fact's key and j, as kncore.pipeline's schema has them
    items = [(_prompt_id(f.key, j), (f, j)) for f in facts for j in range(len(f.prompts))]
    done = rd.done_keys("prompts")
    bar = progress_bar(sum(k not in done for k, _ in items), "IG (prompts)", progress, "prompt")

    def work(chunk_items):
        ps = [f.prompts[j] for f, j in chunk_items]
        ts = [f.targets[j] for f, j in chunk_items]
        attr = attribute(lm, ps, ts, steps=steps, layers=layers, scheme=scheme, site=site, batch_size=batch_size,
                         progress=False)
        coarse = select_coarse(attr, adaptive_threshold=threshold)
        prompts, crow, tens = [], [], {}
        for i, ((f, j), cs) in enumerate(zip(chunk_items, coarse)):
            sc = attr.scores[i]
            prompts.append(dict(prompt_row(attr, i, cs, key=f.key, j=j, relation=f.task, prompt=f.prompts[j],
                                           target=f.targets[j]),
                                max_score=float(sc.max()), prob_delta_sum=float(attr.prob_delta[i].sum())))
            crow += coarse_rows(cs, key=f.key, j=j, relation=f.task)
            tens[_prompt_id(f.key, j)] = sc.contiguous()
        return {"prompts": prompts, "coarse": crow}, {"attr": tens}

    run_items_closing(rd, items, work, table="prompts", chunk=chunk, bar=bar, count_keys=True)


def _prompt_id(key: str, j: int) -> str:
    return f"{key}#{j:04d}"


# -- stage 2: refined neurons and R1^2, per fact ---------------------------------------------
def _coarse_sets(rd, facts):
    sets = coarse_sets(rd.read("coarse").to_pylist())
    return {f.key: bag_kn_sets(f.key, len(f.prompts), sets) for f in facts}


def _bag(f: Fact) -> dict:
    """A fact as kncore.pipeline's fact bag (its label is the bag's subject)."""
    return {"key": f.key, "group": f.task, "subject": f.label, "prompts": f.prompts, "targets": [f.target]}


def _refine_facts(lm, rd, facts: list[Fact], tasks, *, p, scope):
    from ..selection import refine

    done = rd.done_keys("bags")
    todo_tasks = [t for t in tasks if any(f.task == t and f.key not in done for f in facts)]
    if not todo_tasks:
        return
    coarse = _coarse_sets(rd, facts)
    attr = rd.load_tensors("attr")
    base = {}
    for r in rd.read("prompts").to_pylist():
        base.setdefault(r[KEY], []).append(r["base_prob"])
    for t in todo_tasks:
        tf = [f for f in facts if f.task == t]
        if scope == "task":
            ref = refine([coarse[f.key] for f in tf], p)
            per = [(f, ref, ref.sets[i]) for i, f in enumerate(tf)]
        else:
            per = []
            for f in tf:
                r = refine([coarse[f.key]], p)
                per.append((f, r, r.sets[0]))
        frows, krows = [], []
        for f, r, ks in per:
            if f.key in done:
                continue
            vec = [attr[_prompt_id(f.key, j)] for j in range(len(f.prompts))]
            bp = base.get(f.key, [])
            # the pipeline's bag row, then what this experiment adds
            frows.append({"key": f.key, "relation": t, "subject": f.label, "n_prompts": len(f.prompts),
                          "r1_sq": r1_or_none(vec), "kind": f.kind, "target": f.target, "n_kn": len(ks), "p": r.p,
                          "converged": r.converged, "mean_base_prob": sum(bp) / len(bp) if bp else None,
                          "history": [list(h) for h in r.history]})
            krows += kn_rows(t, _bag(f), ks)
        keys = [f.key for f, _, _ in per if f.key not in done]
        rd.commit({"bags": uniform(frows), "kn": krows}, keys=keys)


# -- stage 3: tables and figures, per task ------------------------------------------------------
def _summarise(lm, rd, facts, tasks, infos) -> dict:
    from ..localisation import layer_counts, plot_layer_distribution, r1_squared

    frows = rd.read("bags").to_pylist()
    krows = rd.read("kn").to_pylist()
    prows = rd.read("prompts").to_pylist()
    done_loc = rd.done_keys("localisation")
    loc = []
    attr = None
    for t in tasks:
        fr = [r for r in frows if r[GROUP] == t]
        if not fr:
            continue
        r1 = [r["r1_sq"] for r in fr if r["r1_sq"] is not None]
        kinds = {r["kind"] for r in fr}
        row = {"key": t, "task": t, "kind": kinds.pop() if len(kinds) == 1 else "mixed", "n_facts": len(fr),
               "n_prompts": sum(r["n_prompts"] for r in fr),
               "kn": sum(r["n_kn"] for r in fr) / len(fr), "tau": sum(r["p"] for r in fr) / len(fr),
               "r1_sq": sum(r1) / len(r1) if r1 else None,
               "facts_without_kn": sum(r["n_kn"] == 0 for r in fr),
               "converged": sum(bool(r["converged"]) for r in fr) / len(fr)}
        if t in done_loc:
            old = next((r for r in rd.read("localisation").to_pylist() if r["key"] == t), None)
            row["r1_sq_task"] = old.get("r1_sq_task") if old else None
        else:
            if attr is None:
                attr = rd.load_tensors("attr")
            keys = [_prompt_id(r[KEY], r["j"]) for r in prows if r[GROUP] == t]
            x = torch.stack([attr[k].flatten() for k in keys])
            ok = x.norm(dim=1) > 0
            row["r1_sq_task"] = float(r1_squared(x[ok])) if int(ok.sum()) >= 2 else None
            rd.commit({"localisation": [row]}, keys=[t])
        counts = layer_counts([[(r["layer"], r["neuron"]) for r in krows if r["key"] == f["key"]] for f in fr],
                              lm.n_layers)
        row["layer_counts"] = counts
        ref = PAPER_REFERENCE.get(t, {})
        row.update({f"paper_{k}": v for k, v in ref.items()})
        loc.append(row)
    notes = [f"{t}: {i['kept']} of {i['total']} usable; dropped: {i['dropped'] or 'none'}"
             for t, i in infos.items()]
    notes.append("paper_* columns: Niu et al. (ICLR 2024) figures for their model, quoted for reference")
    write_result(rd, "localisation", loc, title=f"Localisation ({lm.name})", notes=notes,
                 columns=["task", "kind", "n_facts", "n_prompts", "kn", "tau", "r1_sq", "r1_sq_task",
                          "facts_without_kn", "converged", "paper_kn", "paper_tau", "paper_r1_sq"])
    write_result(rd, "bags", frows, columns=[*BAG_COLUMNS, "target", "n_kn", "p", "converged", "mean_base_prob"])
    write_result(rd, "kn", krows, columns=KN_COLUMNS)
    write_result(rd, "layer_distribution",
                 [{"task": r["task"], **{f"L{i}": c for i, c in enumerate(r["layer_counts"])}} for r in loc])
    groups = {}
    kinds = {r["kind"] for r in loc}
    if kinds == {"syntactic", "factual"}:
        for k in ("syntactic", "factual"):
            rs = [r["layer_counts"] for r in loc if r["kind"] == k]
            groups[k] = [sum(c) for c in zip(*rs)]
    else:
        groups = {r["task"]: r["layer_counts"] for r in loc}
    if groups and any(sum(c) for c in groups.values()):
        plot_layer_distribution(groups, rd.path / "plots" / "layer_distribution.png",
                                title=f"Knowledge neurons per layer ({lm.name})")
    return {"localisation": loc, "bags": frows, "kn": krows, "prompts": prows}


def read_kns(run) -> dict:
    """``{fact key: [(layer, neuron), ...]}`` from a :func:`localise` run
    directory (a path or a RunDir); facts without KNs map to ``[]``."""
    from ..rundir import RunDir

    from ..pipeline import read_kns as kn_lists

    rd = run if isinstance(run, RunDir) else RunDir.load(run)
    out = {r[KEY]: [] for r in rd.read("bags").to_pylist()}
    out.update(kn_lists(rd))
    if not out:
        raise InputError(f"{rd.path} holds no localised facts (run experiments.localise first)")
    return out
