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
import os

# MKL's conditional numerical reproducibility: without it, MKL's fp32 matmuls
# can round differently with the alignment of their buffers, so one process's
# results differ from the next's. Measured at c632e2c: kncore.trace on the
# quick bench_trace model gave one of two score tables across processes
# (2.0e-6 vs 2.8e-5 relative from ROME's loop, the second in about 1 run in 9),
# and 0 of 22 runs varied with MKL_CBWR=AUTO or COMPATIBLE, at the same speed
# for AUTO. MKL reads the variable at its first call, so this holds when kncore
# is imported before the first matmul; a user's own setting is kept.
os.environ.setdefault("MKL_CBWR", "AUTO")

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
