"""Reports of a run directory: one self-contained HTML page (figures embedded as
base64 PNG) and a Markdown version (figures as files beside it).

A report reads like a result: it opens with what was found, each finding with
a one-sentence reading computed from the data, its figures and its key table:

* knowledge neurons (``kn``, ``localisation``): how many, for how many facts,
  and the layer distribution (:func:`kncore.localisation.plot_layer_distribution`);
* causal tracing (``trace``): ROME's heatmaps and average indirect effect, and
  where restoring a state brings most of the answer back (:mod:`kncore.tracing`);
* interventions (``effect``): the probability-change bars with significance
  marked (:func:`kncore.plots.plot_probability_changes`) and their t-tests;
* edit evaluation (``edit_eval``): pass or fail per criterion (ROME's ES, PS,
  NS: success rates after the edit) and the metrics per method;
* sequential editing (``sequential``): the collapse curve, ES/PS/NS and
  generation entropy against the number of edits (:mod:`kncore.sequential`).

Then the figures in ``RUN/plots/`` and the run's summary; the manifest, the
config (values in full) and every table (a summary and its first rows) are
behind a fold at the end. Column names come from :mod:`kncore.pipeline`'s
schema. Any other table whose module registered a plot (:func:`register_plot`)
gets its figures among the findings.
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .atomic import atomic_write, atomic_write_text
from .lm import InputError
from .rundir import RunDir

# table name -> functions (table: pyarrow.Table, rd: RunDir) -> list[(title, matplotlib Figure or PNG bytes)]
PLOTS: dict[str, list[Callable]] = {}
# table name -> one-line description shown above it
DESCRIPTIONS: dict[str, str] = {
    "kn": "Knowledge neurons: one row per (item, layer, neuron).",
    "effect": "Target probability before and after an intervention on the item's neurons.",
    "trace": "Causal tracing: the target probability restored by each (token, layer) state.",
    "localisation": "Per relation (paradigm): facts, mean KNs per fact, sharing threshold tau, mean R1^2 "
                    "(Niu et al.'s table).",
    "bags": "Per fact: its paraphrases and the R1^2 similarity of their attribution vectors.",
    "edit_eval": "Edit evaluation: one row per (record, method).",
    "attribution": "Per-prompt attribution results.",
    "metrics": "Per-prompt metrics.",
}
_GROUP_COLS = ("method", "intervention", "kind", "relation", "paradigm", "cls")
# Integer columns that index things: their mean means nothing.
_INDEX_COLS = {"key", "layer", "neuron", "subject_start", "subject_end", "target_position", "window", "samples",
               "case_id", "known_id", "seed"}
# Known tables first, in this order; the rest alphabetically.
_ORDER = ("localisation", "kn", "effect", "trace", "edit_eval", "metrics", "pairs", "attribution", "bags", "prompts",
          "records", "stats")
_MAX_TRACES = 6


def register_plot(table: str):
    """Decorator: ``fn(table, rd) -> [(title, matplotlib Figure or PNG bytes)]`` draws figures for ``table``."""
    def deco(fn):
        PLOTS.setdefault(table, []).append(fn)
        return fn
    return deco


@dataclass
class Figure:
    title: str
    png: bytes
    name: str


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list = field(default_factory=list)   # (caption, header list, rows list of lists)
    figures: list = field(default_factory=list)  # Figure
    fold: bool = False  # behind the fold at the end (the run's details), not a finding


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _file_png(draw) -> bytes:
    """Bytes of a PNG that ``draw(path)`` writes (plot functions that take a path)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "fig.png"
        draw(p)
        return p.read_bytes()


# -- plots ------------------------------------------------------------------------------
def _layer_groups(tab, n_layers: int) -> dict:
    import numpy as np

    from .pipeline import GROUP, LAYER

    layers = np.asarray(tab.column(LAYER).to_pylist(), dtype=int)
    groups = {"all": layers}
    if GROUP in tab.column_names:
        rel = np.asarray([str(x) for x in tab.column(GROUP).to_pylist()], dtype=object)
        names = sorted(set(rel.tolist()))
        if 1 < len(names) <= 4:
            groups = {n: layers[rel == n] for n in names}
    return {k: np.bincount(v, minlength=n_layers)[:n_layers].astype(int).tolist() for k, v in groups.items()}


