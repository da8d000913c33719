"""Causal tracing (Meng et al. 2022, ROME's ``experiments/causal_trace.py``).

* :func:`trace` -- one prompt: the restoration grid of every (token, layer)
  for the kinds ``"hidden"`` (block output), ``"mlp"`` and ``"attn"`` (windows
  of ``window`` layers), computed from the corrupted run's key/value cache with
  many cells batched per forward; the numbers equal ROME's per-cell loop.
* :func:`trace_ref` -- the plain reference: one Hugging Face forward per cell
  with forward hooks, exactly as ROME does it. Tests and the benchmark compare
  against it.
* :func:`trace_corpus` / :func:`load_corpus` -- a data set in the known_1000
  format, resumable, one JSON file per record.
* :func:`average_indirect_effect` -- ROME's summary by token group
  (:class:`AIE`, with ROME's line plot).

See docs/tracing.md.
"""
from .core import KINDS, TraceResult, embedding_std, resolve_noise, trace, window_layers
from .reference import trace_ref
from .corpus import AIE, GROUPS, average_indirect_effect, load_corpus, trace_corpus

__all__ = ["trace", "TraceResult", "trace_ref", "trace_corpus", "load_corpus", "average_indirect_effect",
           "AIE", "GROUPS", "KINDS", "embedding_std", "resolve_noise", "window_layers"]
