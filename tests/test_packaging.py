"""kncore imports the same way from any working directory.

The Triton kernels sit in the top-level folder kernels/, installed as
kncore.kernels. From the repository root (``python -m pytest``, ``python -m
kncore``) that folder is on sys.path as top-level ``kernels``, a name that
belongs to the PyPI package transformers >= 5 imports; it must not shadow it.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from kncore.ops import _kernels

ROOT = Path(__file__).resolve().parents[1]


def _run_in_root(code: str) -> subprocess.CompletedProcess:
    # -c puts the working directory (here the repository root) first on sys.path
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _pypi_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_top_level_kernels_is_not_our_folder():
    r = _run_in_root("import kernels, os; print(os.path.abspath(kernels.__file__))")
    if _pypi_kernels_installed():
        assert r.returncode == 0, r.stderr
        assert Path(r.stdout.strip()).parent != ROOT / "kernels", r.stdout
    else:  # our folder, empty and without a version: transformers reads "not available"
        assert r.returncode == 0, r.stderr
        r = _run_in_root("import kernels; print(getattr(kernels, '__version__', 'none'), dir(kernels))")
        assert r.stdout.startswith("none"), r.stdout


def test_transformers_models_import_from_the_repo_root():
    r = _run_in_root("import transformers.activations, transformers; transformers.GPT2LMHeadModel; print('ok')")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


def test_kernel_module_is_kncore_kernels():
    mod = _kernels.kernel_module("ig_steps")
    assert mod.__name__ == "kncore.kernels.ig_steps"
    assert Path(mod.__file__).resolve() == ROOT / "kernels" / "ig_steps.py"


def test_kernel_module_loads_from_the_file_without_the_mapping(monkeypatch):
    """A source tree used without installing has no kncore.kernels mapping."""
    full = "kncore.kernels.mlp_capture"
    real = importlib.import_module

    def no_mapping(name, *a, **k):
        if name.startswith("kncore.kernels"):
            raise ModuleNotFoundError(f"No module named {name!r}", name="kncore.kernels")
        return real(name, *a, **k)

    monkeypatch.setattr(_kernels.importlib, "import_module", no_mapping)
    monkeypatch.delitem(sys.modules, full, raising=False)
    mod = _kernels.kernel_module("mlp_capture")
    assert mod.__name__ == full and sys.modules[full] is mod
    assert Path(mod.__file__).resolve() == ROOT / "kernels" / "mlp_capture.py"
    assert callable(mod.mlp_capture_ref)
    with pytest.raises(ModuleNotFoundError, match="no Triton kernel module kncore.kernels.nonexistent"):
        _kernels.kernel_module("nonexistent")


def test_kernel_module_reports_what_the_kernel_lacks(monkeypatch):
    def missing_triton(name, *a, **k):
        raise ModuleNotFoundError("No module named 'triton'", name="triton")

    monkeypatch.setattr(_kernels.importlib, "import_module", missing_triton)
    with pytest.raises(ModuleNotFoundError, match="triton"):
        _kernels.kernel_module("ig_steps")