@register_plot("kn")
def plot_kn_layers(tab, rd):
    """Share of KNs in each layer (Niu et al.'s figure; kncore.localisation's plot),
    one panel per relation when there are at most four."""
    from .pipeline import LAYER

    if LAYER not in tab.column_names or tab.num_rows == 0:
        return []
    from .localisation import plot_layer_distribution

    n_layers = int((rd.manifest.get("model") or {}).get("n_layers") or max(tab.column(LAYER).to_pylist()) + 1)
    groups = _layer_groups(tab, n_layers)
    png = _file_png(lambda p: plot_layer_distribution(groups, p, title="Layer distribution of knowledge neurons"))
    return [(f"Layer distribution of {tab.num_rows} knowledge neurons", png)]


def _stars(p: float) -> str:
    if not (p == p):  # nan
        return "n/a"
    return "***" if p < 1e-3 else "**" if p < 1e-2 else "*" if p < 0.05 else "n.s."


def effect_summary(tab) -> list[dict]:
    """Per (relation, intervention): the paper's relative probability change
    ``(after - before) / min(before, after)`` averaged over prompts, and a
    one-sample t-test of it against 0 (:func:`kncore.evaluation.probability_change_stats`).
    Rows where a probability is exactly 0 (no relative change exists) are left
    out and counted in ``n_zero``."""
    import numpy as np

    from .pipeline import GROUP, INTERVENTION, P_AFTER, P_BEFORE
    from .plots import probability_change_stats

    cols = tab.column_names
    if not {P_BEFORE, P_AFTER} <= set(cols) or tab.num_rows == 0:
        return []
    pb = np.asarray(tab.column(P_BEFORE).to_pylist(), dtype=float)
    pa_ = np.asarray(tab.column(P_AFTER).to_pylist(), dtype=float)
    inter = np.asarray([str(x) for x in (tab.column(INTERVENTION).to_pylist() if INTERVENTION in cols
                                         else ["change"] * len(pb))], dtype=object)
    rel = np.asarray([str(x) for x in (tab.column(GROUP).to_pylist() if GROUP in cols
                                       else ["all"] * len(pb))], dtype=object)
    out = []
    for it in sorted(set(inter.tolist())):
        for r in sorted(set(rel.tolist())):
            m = (rel == r) & (inter == it)
            ok = m & (np.minimum(pb, pa_) > 0)
            if not ok.any():
                continue
            st = probability_change_stats(pb[ok][:, None], pa_[ok][:, None], [r])[0]
            out.append({"relation": r, "intervention": it, "n": int(ok.sum()), "n_zero": int(m.sum() - ok.sum()),
                        "p_before": st["mean_before"], "p_after": st["mean_after"],
                        "mean_change_pct": 100 * st["mean_change"], "t": st["t"], "p_value": st["p_value"],
                        "significance": _stars(st["p_value"]), "significant": st["significant"]})
    return out


@register_plot("effect")
def plot_effect(tab, rd):
    """The paper's bars: mean relative probability change per relation, one bar
    per intervention, a star over significant ones (kncore.evaluation's plot)."""
    from .plots import plot_probability_changes

    summ = effect_summary(tab)
    if not summ:
        return []
    rels = sorted({s["relation"] for s in summ})
    by: dict = {}
    for it in dict.fromkeys(s["intervention"] for s in summ):
        rows = {s["relation"]: s for s in summ if s["intervention"] == it}
        by[it] = [{"token": r, "mean_change": rows[r]["mean_change_pct"] / 100 if r in rows else 0.0,
                   "significant": bool(rows[r]["significant"]) if r in rows else False} for r in rels]
    png = _file_png(lambda p: plot_probability_changes(by, p, title="Probability change of the target "
                                                                      "(* p < 0.05, one-sample t-test)"))
    return [("Probability change under intervention", png)]


def _trace_results(tab) -> list:
    """The table's rows as :class:`kncore.tracing.TraceResult`, one per key (first seen order)."""
    from .pipeline import trace_results

    return trace_results(tab.to_pylist())


