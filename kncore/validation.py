"""One declared range per numeric argument, checked in one place.

:data:`RANGES` names every numeric parameter the command line and the public
API take (``steps``, ``limit``, ``samples``, ``window``, ``batch_size``...),
with its type and bounds. Both layers check through it:

* the command line gives each option ``type=arg("steps")``, so argparse refuses
  ``--steps 0`` before anything is loaded or written, with one line naming the
  option (``argument --steps: must be an integer >= 1, got '0'``);
* the API functions call :func:`check` at their top
  (``check("steps", steps)`` raises :class:`InputError` naming ``steps``).

This module imports nothing heavy (no torch), so the parser stays fast to build.
"""
from __future__ import annotations

import argparse
import math
import numbers
import re
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Range:
    """A numeric parameter: ``kind`` (int or float), inclusive bounds ``lo``/``hi``
    (``lo_open``: ``lo`` itself excluded), ``none``: None is allowed (a default
    or "all"), ``words``: strings accepted as they are (``"auto"``)."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    none: bool = False
    words: tuple = ()

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.lo is not None and self.hi is not None:
            what += f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"
        elif self.lo is not None:
            what += f" {'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            what += f" <= {self.hi:g}"
        alts = [repr(w) for w in self.words] + (["None"] if self.none else [])
        return what + (f" (or {' or '.join(alts)})" if alts else "")

    def ok(self, v) -> bool:
        if isinstance(v, bool):
            return False
        if self.kind is int:
            if not isinstance(v, numbers.Integral):
                return False
        elif not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or v <= self.hi

    def check(self, value, name: str):
        """``value`` if it is in range, else :class:`InputError` naming ``name``."""
        if value is None and self.none:
            return None
        if isinstance(value, str) and value in self.words:
            return value
        if not self.ok(value):
            raise InputError(f"{name} must be {self.describe()}, got {value!r}")
        return int(value) if self.kind is int else float(value)

    def parse(self, text: str):
        """A command-line string to its value, checked (for argparse's ``type=``)."""
        if text in self.words:
            return text
        try:
            v = int(text) if self.kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if not self.ok(v):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return v


# Every numeric argument of the command line and of the API entry points.
# A value outside its range is refused before any work: a 0 count gives
# no result (or a crash deep inside), a negative one silently means "all but N".
RANGES: dict[str, Range] = {
    # items and commits
    "limit": Range(int, 1, none=True),
    "chunk": Range(int, 1),
    "seed": Range(int, 0),
    "max_tensor_gb": Range(float, 0, lo_open=True, none=True),
    # integrated gradients (kncore.attribute) and coarse selection
    "steps": Range(int, 1),
    "batch_size": Range(int, 1, none=True, words=("auto",)),
    "adaptive_threshold": Range(float, 0, 1),  # keeps score > t x max: t > 1 keeps nothing
    # interventions (kncore.patch_neurons)
    "enhance_factor": Range(float, 0),  # `localise` enhances: multiplies activations by this
    "factor": Range(float),  # patch_neurons(mode="scale") takes any finite factor, negative too
    "layer": Range(int, 0),
    "neuron": Range(int, 0),
    # causal tracing (kncore.trace)
    "samples": Range(int, 1),
    "window": Range(int, 1),
    "trace_seed": Range(int, 0),
    "max_tokens": Range(int, 1, none=True),
    "noise": Range(float, 0),
    # ROME statistics and edits (kncore.rome.layer_stats, kncore edit)
    "n_samples": Range(int, 1, none=True),
    "batch_tokens": Range(int, 1),
    "edit_layer": Range(int, 0, none=True),
    # layer_stats' convergence checks: tokens between checks, the relative change of
    # C^-1 k that counts as converged (1 or more would stop on noise), the mom2_reg of the probes
    "check_every": Range(int, 1, none=True),
    "tol": Range(float, 0, 1, lo_open=True),
    "probe_reg": Range(float, 0),
    "n_probes": Range(int, 1, none=True),
    # sequential editing (kncore edit-seq)
    "batches": Range(int, 1),
    "edits_per_batch": Range(int, 1),
    "fluency_prompts": Range(int, 1),
    "gen_len": Range(int, 2),
    # report
    "max_rows": Range(int, 1),
    # planner (kncore plan, kncore.plan): the sizes of the jobs it costs
    "prompts": Range(int, 1),
    "tokens": Range(int, 1),
    "target_tokens": Range(int, 1),
    "memory_gb": Range(float, 0, lo_open=True),
    "texts": Range(int, 1),
    "text_tokens": Range(int, 1, none=True),
}


def check(name: str, value, label: str | None = None):
    """``value`` checked against ``RANGES[name]``; the error names ``label`` (default ``name``)."""
    return RANGES[name].check(value, label or name)


def check_all(**values) -> dict:
    """:func:`check` for each keyword; returns the checked values."""
    return {k: check(k, v) for k, v in values.items()}


def arg(name: str):
    """argparse ``type=`` for the option of parameter ``name``: parses and checks its range."""
    rng = RANGES[name]

    def parse(text):
        return rng.parse(text)
    parse.__name__ = name  # argparse names the type in some messages
    return parse


def checked(fn):
    """argparse ``type=`` from a checking function: its :class:`InputError` becomes
    argparse's one-line error naming the option."""
    def parse(text):
        try:
            return fn(text)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = getattr(fn, "__name__", "value")
    return parse


# ``"<k>sd"``: k times the std of the subjects' (or all) token embeddings.
NOISE_SD = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*sd\s*$")


def noise_spec(value, name: str = "noise"):
    """Causal tracing's ``noise``: a number >= 0 (the scale itself) or ``"<k>sd"``.
    Returns the float, or the string when it is a multiple of the std."""
    if isinstance(value, str):
        if NOISE_SD.match(value):
            return value
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"{name} {value!r} not understood: give a number or a multiple of the "
                             "embedding std such as '3sd'") from None
    return check("noise", value, name)


def choices(name: str, values, allowed, *, min_count: int = 1) -> tuple:
    """A list of names (or a comma-separated string), each one of ``allowed``, none repeated."""
    if isinstance(values, str):
        values = [x.strip() for x in values.split(",") if x.strip()]
    values = tuple(values)
    one = name[:-1] if name.endswith("s") else name
    if len(values) < min_count:
        raise InputError(f"no {name} given; choose from {', '.join(allowed)}")
    for v in values:
        if v not in allowed:
            raise InputError(f"{name}: unknown {one} {v!r}; choose from {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise InputError(f"{name}: a {one} repeats in {', '.join(values)}")
    return values


def text(name: str, value) -> str:
    """A non-empty string (a prompt, a target, a subject)."""
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InputError(f"empty {name}: give some text")
    return value


def subject_in_prompt(prompt: str, subject: str, where: str = "") -> None:
    """The subject must occur in the prompt (causal tracing and ROME edits corrupt or edit it there)."""
    if subject not in prompt:
        raise InputError(f"{where}subject {subject!r} is not in the prompt {prompt!r}")


__all__ = ["Range", "RANGES", "check", "check_all", "arg", "checked", "noise_spec", "NOISE_SD", "choices", "text",
           "subject_in_prompt"]
