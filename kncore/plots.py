"""Figures shared by the experiments, the demo and the report, and the
statistics drawn on them: the relative probability change under an edit with
its one-sample t-test, the paper's bar plot of it, and the layer distribution
of knowledge neurons. Written with :func:`kncore.atomic.atomic_write` (a temp
file, fsync'd, then a rename: a reader sees the old figure or the whole new one)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from .atomic import atomic_write
from .lm import InputError


# =============================================================================
# probability change under an edit
# =============================================================================
def relative_change(before, after) -> torch.Tensor:
    """(after - before) / min(before, after), elementwise (the paper's change
    in probability, symmetric in suppression and enhancement)."""
    b = torch.as_tensor(before, dtype=torch.float64)
    a = torch.as_tensor(after, dtype=torch.float64)
    if b.shape != a.shape:
        raise InputError(f"before {tuple(b.shape)} and after {tuple(a.shape)} differ in shape")
    if (b < 0).any() or (a < 0).any():
        raise InputError("probabilities must be non-negative")
    lo = torch.minimum(a, b)
    if (lo == 0).any():
        raise InputError("a probability is exactly 0; the relative change is undefined")
    return (a - b) / lo


def probability_change_stats(before, after, tokens: Sequence[str], *, alpha: float = 0.05,
                             test: str = "1samp") -> list[dict]:
    """Per token: the mean relative change over prompts and a t-test.

    ``before``/``after``: ``[n_prompts, n_tokens]`` probabilities (e.g. from
    :func:`token_probabilities`). ``test="1samp"``: one-sample t-test of the
    relative changes against 0; ``"rel"``: paired t-test of after vs before.
    ``significant`` is p < alpha.
    """
    from scipy import stats

    ch = relative_change(before, after)
    if ch.dim() != 2 or ch.shape[1] != len(tokens):
        raise InputError(f"expected [n_prompts, {len(tokens)}] probabilities, got {tuple(ch.shape)}")
    if test not in ("1samp", "rel"):
        raise InputError(f"test must be '1samp' or 'rel', got {test!r}")
    b = torch.as_tensor(before, dtype=torch.float64)
    a = torch.as_tensor(after, dtype=torch.float64)
    rows = []
    for j, tok in enumerate(tokens):
        c = ch[:, j].numpy()
        if len(c) < 2:
            t, p = math.nan, math.nan
        elif test == "1samp":
            t, p = stats.ttest_1samp(c, 0.0)
        else:
            t, p = stats.ttest_rel(a[:, j].numpy(), b[:, j].numpy())
        t, p = float(t), float(p)
        rows.append({"token": tok, "n": len(c), "mean_before": float(b[:, j].mean()),
                     "mean_after": float(a[:, j].mean()), "mean_change": float(c.mean()),
                     "std_change": float(c.std(ddof=1)) if len(c) > 1 else math.nan,
                     "t": t, "p_value": p, "significant": bool(p < alpha) if not math.isnan(p) else False})
    return rows


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure atomically, in the format its suffix names."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)
    fmt = path.suffix[1:] or matplotlib.rcParams["savefig.format"]  # (the temporary name has no suffix)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, bbox_inches="tight", dpi=150))
    return path


def plot_probability_changes(stats_by_condition: dict, path, *, title: str | None = None) -> Path:
    """The paper's bar plot: per token, one bar per condition (e.g.
    ``{"suppress": rows, "enhance": rows}`` from
    :func:`probability_change_stats`), the mean relative change in percent,
    a star over significant bars. Written atomically to ``path``."""
    from matplotlib.figure import Figure

    if not stats_by_condition:
        raise InputError("no conditions to plot")
    conds = list(stats_by_condition)
    tokens = [r["token"] for r in stats_by_condition[conds[0]]]
    for c in conds:
        if [r["token"] for r in stats_by_condition[c]] != tokens:
            raise InputError(f"condition {c!r} has different tokens from {conds[0]!r}")
    fig = Figure(figsize=(max(4.0, 1.1 * len(tokens) * len(conds)), 3.2))
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / len(conds)
    vals = []
    for k, c in enumerate(conds):
        xs = [i + (k - (len(conds) - 1) / 2) * w for i in range(len(tokens))]
        ys = [100 * r["mean_change"] for r in stats_by_condition[c]]
        vals += ys
        ax.bar(xs, ys, width=w, label=c)
        for x, y, r in zip(xs, ys, stats_by_condition[c]):
            if r["significant"]:
                ax.annotate("*", (x, y), ha="center", va="bottom" if y >= 0 else "top", fontsize=12,
                            xytext=(0, 2 if y >= 0 else -2), textcoords="offset points")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels([t.strip() for t in tokens])
    ax.set_ylabel("change in probability (%)")
    if title:
        ax.set_title(title)
    ax.legend(frameon=False)
    return save_figure(fig, path)


def plot_layer_distribution(groups: dict, path, *, n_layers: int | None = None, percent: bool = True,
                            title: str | None = None) -> Path:
    """The paper's layer-distribution figure: one panel per group, side by
    side (e.g. ``{"syntactic": counts, "factual": counts}``), bars of KN counts
    (or percentages) per layer. A group is a list of per-layer counts or
    anything :func:`layer_counts` takes (then ``n_layers`` is needed).
    Written atomically to ``path``."""
    from matplotlib.figure import Figure

    from .localisation import layer_counts

    if not groups:
        raise InputError("no groups to plot")
    series = {}
    for name, g in groups.items():
        if isinstance(g, (list, tuple)) and all(isinstance(c, int) for c in g):
            counts = list(g)
        else:
            if n_layers is None:
                raise InputError(f"group {name!r} holds KN sets: give n_layers=")
            counts = layer_counts(g, n_layers)
        series[name] = counts
    width = max(len(c) for c in series.values())
    fig = Figure(figsize=(3.6 * len(series), 3.1 if title else 2.8), layout="constrained")
    axes = [fig.add_subplot(1, len(series), i + 1) for i in range(len(series))]
    for ax, (name, counts) in zip(axes, series.items()):
        tot = sum(counts)
        ys = [100 * c / tot if (percent and tot) else c for c in counts]
        ax.bar(range(len(counts)), ys, width=0.8)
        ax.set_title(f"{name} (n={tot})")
        ax.set_xlabel("layer")
        ax.set_xlim(-0.7, width - 0.3)
    axes[0].set_ylabel("% of KNs" if percent else "KNs")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