@register_plot("trace")
def plot_traces(tab, rd):
    """ROME's causal-trace heatmaps for the first few prompts, and the average
    indirect effect by token group over every traced prompt (kncore.tracing's plots)."""
    from .pipeline import TRACE_REQUIRED

    if not set(TRACE_REQUIRED) <= set(tab.column_names) or tab.num_rows == 0:
        return []
    from .tracing import average_indirect_effect

    model = (rd.manifest.get("model") or {}).get("name")
    results = _trace_results(tab)
    out = [(f"Causal trace: {r.prompt} -> {r.answer.strip()}", _file_png(lambda p, r=r: r.plot(p, model_name=model)))
           for r in results[:_MAX_TRACES]]
    if len(results) > 1 and len({r.n_layers for r in results}) == 1:
        aie = average_indirect_effect(results)
        out.append((f"Average indirect effect over {aie.count} traced prompts",
                    _file_png(lambda p: aie.plot(p, model_name=model))))
    return out


# -- tables ---------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        inner = ", ".join(_fmt(x) for x in v[:6])
        return f"[{inner}{', ...' if len(v) > 6 else ''}] ({len(v)})" if len(v) > 6 else f"[{inner}]"
    if isinstance(v, dict):
        return json.dumps(v, default=str)[:80]
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _numeric_summary(tab) -> tuple[list, list] | None:
    """Means of numeric columns, grouped by the first grouping column that splits the rows."""
    import numpy as np
    import pyarrow as pa

    num = [c for c in tab.column_names if c not in _INDEX_COLS and
           (pa.types.is_integer(tab.schema.field(c).type) or pa.types.is_floating(tab.schema.field(c).type)
            or pa.types.is_boolean(tab.schema.field(c).type))]
    if not num or tab.num_rows == 0:
        return None
    # the first grouping column that splits the rows
    gcol = next((c for c in _GROUP_COLS if c in tab.column_names and len(set(map(str, tab.column(c).to_pylist()))) > 1),
                None)
    gvals = tab.column(gcol).to_pylist() if gcol else ["all"] * tab.num_rows
    groups = list(dict.fromkeys(gvals))
    header = [gcol or "", "rows"] + [f"mean {c}" for c in num]
    arrs = {c: np.asarray([np.nan if v is None else float(v) for v in tab.column(c).to_pylist()]) for c in num}
    gv = np.asarray(gvals, dtype=object)
    rows = []
    for g in groups[:50]:
        m = gv == g
        rows.append([_fmt(g), str(int(m.sum()))] + [_fmt(float(np.nanmean(arrs[c][m])) if np.isfinite(arrs[c][m]).any()
                                                         else None) for c in num])
    return header, rows


_EDIT_METRICS = ("S", "ES", "PS", "NS", "EM", "PM", "NM", "locality_agree")


def edit_summary(tab):
    """The edit-evaluation table: one column per method, one row per metric
    (ROME's S, ES, PS, NS and margins, then each probe kind's probability and
    success before and after the edit), means over the cases."""
    import numpy as np

    from .pipeline import METHOD

    rows = tab.to_pylist()
    if not rows:
        return None
    methods = list(dict.fromkeys(str(r.get(METHOD, "edit")) for r in rows))

    def mean(m, col):
        v = [r.get(col) for r in rows if str(r.get(METHOD, "edit")) == m]
        v = [float(x) for x in v if isinstance(x, (int, float)) and not isinstance(x, bool) and x == x]
        return float(np.mean(v)) if v else None

    kinds = [c[: -len("_prob_pre")] for c in tab.column_names if c.endswith("_prob_pre")]
    metrics = [m for m in _EDIT_METRICS if m in tab.column_names]
    for k in kinds:
        metrics += [c for c in (f"{k}_prob_pre", f"{k}_prob_post", f"{k}_success_pre", f"{k}_success_post")
                    if c in tab.column_names]
    if "S" not in tab.column_names and all(m in tab.column_names for m in ("ES", "PS", "NS")):
        metrics.insert(0, "S")
    body = []
    for met in metrics:
        vals = []
        for m in methods:
            if met == "S" and "S" not in tab.column_names:
                es, ps, ns = (mean(m, c) for c in ("ES", "PS", "NS"))
                ok = None not in (es, ps, ns)
                v = (0.0 if min(es, ps, ns) == 0 else 3 / (1 / es + 1 / ps + 1 / ns)) if ok else None
            else:
                v = mean(m, met)
            vals.append(_fmt(v))
        body.append([met] + vals)
    n = [str(sum(1 for r in rows if str(r.get(METHOD, "edit")) == m)) for m in methods]
    return ("Edit evaluation (means over cases; S = harmonic mean of ES, PS, NS)", ["metric"] + methods,
            [["cases"] + n] + body)


