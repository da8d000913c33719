"""kncore: fast knowledge-neuron attribution, causal tracing and ROME editing.

Three levels of API:

* raw ops: :mod:`kncore.ops` (C++ and Triton kernels with references);
* functional building blocks that take a model and tensors:
  :func:`kncore.runtime.run`, :func:`attribute`, :func:`trace`, :mod:`kncore.rome`;
* entry points that take names, data sets and run directories: the CLI
  (``python -m kncore``) and :mod:`kncore.experiments`.
"""
from __future__ import annotations

import importlib

from .errors import InputError

__version__ = "0.1.0"

# Names served lazily from their modules, so `import kncore` stays light: the
# command line's --help and its argument checks need no torch. Measured on the
# shared 2-core dev box (python -X importtime -m kncore --help): importing torch
# was 4.2-12 s of the CLI's start-up; `kncore --help` went from 8.5-26 s to 0.5-0.9 s.
_LAZY = {
    "LM": "kncore.lm",
    "Batch": "kncore.lm",
    "load": "kncore.loading",
    "from_hf": "kncore.loading",
    "run": "kncore.runtime",
    "Patch": "kncore.runtime",
    "KVCache": "kncore.runtime",
    "RunOutput": "kncore.runtime",
    "hook_name": "kncore.runtime",
    "attribute": "kncore.attribution",
    "Attribution": "kncore.attribution",
    "select_coarse": "kncore.selection",
    "refine": "kncore.selection",
    "patch_neurons": "kncore.interventions",
    "trace": "kncore.tracing",
    "TraceResult": "kncore.tracing",
    "plan": "kncore.planner",
}
_SUBMODULES = ("lm", "loading", "runtime", "models", "ops", "rome", "compat", "data", "tracing", "attribution",
               "selection", "interventions", "evaluation", "localisation", "experiments", "rundir", "info", "cli",
               "testing", "demo", "distributed", "report", "planner", "t5", "runtime_t5")


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"kncore.{name}")
    raise AttributeError(f"module 'kncore' has no attribute {name!r}")


__all__ = ["InputError", *_LAZY]
