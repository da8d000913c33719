"""The plain reference for causal tracing: ROME's per-cell loop.

One Hugging Face forward per cell on a batch of the clean prompt (row 0) and
``samples`` corrupted copies (rows 1..), with forward hooks that add ROME's
noise to the token embeddings of rows 1.. and copy row 0's state into rows 1..
at the restored (token, module) pairs -- what ROME's ``trace_with_patch`` does
through ``nethook.TraceDict``. Slow by design: it is what :func:`trace` is
checked against and what ``bench/bench_trace.py`` times.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..lm import LM
from ..models.base import get_module
from .core import KINDS, TraceResult, check_args, noise_hook, prepare, resolve_target, window_layers


def module_name(lm: LM, layer: int, kind: str) -> str:
    """The HF module whose output ROME restores for a kind: the block ("hidden"),
    its MLP or its attention (BERT: the dense layers before the residual
    LayerNorm, which are the runtime's ``mlp_out`` / ``attn_out``)."""
    ad = lm.adapter
    if kind == "hidden":
        return ad.layer_module_name(layer)
    if ad.arch == "bert":
        return f"{ad.layer_module_name(layer)}.{'output.dense' if kind == 'mlp' else 'attention.output.dense'}"
    return ad.layer_module_name(layer, kind)


def _untuple(x):
    return x[0] if isinstance(x, tuple) else x


def _restore_hook(tokens):
    def hook(module, inputs, out):
        h = _untuple(out)
        for t in tokens:
            h[1:, t] = h[0, t]
        return out
    return hook


@torch.no_grad()
def trace_ref(lm: LM, prompt: str, subject: str, *, target=None, kinds: Iterable[str] = KINDS,
              samples: int = 10, noise="3sd", noise_subjects: Sequence[str] | None = None,
              window: int = 10, seed: int = 1, cells: Iterable[tuple] | None = None) -> TraceResult:
    """Causal tracing the way ROME computes it: one HF forward per cell.

    Same arguments and result as :func:`kncore.trace`. ``cells``, a list of
    ``(kind, token, layer)``, restricts the work to those cells (the others are
    NaN); the benchmark uses it to time a sample of cells on big models.
    """
    kinds = check_args(kinds, samples, window, seed)
    ids, (b, e), tpos, scale, noise_t = prepare(lm, prompt, subject, samples, noise, noise_subjects, seed)
    model, ad = lm.model, lm.adapter
    N, T = ad.n_layers, len(ids)
    inp = torch.tensor([ids] * (samples + 1), device=lm.device)
    p_clean = torch.softmax(model(input_ids=inp[:1]).logits[0, tpos].float(), -1)
    tgt = resolve_target(lm, prompt, target, p_clean)
    embed = ad.embedding_module()

    def run_cell(states):
        """ROME's trace_with_patch: states is a list of (token, module name)."""
        by_module: dict = {}
        for t, name in states:
            by_module.setdefault(name, []).append(t)
        handles = [embed.register_forward_hook(noise_hook(b, e, noise_t, first_row=1))]
        try:
            for name, toks in by_module.items():
                handles.append(get_module(model, name).register_forward_hook(_restore_hook(toks)))
            logits = model(input_ids=inp).logits
        finally:
            for hd in handles:
                hd.remove()
        return float(torch.softmax(logits[1:, tpos], dim=1).mean(dim=0)[tgt])

    low = run_cell([])
    if cells is None:
        cells = [(k, t, l) for k in kinds for t in range(T) for l in range(N)]
    scores = {k: torch.full((T, N), float("nan")) for k in kinds}
    for k, t, l in cells:
        if k not in scores:
            raise ValueError(f"cell kind {k!r} is not among the traced kinds {kinds}")
        layers = [l] if k == "hidden" else list(window_layers(l, window, N))
        scores[k][t, l] = run_cell([(t, module_name(lm, L, k)) for L in layers])
    tok = lm.tokenizer
    return TraceResult(scores=scores, low=low, high=float(p_clean[tgt]), tokens=[tok.decode([i]) for i in ids],
                       input_ids=list(ids), subject_range=(b, e), target=tgt, answer=tok.decode([tgt]),
                       target_position=tpos, prompt=prompt, subject=subject, kinds=kinds, window=int(window),
                       samples=int(samples), noise=scale, seed=int(seed), model=str(lm.name))