def _table_section(name: str, tab, max_rows: int) -> Section:
    """A table in full detail (for the fold): its summary and its first rows."""
    n = tab.num_rows
    sec = Section(f"Table `{name}`", f"{DESCRIPTIONS.get(name, '')} {n} rows; columns: "
                  f"{', '.join(tab.column_names)}.".strip())
    ns = _numeric_summary(tab)
    if ns:
        sec.tables.append(("Summary", *ns))
    prev = tab.slice(0, max_rows).to_pylist()
    if prev:
        hdr = tab.column_names
        cap = f"First {len(prev)} of {n} rows (all of them in {name}.parquet)" if n > len(prev) else f"All {n} rows"
        sec.tables.append((cap, hdr, [[_fmt(r[h]) for h in hdr] for r in prev]))
    return sec


def _figures(name: str, tab, rd: RunDir) -> list:
    out = []
    for fn in PLOTS.get(name, []):
        for i, (title, fig) in enumerate(fn(tab, rd)):
            png = fig if isinstance(fig, bytes) else _png(fig)
            out.append(Figure(title, png, f"{name}-{fn.__name__}-{i}"))
    return out


# -- findings: what was found, each with a reading computed from the data ----------------
def _share(x: float) -> str:
    return f"{100 * x:.0f}%"


def kn_reading(tab, n_layers: int) -> str:
    """One sentence on the ``kn`` table: how many neurons for how many facts, and where they sit."""
    import numpy as np

    from .pipeline import GROUP, KEY, LAYER

    if tab.num_rows == 0 or LAYER not in tab.column_names:
        return "No knowledge neuron was found."
    layers = np.asarray(tab.column(LAYER).to_pylist(), dtype=int)
    counts = np.bincount(layers, minlength=n_layers)
    top = int(counts.argmax())
    facts = len(set(tab.column(KEY).to_pylist())) if KEY in tab.column_names else None
    groups = sorted(set(map(str, tab.column(GROUP).to_pylist()))) if GROUP in tab.column_names else []
    upper = float((layers >= n_layers / 2).mean())
    who = f" for {facts} facts ({tab.num_rows / facts:.1f} per fact)" if facts else ""
    rel = f" in {len(groups)} relation{'s' if len(groups) != 1 else ''}" if groups else ""
    return (f"{tab.num_rows} knowledge neurons{who}{rel}; {_share(upper)} of them sit in the upper half of the "
            f"{n_layers} layers, most in layer {top} ({counts[top]} neurons, {_share(counts[top] / len(layers))}).")


def trace_reading(results) -> str:
    """One sentence on traces: where restoring each kind of state brings most of the answer back."""
    import numpy as np

    from .tracing import average_indirect_effect
    from .tracing.corpus import GROUPS

    if not results or len({r.n_layers for r in results}) != 1:
        return f"{len(results)} traced prompts from models of different depths: no average is taken."
    aie = average_indirect_effect(results)
    parts = []
    for k in aie.kinds:
        m = np.where(np.isnan(aie.mean[k]), -np.inf, aie.mean[k])
        g, layer = np.unravel_index(int(m.argmax()), m.shape)
        gap = aie.high - aie.low
        frac = f", {_share((m[g, layer] - aie.low) / gap)} of the clean-corrupted gap" if gap > 0 else ""
        parts.append(f"{k} at the {GROUPS[g].lower()}, layer {layer} (P = {m[g, layer]:.3g}{frac})")
    return (f"Over {aie.count} traced prompt{'s' if aie.count != 1 else ''} (clean P = {aie.high:.3g}, corrupted "
            f"P = {aie.low:.3g}), restoring one state brings most of the answer back for " + "; ".join(parts) + ".")


