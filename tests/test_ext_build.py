"""The compiled extension kncore._C, and the C++ unit tests of csrc/ (CMake + ctest).

The ctest run builds csrc/ against this environment's libtorch in build/ctest
(incremental: about a minute of CPU the first time on 2 cores, seconds after).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kncore import _ext
from kncore.testing import cpu_has_avx512

ROOT = Path(__file__).resolve().parents[1]


def test_extension_loads_and_registers_ops():
    if not _ext.load():
        if _ext.required():
            pytest.fail(f"KNCORE_REQUIRE_EXT=1 but kncore._C is missing: {_ext.load_error()}")
        pytest.skip(f"kncore._C not built: {_ext.load_error()}")
    info = _ext.build_info()
    assert set(info) >= {"torch", "openmp", "cuda_sources", "compiler"}
    assert torch.__version__.startswith(info["torch"]), (info, torch.__version__)
    for op in ("cov_accumulate_", "rank1_update_", "rank1_undo_", "rank1_checksum"):
        assert hasattr(torch.ops.kncore, op)
    import kncore._C

    assert Path(kncore._C.__file__).resolve().parent == ROOT / "kncore"


@pytest.mark.parametrize("op", _ext.AVX512_OPS)
def test_avx512_paths_are_used_where_the_cpu_has_them(op):
    # rank1_update_'s fp32 rows and cov_accumulate_'s fp32 triangle: on by
    # default exactly where the CPU has AVX-512F/BW/VL; tests switch them off
    if not _ext.load():
        pytest.skip(f"kncore._C not built: {_ext.load_error()}")
    switch = getattr(torch.ops.kncore, f"{op}_avx512")
    before = switch()
    try:
        if sys.platform == "linux" and platform.machine() == "x86_64":
            assert before == cpu_has_avx512()
        with _ext.avx512_off(op):
            assert switch() is False
        assert switch() == before
        assert switch(0) is False and switch(1) == before
        with pytest.raises(ValueError, match="enable must be"):
            switch(2)
    finally:
        switch(1 if before else 0)


def test_avx512_off_names_a_wrong_op():
    with pytest.raises(ValueError, match="op must be one of"):
        with _ext.avx512_off("rank_one"):
            pass


def test_require_ext_names_the_cause(monkeypatch):
    monkeypatch.setattr(_ext, "_state", {"tried": True, "module": None, "error": "ImportError: simulated"})
    with pytest.raises(RuntimeError, match="simulated.*pip install"):
        _ext.require_ext()


def test_ctest_suite():
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed; the C++ unit tests need it (apt-get install cmake)")
    build = Path(os.environ.get("KNCORE_CTEST_BUILD", ROOT / "build" / "ctest"))
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["sh", str(ROOT / "csrc" / "tests" / "run_ctest.sh"), str(build)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ctest failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    assert "100% tests passed" in proc.stdout


def test_info_reports_versions_and_extension(capsys):
    from kncore import info

    d = info.info()
    assert d["torch"] == torch.__version__
    assert d["extension"]["built"] == _ext.load()
    assert d["triton_mode"] in ("compiled", "interpreted", "unavailable")
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert "C++ extension" in out and "Triton kernels" in out
