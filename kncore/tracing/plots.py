"""Figures in ROME's style: the per-prompt heatmaps and the average indirect
effect line plot. Matplotlib's object API on an Agg canvas (no pyplot, no
global backend switch); files are written to a temp name and renamed."""
from __future__ import annotations

import math
from pathlib import Path

from ..lm import InputError

SUFFIXES = (".png", ".pdf", ".svg")
CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
KIND_NAMES = {"hidden": "state", "mlp": "MLP", "attn": "Attn"}


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=200)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise InputError(f"plot path {str(path)!r} must end in one of {SUFFIXES}")
    from ..atomic import atomic_write
    atomic_write(path, lambda tmp: fig.savefig(tmp, bbox_inches="tight", format=path.suffix[1:].lower()))
    return path


def _layer_ticks(ax, n_layers):
    step = 5 if n_layers > 10 else 1
    ticks = list(range(0, n_layers, step))
    ax.set_xticks([0.5 + i for i in ticks])
    ax.set_xticklabels([str(i) for i in ticks])


def plot_trace(result, path, kinds=None, model_name=None) -> Path:
    """Heatmaps of ``result.scores`` (ROME's ``plot_trace_heatmap``), one panel
    per kind, colour scale from the corrupted probability up."""
    kinds = tuple(kinds or result.kinds)
    for k in kinds:
        if k not in result.scores:
            raise InputError(f"kind {k!r} was not traced (have {tuple(result.scores)})")
    labels = list(result.tokens)
    b, e = result.subject_range
    for i in range(b, e):
        labels[i] = labels[i] + "*"
    T, N = result.scores[kinds[0]].shape
    fig = _figure(3.8 * len(kinds), 0.6 + 0.22 * T)
    model_name = model_name or result.model or "the model"
    for i, k in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), i + 1)
        h = ax.pcolor(result.scores[k].numpy(), cmap=CMAPS[k], vmin=result.low)
        ax.invert_yaxis()
        ax.set_yticks([0.5 + j for j in range(T)])
        ax.set_yticklabels(labels if i == 0 else [""] * T, fontsize=7)
        _layer_ticks(ax, N)
        if k == "hidden":
            ax.set_title("Impact of restoring state after corrupted input", fontsize=8)
            ax.set_xlabel(f"single restored layer within {model_name}", fontsize=7)
        else:
            ax.set_title(f"Impact of restoring {KIND_NAMES[k]} after corrupted input", fontsize=8)
            ax.set_xlabel(f"center of interval of {result.window} restored {KIND_NAMES[k]} layers", fontsize=7)
        cb = fig.colorbar(h, ax=ax)
        cb.ax.set_title(f"p({result.answer.strip()})", y=-0.16, fontsize=7)
    return _save(fig, path)


def plot_aie(aie, path, model_name=None) -> Path:
    """ROME's line plot: average indirect effect per token group over layers,
    with a 95% band (1.96 std / sqrt(count)), one panel per kind."""
    from .corpus import GROUPS

    color_order = [0, 1, 2, 4, 5, 3]  # ROME's colours
    kinds = tuple(aie.kinds)
    fig = _figure(4.3 * len(kinds), 3.5)
    titles = {"hidden": "single hidden vector", "mlp": f"run of {aie.window} MLP lookups",
              "attn": f"run of {aie.window} Attn modules"}
    from matplotlib import colormaps
    colors = colormaps["tab10"].colors
    model_name = model_name or aie.model or "the model"
    ax0 = None
    for j, k in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), j + 1, sharey=ax0)
        ax0 = ax0 or ax
        eff = aie.effect(k)
        N = eff.shape[1]
        x = list(range(N))
        for i, label in enumerate(GROUPS):
            y = eff[i]
            err = aie.std[k][i] * 1.96 / math.sqrt(max(aie.count, 1))
            c = colors[color_order[i]]
            ax.fill_between(x, y - err, y + err, alpha=0.3, color=c)
            ax.plot(x, y, label=label, color=c)
        ax.set_title(f"Average indirect effect of a {titles[k]}", fontsize=9)
        ax.set_ylabel("Average indirect effect on p(o)", fontsize=8)
        ax.set_xlabel(f"Layer number in {model_name}", fontsize=8)
    fig.axes[min(1, len(kinds) - 1)].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