def effect_reading(summ: list[dict]) -> str:
    """One sentence on :func:`effect_summary`: each intervention's mean change and how often it is significant."""
    import numpy as np

    parts = []
    for it in dict.fromkeys(s["intervention"] for s in summ):
        rows = [s for s in summ if s["intervention"] == it]
        n = sum(s["n"] for s in rows)
        change = float(np.average([s["mean_change_pct"] for s in rows], weights=[s["n"] for s in rows]))
        sig = sum(bool(s["significant"]) for s in rows)
        where = (f"significant (p < 0.05) in {sig} of {len(rows)} relations" if len(rows) > 1
                 else f"p = {rows[0]['p_value']:.2g}, {'significant' if sig else 'not significant'} at 0.05")
        parts.append(f"{it} {'raises' if change > 0 else 'lowers'} the target's probability, by "
                     f"{abs(change):.3g}% of the smaller of the two on average over {n} prompts ({where})")
    return _sentence(parts)


def _sentence(parts: list[str]) -> str:
    """Clauses joined into one sentence (first letter raised, the rest as written)."""
    s = "; ".join(parts)
    return s[:1].upper() + s[1:] + "."


# ROME's criteria and the probe kind each is the post-edit success rate of
# (kncore.evaluation.evaluate_edits): success means P(target) > P(foil).
CRITERIA = (("ES", "reliability", "efficacy: the edited prompt gives the new target"),
            ("PS", "generality", "paraphrases give the new target"),
            ("NS", "locality", "neighbouring prompts keep their own answer"))
# a criterion passes when more than this share of its cases succeed (ROME's
# success compares two answers, so half is what a coin would get)
PASS_RATE = 0.5


def edit_criteria(tab) -> tuple | None:
    """Pass or fail per criterion and method: ``(caption, header, rows, verdicts)``.
    A criterion's rate is its success rate over the cases after the edit (and
    before, where the table has it); ``verdicts[(method, criterion)]`` is True
    when the rate after the edit is above :data:`PASS_RATE`."""
    import math

    from .pipeline import METHOD

    rows = tab.to_pylist()
    cols = set(tab.column_names)
    crit = [(c, kind, what) for c, kind, what in CRITERIA if c in cols or f"{kind}_success_post" in cols]
    crit += [(kind, kind, f"{kind} probes (success after the edit)")
             for kind in (c[: -len("_success_post")] for c in tab.column_names if c.endswith("_success_post"))
             if kind not in {k for _, k, _ in CRITERIA}]
    if not rows or not crit:
        return None
    methods = list(dict.fromkeys(str(r.get(METHOD, "edit")) for r in rows))

    def rate(m, col):
        v = [r.get(col) for r in rows if str(r.get(METHOD, "edit")) == m]
        v = [float(x) for x in v if isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)]
        return (sum(v) / len(v), len(v)) if v else (None, 0)

    body, verdicts = [], {}
    for c, kind, what in crit:
        line = [c, what]
        for m in methods:
            post, n = rate(m, c if c in cols else f"{kind}_success_post")
            pre, _ = rate(m, f"{kind}_success_pre")
            if post is None:
                line.append("n/a")
                continue
            verdicts[(m, c)] = post > PASS_RATE
            before = f"{pre:.2f} -> " if pre is not None else ""
            line.append(f"{'PASS' if post > PASS_RATE else 'FAIL'} ({before}{post:.2f}, {n} cases)")
        body.append(line)
    cap = (f"Pass or fail per criterion: a criterion passes when more than {PASS_RATE:.0%} of the cases succeed "
           "after the edit (success: P(target) > P(foil); rates before -> after)")
    return cap, ["criterion", "what it checks"] + methods, body, verdicts


