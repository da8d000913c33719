"""Where the Triton kernel modules are imported from.

The kernels live in the repository's top-level ``kernels/`` folder, installed as
the package ``kncore.kernels`` (``setup.py``'s ``package_dir``). A source tree
used without installing has no such mapping; the module is then loaded from its
file under the same name. It is never imported as top-level ``kernels``: that
name belongs to the PyPI package ``kernels``, which ``transformers`` imports.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"


def kernel_module(name: str):
    """The module ``kncore.kernels.<name>`` (``kernels/<name>.py``)."""
    full = f"kncore.kernels.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name not in ("kncore.kernels", full):
            raise  # the kernel itself failed to import something (triton, say): say that
    path = KERNELS_DIR / f"{name}.py"
    if not path.is_file():
        raise ModuleNotFoundError(f"no Triton kernel module {full} (looked for {path})", name=full)
    spec = importlib.util.spec_from_file_location(full, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[full] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[full]
        raise
    return mod
