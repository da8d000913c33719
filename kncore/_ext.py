"""Lazy loader of the compiled extension ``kncore._C``.

Importing ``kncore._C`` loads the shared library built from ``csrc/``, whose
static initialisers register the ``TORCH_LIBRARY`` ops (``torch.ops.kncore.*``).
Nothing is loaded when kncore is imported; the first op that wants the fast path
calls :func:`load`. When the library is missing or broken, the error is kept
so that ``python -m kncore.info`` and :func:`require_ext` can say why, and the
ops fall back to their plain-PyTorch references (logging it), unless
``KNCORE_REQUIRE_EXT=1`` (set in CI by ``make test``), which makes absence an
error at first use.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Callable

import torch

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "error": None}
_on_load: list[Callable[[], None]] = []

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (needs a C++ compiler)"


def required() -> bool:
    """True when ``KNCORE_REQUIRE_EXT=1``: a missing extension is an error, not a fallback."""
    return os.environ.get("KNCORE_REQUIRE_EXT", "") not in ("", "0")


def on_load(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the extension is loaded (now, if it already is).

    Op modules register their fake (meta) implementations this way: the
    registration needs the op's schema, which exists only after the load.
    """
    with _lock:
        loaded = _state["module"] is not None
        if not loaded:
            _on_load.append(fn)
    if loaded:
        fn()


def load() -> bool:
    """Import ``kncore._C`` once; True when its ops are available."""
    if _state["tried"]:
        return _state["module"] is not None
    with _lock:
        if not _state["tried"]:
            try:
                import torch  # noqa: F401  (libtorch must be loaded before the extension)

                _state["module"] = importlib.import_module("kncore._C")
            except Exception as e:  # ImportError, or an undefined symbol from a stale build
                _state["error"] = f"{type(e).__name__}: {e}"
            _state["tried"] = True
            callbacks = list(_on_load) if _state["module"] is not None else []
            _on_load.clear()
        else:
            callbacks = []
    for fn in callbacks:
        fn()
    return _state["module"] is not None


def available() -> bool:
    return load()


def load_error() -> str | None:
    """Why the extension could not be loaded (None when it loaded)."""
    load()
    return _state["error"]


def build_info() -> dict | None:
    """How ``kncore._C`` was compiled (torch version, OpenMP, CUDA sources), or None."""
    return _state["module"].build_info() if load() else None


def require_ext() -> None:
    """Raise a RuntimeError that says why the extension is unavailable."""
    if not load():
        raise RuntimeError(f"kncore C++ extension kncore._C is not available ({_state['error']}); {BUILD_HINT}")


_logged: set = set()


def not_supported_reasons(device, supported_devices) -> list[str]:
    """Why a C++ op cannot run on ``device`` (empty: it can): the extension
    is not built or not loadable, or the device is not one of ``supported_devices``."""
    reasons = []
    if not load():
        reasons.append(f"C++ extension unavailable ({load_error()})")
    if device.type not in supported_devices:
        reasons.append(f"device {device.type} not in {supported_devices}")
    return reasons


def fallback(op: str, reasons: list[str]) -> None:
    """Report that ``op`` takes its PyTorch reference path, and why.

    Logged at WARNING once per (op, reasons), then at DEBUG: a fallback nobody
    sees is a performance bug. When the reason is a missing extension and
    ``KNCORE_REQUIRE_EXT=1``, raise instead.
    """
    if required() and not load():
        require_ext()
    import logging

    log = logging.getLogger(f"kncore.ops.{op}")
    key = (op, tuple(reasons))
    level = logging.DEBUG if key in _logged else logging.WARNING
    _logged.add(key)
    log.log(level, "%s: using the plain PyTorch reference (slower): %s", op, "; ".join(reasons))


AVX512_OPS = ("rank1", "cov")  # the C++ ops with an AVX-512 path (torch.ops.kncore.<op>_avx512)


@contextlib.contextmanager
def avx512_off(op: str):
    """Runs the block with the AVX-512 path of ``op`` ("rank1" or "cov") switched
    off, so the portable path runs (tests compare the two, benches time both)."""
    if op not in AVX512_OPS:
        raise ValueError(f"avx512_off: op must be one of {AVX512_OPS}, got {op!r}")
    require_ext()
    switch = getattr(torch.ops.kncore, f"{op}_avx512")
    before = switch()
    switch(0)
    try:
        yield
    finally:
        switch(1 if before else 0)