def edit_reading(verdicts: dict) -> str:
    """One sentence on :func:`edit_criteria`'s verdicts, per method."""
    methods = list(dict.fromkeys(m for m, _ in verdicts))
    parts = []
    for m in methods:
        got = [(c, ok) for (mm, c), ok in verdicts.items() if mm == m]
        passed = [c for c, ok in got if ok]
        failed = [c for c, ok in got if not ok]
        parts.append(f"{m} passes {len(passed)} of {len(got)} criteria"
                     + (f" (fails {', '.join(failed)})" if failed else ""))
    return _sentence(parts) if parts else "No criterion could be scored."


def _kn_by_group(tab) -> tuple:
    """Per relation: facts, KNs, KNs per fact, and the layer holding most of them."""
    from collections import Counter

    from .pipeline import GROUP, KEY, LAYER

    rows = tab.to_pylist()
    body = []
    for g in sorted({str(r[GROUP]) for r in rows}):
        rs = [r for r in rows if str(r[GROUP]) == g]
        facts = len({r.get(KEY) for r in rs})
        layer, n = Counter(r[LAYER] for r in rs).most_common(1)[0]
        body.append([g, str(facts), str(len(rs)), f"{len(rs) / facts:.2f}", f"{layer} ({n})"])
    return ("Per relation: facts with KNs, KNs, KNs per fact, the layer with most KNs",
            [GROUP, "facts", "KNs", "per fact", "top layer (KNs)"], body)


def _findings(rd: RunDir, tabs: dict) -> list[Section]:
    """The results first: KNs and their layers, traces, intervention effects,
    edit evaluation, each a reading, its figures and its key table; then the
    figures of any other table that registered some."""
    from .pipeline import GROUP, KEY, LAYER

    out = []
    n_layers = int((rd.manifest.get("model") or {}).get("n_layers") or 0)
    if "kn" in tabs:
        tab = tabs["kn"]
        nl = n_layers or (max(tab.column(LAYER).to_pylist()) + 1 if tab.num_rows else 1)
        sec = Section("Knowledge neurons", kn_reading(tab, nl), figures=_figures("kn", tab, rd))
        if "localisation" in tabs and tabs["localisation"].num_rows:
            loc = tabs["localisation"]
            hdr = [c for c in (KEY, "n_facts", "kn", "tau", "r1_sq") if c in loc.column_names]
            sec.tables.append(("Per relation: facts, mean KNs per fact, sharing threshold tau, mean R1^2",
                               hdr, [[_fmt(r[h]) for h in hdr] for r in loc.to_pylist()]))
        elif tab.num_rows and GROUP in tab.column_names:
            sec.tables.append(_kn_by_group(tab))
        out.append(sec)
    if "trace" in tabs:
        from .pipeline import TRACE_REQUIRED

        tab = tabs["trace"]
        ok = set(TRACE_REQUIRED) <= set(tab.column_names) and tab.num_rows
        text = trace_reading(_trace_results(tab)) if ok else "The trace table lacks the columns of a trace."
        out.append(Section("Causal tracing", text, figures=_figures("trace", tab, rd)))
    if "effect" in tabs:
        tab = tabs["effect"]
        summ = effect_summary(tab)
        sec = Section("Effect of interventions on the knowledge neurons",
                      effect_reading(summ) if summ else "No prompt has both probabilities above zero.",
                      figures=_figures("effect", tab, rd))
        if summ:
            hdr = list(summ[0])
            sec.tables.append(("Probability change (relative to min(before, after), mean over prompts; "
                               "one-sample t-test)", hdr, [[_fmt(s[h]) for h in hdr] for s in summ]))
        out.append(sec)
    if "edit_eval" in tabs:
        tab = tabs["edit_eval"]
        crit = edit_criteria(tab)
        sec = Section("Edit evaluation", edit_reading(crit[3]) if crit else "No pass/fail criterion in the table.",
                      figures=_figures("edit_eval", tab, rd))
        if crit:
            sec.tables.append(crit[:3])
        es = edit_summary(tab)
        if es:
            sec.tables.append(es)
        out.append(sec)
    if "sequential" in tabs and tabs["sequential"].num_rows:
        out.append(_sequential_finding(tabs["sequential"]))
    for name, tab in tabs.items():
        if name not in ("kn", "trace", "effect", "edit_eval") and PLOTS.get(name):
            figs = _figures(name, tab, rd)
            if figs:
                out.append(Section(f"Figures of `{name}`", DESCRIPTIONS.get(name, ""), figures=figs))
    return out


