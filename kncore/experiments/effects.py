"""Experiment 2: what suppressing (x0) or enhancing (x2) a fact's knowledge
neurons does (Niu et al. 2024, §3: BLiMP accuracy before and after, and the
bar plot of probability changes of the determiners)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from ..lm import LM, InputError
from ..pipeline import SCHEMA_VERSION
from .common import (DETERMINERS, PAPER_ACCURACY, open_run, parse_task, progress_bar, run_items_closing, safe_name,
                     task_facts, task_name, write_result)

MODES = ("suppress", "enhance")


def _kns_for(lm, task, out, kns, localise_options):
    """{fact key: neurons}: given, read from a localise run, or localised now
    into ``out/localise``."""
    from ..rundir import RunDir
    from .localising import localise, read_kns

    if kns is None:
        sub = Path(out.path if isinstance(out, RunDir) else out) / "localise"
        localise(lm, task, sub, **localise_options)
        return read_kns(sub), str(sub)
    if isinstance(kns, (str, Path, RunDir)):
        return read_kns(kns), str(kns.path if isinstance(kns, RunDir) else kns)
    if isinstance(kns, dict):
        return {str(k): [(int(l), int(n)) for l, n in v] for k, v in kns.items()}, "given"
    raise InputError("kns must be None (localise now), a localise run directory, or {fact key: [(layer, neuron)]}")


def _paper_stats(before: torch.Tensor, after: torch.Tensor, tokens: Sequence[str]) -> list[dict]:
    """Per token, as Niu et al.'s ``kn_code/plot.py``: the change of the mean
    probability over the smaller mean, ``(mean_after - mean_before) /
    min(mean_before, mean_after)``, and an independent two-sample t-test of
    the before and after probabilities (``scipy.stats.ttest_ind``)."""
    from scipy import stats

    rows = []
    for j, tok in enumerate(tokens):
        b, a = before[:, j].double(), after[:, j].double()
        mb, ma = float(b.mean()), float(a.mean())
        lo = min(mb, ma)
        change = (ma - mb) / lo if lo > 0 else math.nan
        if len(b) >= 2 and (b.std() > 0 or a.std() > 0):
            p = float(stats.ttest_ind(b.numpy(), a.numpy()).pvalue)
        else:
            p = math.nan
        rows.append({"token": tok, "paper_change": change, "paper_p": p,
                     "paper_significant": bool(p < 0.05) if not math.isnan(p) else False})
    return rows


def _change_rows(before, after, tokens) -> list[dict]:
    """Both definitions side by side: the paper's (change of means, t-test of
    independent samples) and kncore.evaluation's per-prompt relative change
    with a one-sample t-test; probabilities of exactly 0 (underflow) are
    dropped from the per-prompt statistic."""
    from ..plots import probability_change_stats

    paper = _paper_stats(before, after, tokens)
    ok = (torch.minimum(before, after) > 0).all(1)
    per = probability_change_stats(before[ok], after[ok], tokens) if int(ok.sum()) else None
    rows = []
    for j, tok in enumerate(tokens):
        r = {"token": tok, "n": len(before), "mean_before": float(before[:, j].mean()),
             "mean_after": float(after[:, j].mean()), **{k: v for k, v in paper[j].items() if k != "token"}}
        if per is not None:
            r.update(mean_rel_change=per[j]["mean_change"], p_1samp=per[j]["p_value"],
                     significant_1samp=per[j]["significant"])
        rows.append(r)
    return rows


def kn_edit_effects(lm: LM, task: str, out, *, kns=None, modes: Sequence[str] = MODES, factor: float = 2.0,
                    tokens: Sequence[str] | None = None, limit: int | None = None, eval_limit: int | None = None,
                    accuracy_method: str | None = None, prompt_style: str = "paper", group_by: str = "class",
                    site: str = "act", data_dir=None, progress: bool = True, **localise_options) -> dict:
    """Suppress or enhance each fact's knowledge neurons and measure what changes.

    ``task``: ``"blimp:<paradigm>"`` or ``"pararel:<relation>"``. ``kns``:
    None (localise them now with :func:`localise` into ``out/localise``;
    ``localise_options`` such as ``steps=``, ``layers=`` go to it, with this
    call's ``limit``, ``prompt_style``, ``group_by`` and ``data_dir``), a
    localise run directory, or ``{fact key: [(layer, neuron), ...]}``.
    ``modes``: ``"suppress"`` (activations x0) and/or ``"enhance"`` (x ``factor``),
    through :func:`kncore.patch_neurons` at ``site`` (the site the KNs were
    localised at: ``"act"``, or ``"pre_act"``).

    BLiMP, for each class with KNs and each mode:

    * minimal-pair accuracy of the paradigm (``eval_limit`` pairs; all by
      default) before and during the edit. ``accuracy_method``: decoders
      ``"sentence"`` (BLiMP's sum of token log-probs; the neurons are patched at
      every position, since the sentence score reads them all), masked LMs
      ``"target"`` (P(good) > P(bad) at the [MASK], patched there, the paper's
      BERT setting);
    * the probability of each of ``tokens`` (default: this/that/these/those for
      determiner paradigms, else the paradigm's targets) at the class's prompts
      (where the KNs were found), before and during the edit: the paper's change
      (change of means over the smaller mean, ``ttest_ind``) and the per-prompt
      relative change (one-sample t-test); the paper's bar plot per class.

    PARAREL, for each fact with KNs and each mode: P(object) and top-1
    accuracy on its prompts before and during the edit, summarised per mode.

    Written into ``out``: Parquet ``accuracy``, ``pairs``, ``token_probs`` (BLiMP)
    or ``effect`` (PARAREL: per prompt and intervention, the columns of
    :mod:`kncore.pipeline`'s ``effect`` table, which ``kncore report`` draws),
    ``results/*.md|csv``, ``plots/*.png``.
    Resumable per (fact, mode). Returns the summary tables as lists of dicts.
    """
    from ..interventions import MODES as ALL_MODES

    task = task_name(task)
    src, name = parse_task(task)
    modes = [modes] if isinstance(modes, str) else list(modes)
    bad = [m for m in modes if m not in ALL_MODES]
    if not modes or bad:
        raise InputError(f"modes must be a non-empty list of {ALL_MODES}, got {modes!r}")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor)):
        raise InputError(f"factor must be a finite number, got {factor!r}")
    if eval_limit is not None and (isinstance(eval_limit, bool) or not isinstance(eval_limit, int) or eval_limit < 1):
        raise InputError(f"eval_limit must be a positive integer or None, got {eval_limit!r}")
    method = accuracy_method or ("target" if lm.is_mlm else "sentence")
    if method not in ("sentence", "target"):
        raise InputError(f"accuracy_method must be 'sentence' or 'target', got {accuracy_method!r}")
    if method == "sentence" and lm.is_mlm:
        raise InputError("a masked LM has no sentence probability: use accuracy_method='target'")
    loc_opts = dict(localise_options, limit=limit, prompt_style=prompt_style, group_by=group_by, site=site,
                    data_dir=data_dir, progress=progress)
    known, kn_source = _kns_for(lm, task, out, kns, loc_opts)
    facts, info = task_facts(lm, task, limit=limit, prompt_style=prompt_style, group_by=group_by, data_dir=data_dir)
    have = [f for f in facts if known.get(f.key)]
    missing = [f.key for f in facts if f.key not in known]
    if missing and kns is not None and not isinstance(kns, dict):
        raise InputError(f"the localise run {kn_source} has no KNs for {len(missing)} fact(s) of {task} "
                         f"(e.g. {missing[0]}); it was run with other options")
    config = {"experiment": "kn_edit_effects", "schema": SCHEMA_VERSION, "task": task, "modes": modes, "factor": factor, "site": site,
              "limit": limit,
              "eval_limit": eval_limit, "accuracy_method": method, "prompt_style": prompt_style,
              "group_by": group_by, "tokens": list(tokens) if tokens is not None else None,
              "kns": {f.key: known.get(f.key, []) for f in facts}, "localise": {k: v for k, v in loc_opts.items()
                                                                                if k not in ("progress", "data_dir")}}
    rd, mine = open_run(out, config, lm, "experiments.kn_edit_effects")
    try:
        if src == "blimp":
            result = _blimp_effects(lm, rd, task, name, have, known, modes, factor, site, tokens, eval_limit,
                                    method, data_dir, progress)
        else:
            result = _pararel_effects(lm, rd, task, have, known, modes, factor, site, progress)
        rd.update_manifest(summary={k: v for k, v in result.items() if k != "pairs"}, data=info,
                           kn_source=kn_source)
        return result
    finally:
        if mine:
            rd.close()


def _patch(lm, neurons, mode, factor, site, positions="target"):
    from ..interventions import patch_neurons
    return patch_neurons(lm, neurons, mode=mode, factor=factor, positions=positions, site=site)


def _default_tokens(lm, paradigm, facts):
    if paradigm.startswith("determiner_noun_agreement"):
        return list(DETERMINERS)
    ts = []
    for f in facts:
        ts += [t.strip() for t in f.targets]
    return list(dict.fromkeys(ts))[:12]


def _blimp_effects(lm, rd, task, paradigm, facts, known, modes, factor, site, tokens, eval_limit, method,
                   data_dir, progress):
    from ..evaluation import minimal_pair_scores, summarise_pairs, token_probabilities
    from ..plots import plot_probability_changes
    from .common import blimp_pair_prompts

    # The sentence score reads only the sentences, and every pair whose
    # sentences differ in one token has a paper-style prompt (all 1000 of
    # determiner_noun_agreement_2 on SmolLM2, against 770 with BLiMP's
    # two-prefix prompts, which need a one-token noun); a masked LM's paper
    # prompts are the masked sentences. A decoder's "target" score needs
    # BLiMP's own prompts (the noun after "this"/"these").
    style = "paper" if (method == "sentence" or lm.is_mlm) else "blimp"
    pairs = list(blimp_pair_prompts(lm, paradigm, style=style, data_dir=data_dir))
    pairs = pairs[:eval_limit] if eval_limit is not None else pairs
    if not pairs:
        raise InputError(f"{task}: no minimal pairs usable with this model")
    tokens = list(tokens) if tokens is not None else _default_tokens(lm, paradigm, facts)
    positions = "all" if method == "sentence" else "target"
    items = [("before", None)] + [(f"{f.label}/{m}", (f, m)) for f in facts for m in modes]
    bar = progress_bar(len(items) - len(rd.done_keys("accuracy") & {k for k, _ in items}), "KN edits", progress)

    def work(chunk):
        acc, prs, tps = [], [], []
        for payload in chunk:
            if payload is None:
                key, fact, mode, rows = "before", None, None, minimal_pair_scores(lm, pairs, method=method)
            else:
                fact, mode = payload
                key = f"{fact.label}/{mode}"
                neurons = known[fact.key]
                with _patch(lm, neurons, mode, factor, site, positions):
                    rows = minimal_pair_scores(lm, pairs, method=method)
                before = token_probabilities(lm, fact.prompts, tokens)
                with _patch(lm, neurons, mode, factor, site):
                    after = token_probabilities(lm, fact.prompts, tokens)
                for i, q in enumerate(fact.prompts):
                    tps += [{"key": key, "fact": fact.key, "label": fact.label, "mode": mode, "i": i, "prompt": q,
                             "token": t, "p_before": float(before[i, j]), "p_after": float(after[i, j])}
                            for j, t in enumerate(tokens)]
            s = summarise_pairs(rows)
            base = {"key": key, "fact": fact.key if fact else None, "label": fact.label if fact else None,
                    "mode": mode, "n_kn": len(known[fact.key]) if fact else 0, "method": method}
            acc.append({**base, "cls": "all", "n": s["n"], "accuracy": s["accuracy"]})
            acc += [{**base, "cls": c, "n": s["n_by_class"][c], "accuracy": a} for c, a in s["by_class"].items()]
            prs += [{"key": key, "pair_id": r["pair_id"], "cls": r["cls"], "score_good": r["score_good"],
                     "score_bad": r["score_bad"], "correct": r["correct"]} for r in rows]
            if bar is not None:
                bar.update(1)
        return {"accuracy": acc, "pairs": prs, "token_probs": tps}

    run_items_closing(rd, items, work, table="accuracy", chunk=1, bar=bar)
    acc = rd.read("accuracy").to_pylist()
    before = {r["cls"]: r["accuracy"] for r in acc if r["key"] == "before"}
    acc_rows = []
    for r in acc:
        if r["key"] == "before":
            continue
        acc_rows.append({"class_edited": r["label"], "mode": r["mode"], "n_kn": r["n_kn"], "pairs_of": r["cls"],
                         "n": r["n"], "accuracy_before": before.get(r["cls"]), "accuracy_after": r["accuracy"],
                         "change": r["accuracy"] - before.get(r["cls"], math.nan)})
    ref = PAPER_ACCURACY.get(task)
    notes = [f"method: {method}; neurons patched at {'every position' if positions == 'all' else 'the target'}; "
             f"enhance = x{factor}"]
    if ref:
        notes.append(f"paper (its model): accuracy {ref['before']:.1%} before, {ref['after_suppress']:.1%} after "
                     f"suppression")
    write_result(rd, "accuracy", acc_rows, title=f"Minimal-pair accuracy under KN edits ({task}, {lm.name})",
                 notes=notes)
    tp = rd.read("token_probs").to_pylist()
    change_rows = []
    for f in facts:
        conds = {}
        for m in modes:
            rows = [r for r in tp if r["fact"] == f.key and r["mode"] == m]
            if not rows:
                continue
            n = max(r["i"] for r in rows) + 1
            b = torch.zeros(n, len(tokens), dtype=torch.float64)
            a = torch.zeros_like(b)
            for r in rows:
                j = tokens.index(r["token"])
                b[r["i"], j], a[r["i"], j] = r["p_before"], r["p_after"]
            cr = _change_rows(b, a, tokens)
            change_rows += [{"class_edited": f.label, "mode": m, "n_kn": len(known[f.key]), **r} for r in cr]
            conds[m] = [{"token": r["token"], "mean_change": r["paper_change"],
                         "significant": r["paper_significant"]} for r in cr]
        if conds:
            plot_probability_changes(conds, rd.path / "plots" / f"prob_change_{safe_name(f.label)}.png",
                                     title=f"{paradigm}: KNs of '{f.label}' ({len(known[f.key])} neurons)")
    write_result(rd, "prob_change", change_rows, title=f"Probability change of {', '.join(tokens)} ({task})",
                 notes=["paper_change: (mean after - mean before) / min(mean before, mean after); paper_p: "
                        "ttest_ind(before, after), as Niu et al.'s plot code",
                        "mean_rel_change: mean over prompts of (after - before) / min(before, after); p_1samp: "
                        "one-sample t-test of those changes"])
    return {"accuracy": acc_rows, "prob_change": change_rows, "tokens": tokens}


def _pararel_effects(lm, rd, task, facts, known, modes, factor, site, progress):
    from ..plots import plot_probability_changes

    if not facts:
        raise InputError(f"{task}: no fact has knowledge neurons to edit")
    items = [(f"{f.key}/{m}", (f, m)) for f in facts for m in modes]
    bar = progress_bar(len(items) - len(rd.done_keys("effect") & {k for k, _ in items}), "KN edits", progress)

    def probs(f):
        ids = torch.tensor([lm.target_ids(q, t)[0] for q, t in zip(f.prompts, f.targets)])
        pr = lm.next_token_probs(f.prompts)
        return pr.gather(1, ids[:, None].to(pr.device))[:, 0].double().cpu(), (pr.argmax(-1).cpu() == ids)

    def work(chunk):
        rows = []
        for f, m in chunk:
            pb, tb = probs(f)
            with _patch(lm, known[f.key], m, factor, site):
                pa, ta = probs(f)
            # kncore.pipeline's effect rows (as `kncore localise` writes them), then the top-1 hits;
            # the work item (its done key) is the fact and the intervention
            rows += [{"key": f.key, "relation": task, "prompt": q, "intervention": m, "n_kn": len(known[f.key]),
                      "p_before": float(x), "p_after": float(y), "subject": f.label, "target": t,
                      "top1_before": bool(u), "top1_after": bool(v)}
                     for q, t, x, y, u, v in zip(f.prompts, f.targets, pb, pa, tb, ta)]
            if bar is not None:
                bar.update(1)
        return {"effect": rows}

    run_items_closing(rd, items, work, table="effect", chunk=4, bar=bar)
    rows = rd.read("effect").to_pylist()
    summary, conds = [], {}
    for m in modes:
        rs = [r for r in rows if r["intervention"] == m]
        b = torch.tensor([[r["p_before"]] for r in rs], dtype=torch.float64)
        a = torch.tensor([[r["p_after"]] for r in rs], dtype=torch.float64)
        cr = _change_rows(b, a, ["object"])[0]
        summary.append({"mode": m, "n_facts": len({r["key"] for r in rs}), "n_prompts": len(rs),
                        "mean_kn": sum(len(known[f.key]) for f in facts) / len(facts),
                        "top1_before": sum(r["top1_before"] for r in rs) / len(rs),
                        "top1_after": sum(r["top1_after"] for r in rs) / len(rs),
                        **{k: v for k, v in cr.items() if k not in ("token", "n")}})
        conds[m] = [{"token": "object", "mean_change": cr["paper_change"], "significant": cr["paper_significant"]}]
    write_result(rd, "effects", summary, title=f"KN edits of {task} ({lm.name}): the fact's own object",
                 notes=["P(object) and top-1 accuracy on the fact's prompts, before and during the edit"])
    plot_probability_changes(conds, rd.path / "plots" / "prob_change_object.png",
                             title=f"{task}: P(object) under KN edits")
    return {"effects": summary}