def _sequential_finding(tab) -> Section:
    """Sequential editing (kncore.sequential): the collapse curve, its reading, the metrics per batch."""
    from .sequential import METRICS, collapse_reading, plot_collapse

    rows = tab.to_pylist()
    sec = Section("Sequential editing", collapse_reading(rows),
                  figures=[Figure("Metrics against the number of edits (cumulative set of edited facts; "
                                  "0 = the unedited model on every fact)", _png(plot_collapse(rows)),
                                  "sequential-collapse")])
    hdr = ["batch", "n_edits", "scope", "n_cases", *METRICS, "entropy"]
    body = [[_fmt(r.get(h)) for h in hdr] for r in sorted(rows, key=lambda r: (r["n_edits"], r["scope"]))]
    sec.tables.append(("ES, PS, NS, S and generation n-gram entropy after each batch, on the facts edited so far "
                       "(cumulative) and on the batch alone", hdr, body))
    return sec


def _cell(v) -> str:
    """A config or summary value in full (never cut): JSON for containers."""
    return json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else str(v)


def build(run, *, max_rows: int = 30) -> list[Section]:
    """The report's sections for a run directory (a path or :class:`RunDir`):
    the findings first, then (``fold=True``) the run's manifest and config,
    every table in detail and the tensors."""
    rd = run if isinstance(run, RunDir) else RunDir.load(run)
    man = rd.manifest
    model = man.get("model") or {}
    git = man.get("git") or {}
    names = rd.tables()
    names = [n for n in _ORDER if n in names] + [n for n in names if n not in _ORDER]
    tabs = {n: rd.read(n) for n in names}
    sections = _findings(rd, tabs)
    if rd.plots_dir.is_dir():
        pngs = sorted(rd.plots_dir.glob("*.png"))
        if "sequential" in tabs:  # drawn among the findings from the table
            pngs = [p for p in pngs if p.name != "collapse.png"]
        if pngs:
            sections.append(Section("Plots", "Figures saved in the run's plots/ folder.",
                                    figures=[Figure(p.stem, p.read_bytes(), f"plots-{p.stem}") for p in pngs]))
    if man.get("summary"):
        sections.append(Section("Summary", "Run-wide figures the command recorded.",
                                tables=[("Summary", ["statistic", "value"],
                                         [[k, _fmt(v)] for k, v in sorted(man["summary"].items())])]))
    info = [["command", _cell(man.get("command"))], ["created", _cell(man.get("created"))],
            ["model", f"{model.get('name', '')} ({model.get('arch', '')}, {model.get('n_layers', '?')} layers, "
                      f"d_ff {model.get('d_ff', '?')}, fingerprint {model.get('fingerprint', '?')})"],
            ["git", f"{git.get('commit', 'n/a')}{' (dirty)' if git.get('dirty') else ''}"],
            ["versions", ", ".join(f"{k} {v}" for k, v in (man.get("versions") or {}).items())],
            ["sessions", str(len(man.get("sessions") or []))]]
    cfg = [[k, _cell(v)] for k, v in sorted((man.get("config") or {}).items())]
    sections.append(Section("Run", f"Run directory `{rd.path}`.", fold=True,
                            tables=[("Manifest", ["field", "value"], info), ("Config", ["key", "value"], cfg)]))
    for name in names:
        sec = _table_section(name, tabs[name], max_rows)
        sec.fold = True
        sections.append(sec)
    tdir = rd.path / "tensors"
    if tdir.is_dir():
        files = sorted(p for p in tdir.glob("*.safetensors"))
        if files:
            sections.append(Section("Tensors", "Dense tensors stored in the run directory.", fold=True,
                                    tables=[("Files", ["file", "MiB"],
                                             [[p.name, f"{p.stat().st_size / 2**20:.2f}"] for p in files])]))
    return sections


# -- writers ----------------------------------------------------------------------------
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f2f2f2}caption{text-align:left;font-weight:600;padding:4px 0}
figure{margin:1em 0}figcaption{font-size:13px;color:#555}img{max-width:100%}code{background:#f4f4f4}
p.reading{font-size:15px;border-left:3px solid #4a7;padding-left:.6em}details{margin-top:2em}
summary{font-size:18px;font-weight:600;cursor:pointer}td{word-break:break-word}"""
FOLD_TITLE = "Run details: manifest, config and the tables"


def _md_inline(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _html_text(s: str) -> str:
    """Escape, then render `code` spans."""
    parts = html.escape(s).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_section(s: Section) -> list[str]:
    out = [f"<h2>{_html_text(s.title)}</h2>"]
    if s.text:
        out.append(f"<p{'' if s.fold else ' class=reading'}>{_html_text(s.text)}</p>")
    for f in s.figures:
        b64 = base64.b64encode(f.png).decode()
        out.append(f"<figure><img alt='{html.escape(f.title)}' src='data:image/png;base64,{b64}'>"
                   f"<figcaption>{html.escape(f.title)}</figcaption></figure>")
    for cap, hdr, rows in s.tables:
        out.append(f"<table><caption>{html.escape(cap)}</caption><tr>"
                   + "".join(f"<th>{html.escape(str(h))}</th>" for h in hdr) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows]
        out.append("</table>")
    return out


def to_html(sections: list[Section], title: str) -> str:
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for s in (s for s in sections if not s.fold):
        out += _html_section(s)
    folded = [s for s in sections if s.fold]
    if folded:
        out.append(f"<details><summary>{html.escape(FOLD_TITLE)}</summary>")
        for s in folded:
            out += _html_section(s)
        out.append("</details>")
    out.append("</body></html>")
    return "\n".join(out)


def _md_section(s: Section, figdir: str) -> list[str]:
    out = [f"## {s.title}", ""]
    if s.text:
        out += [s.text, ""]
    for f in s.figures:
        out += [f"![{_md_inline(f.title)}]({figdir}/{f.name}.png)", ""]
    for cap, hdr, rows in s.tables:
        out += [f"**{_md_inline(cap)}**", "", "| " + " | ".join(_md_inline(str(h)) for h in hdr) + " |",
                "|" + "---|" * len(hdr)]
        out += ["| " + " | ".join(_md_inline(str(v)) for v in r) + " |" for r in rows]
        out.append("")
    return out


def to_markdown(sections: list[Section], title: str, figdir: str) -> str:
    out = [f"# {title}", ""]
    for s in (s for s in sections if not s.fold):
        out += _md_section(s, figdir)
    folded = [s for s in sections if s.fold]
    if folded:
        # GitHub and most Markdown renderers fold a <details> block; the blank
        # line after <summary> lets the Markdown inside it render
        out += ["<details>", f"<summary>{FOLD_TITLE}</summary>", ""]
        for s in folded:
            out += _md_section(s, figdir)
        out += ["</details>", ""]
    return "\n".join(out)


def write(run, out: str | Path | None = None, *, max_rows: int = 30) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ ``report_files/``).

    ``out``: the folder to write to (default: the run directory itself).
    Returns the paths of the HTML and Markdown files.
    """
    rd = run if isinstance(run, RunDir) else RunDir.load(run)
    out = Path(out) if out is not None else rd.path
    out.mkdir(parents=True, exist_ok=True)
    sections = build(rd, max_rows=max_rows)
    title = f"kncore report: {rd.manifest.get('command') or 'run'} ({rd.path.name})"
    figdir = "report_files"
    for s in sections:
        for f in s.figures:
            atomic_write(out / figdir / f"{f.name}.png", lambda tmp, b=f.png: Path(tmp).write_bytes(b))
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_text(html_path, to_html(sections, title))
    atomic_write_text(md_path, to_markdown(sections, title, figdir))
    return html_path, md_path


def check_run(path) -> RunDir:
    p = Path(path)
    if not p.exists():
        raise InputError(f"run directory {p} does not exist")
    return RunDir.load(p)
