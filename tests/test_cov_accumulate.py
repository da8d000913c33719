"""kncore.ops.cov_accumulate_ / CovAccumulator against a float64 reference.

Bars: float64 accumulator -> relative error <= 1e-6; float32 accumulator ->
at most 2x the error of torch's own addmm_ in the inputs' precision (and never
below one ulp of the accumulator). Inputs are drawn fresh each run.
"""
from __future__ import annotations

import io
import logging

import pytest
import torch

from kncore import _ext
from kncore.testing import cpu_has_avx512
from kncore.ops import cov_accumulate as mod
from kncore.ops.cov_accumulate import CovAccumulator, cov_accumulate_, cov_accumulate_ref, cov_mirror

DIMS = (1, 7, 123, 300)
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACC_DTYPES = (torch.float32, torch.float64)


@pytest.fixture
def ext():
    if not _ext.load():
        if _ext.required():
            pytest.fail(f"KNCORE_REQUIRE_EXT=1 but the extension is missing: {_ext.load_error()}")
        pytest.skip(f"kncore._C not built: {_ext.load_error()}")
    return torch.ops.kncore


def rand(*shape, dtype=torch.float32):
    return (torch.randn(*shape, dtype=torch.float64) * 2 + 0.5).to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def state(d, dtype):
    """A non-zero starting state: symmetric C, random s, a row count."""
    A = rand(d, d, dtype=torch.float64)
    C = (A + A.T).to(dtype)
    return C, rand(d, dtype=dtype), torch.randint(1, 100, (), dtype=torch.int64)


def torch_error(C0, X, mask) -> float:
    """Error of plain addmm_ in the inputs' precision, the bar for a low-precision accumulator."""
    low = X.dtype
    Xk = X if mask is None else X[mask]
    exact = C0.double() + Xk.double().T @ Xk.double()
    got = C0.to(low, copy=True).addmm_(Xk.to(low).T, Xk.to(low))  # (a copy: C0 may already be `low`)
    return rel(got, exact)


def check_against_fp64(C, s, n, C0, s0, n0, X, mask):
    Xk = (X if mask is None else X[mask]).double()
    exact = C0.double() + Xk.T @ Xk
    err = rel(cov_mirror(C), exact)
    if C.dtype == torch.float64:
        bar = 1e-6
    else:
        bar = max(2 * torch_error(C0, X, mask), 2 * torch.finfo(C.dtype).eps)  # floor: two ulps
    assert err <= bar, f"C: relative error {err:.3g} > {bar:.3g}"
    s_exact = s0.double() + Xk.sum(0)
    s_bar = 1e-6 if C.dtype == torch.float64 else 1e-4
    assert rel(s, s_exact) <= s_bar
    assert int(n) == int(n0) + Xk.shape[0]


@pytest.fixture
def blocks(ext):
    """Switches the fp32 AVX-512 triangle off for the test (the per-block gemms run)."""
    with _ext.avx512_off("cov"):
        yield


# every accumulator on the CPU kernel and the generic ATen path; the fp32
# accumulator also with its AVX-512 triangle off (the per-block gemms)
PATHS = [(acc, path) for acc in ACC_DTYPES for path in ("cpu-kernel", "generic-aten")] + \
    [(torch.float32, "cpu-blocks")]


@pytest.mark.parametrize("acc,path", PATHS, ids=[f"{a}-{p}" for a, p in PATHS])
@pytest.mark.parametrize("xdtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("d", DIMS)
def test_matches_fp64(request, ext, d, xdtype, acc, path):
    if path == "cpu-blocks":
        request.getfixturevalue("blocks")
    composite = path == "generic-aten"
    rows = int(torch.randint(200, 700, ()))
    X = rand(rows, d, dtype=xdtype)
    mask = torch.rand(rows) > 0.3
    for m in (None, mask):
        C0, s0, n0 = state(d, acc)
        C, s, n = C0.clone(), s0.clone(), n0.clone()
        ext.cov_accumulate_(C, s, n, X, m, composite)
        check_against_fp64(C, s, n, C0, s0, n0, X, m)


@pytest.mark.skipif(not cpu_has_avx512(), reason="the CPU has no AVX-512")
@pytest.mark.parametrize("xdtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("d", (12, 13, 32, 33, 95, 96, 97, 401))
def test_avx512_triangle_matches_the_blocks(ext, d, xdtype):
    # tails of the 12-row and 32-column tiles and of the 96-column copy tasks;
    # rows around the 256-row kernel blocks; a mask that gathers rows
    for rows in (1, 255, 257, 700):
        X = rand(rows, d, dtype=xdtype)
        mask = torch.rand(rows) > 0.3
        for m in (None, mask):
            C0, s0, n0 = state(d, torch.float32)

            def run():
                C, s, n = C0.clone(), s0.clone(), n0.clone()
                ext.cov_accumulate_(C, s, n, X, m, False)
                check_against_fp64(C, s, n, C0, s0, n0, X, m)
                return C.tril(), s, n

            assert ext.cov_avx512()
            Ca, sa, na = run()
            with _ext.avx512_off("cov"):
                assert not ext.cov_avx512()
                Cb, sb, nb = run()
            assert rel(Ca, Cb) <= 1e-6 and rel(sa, sb) <= 1e-6 and int(na) == int(nb)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("acc", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("xdtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("d", (7, 300, 1100))
def test_cuda_matches_fp64(ext, d, xdtype, acc):
    """The CUDA op (cuBLAS through ATen): same bars, torch's own error measured on the GPU."""
    rows = int(torch.randint(200, 700, ()))
    X = rand(rows, d, dtype=xdtype).cuda()
    mask = (torch.rand(rows) > 0.3).cuda()
    for m in (None, mask):
        C0, s0, n0 = (t.cuda() for t in state(d, acc))
        C, s, n = C0.clone(), s0.clone(), n0.clone()
        assert cov_accumulate_(C, X, m, s=s, n=n) is C
        check_against_fp64(C, s, n, C0, s0, n0, X, m)


@pytest.mark.parametrize("acc", ACC_DTYPES, ids=str)
def test_python_entry_and_large_d(ext, acc):
    # d above the 128-wide leaves, not a multiple of the split alignment, rows over a pack chunk
    d, rows = 613, 3000
    X = rand(rows, d, dtype=torch.bfloat16)
    C0, s0, n0 = state(d, acc)
    C, s, n = C0.clone(), s0.clone(), n0.clone()
    assert cov_accumulate_(C, X, s=s, n=n) is C
    check_against_fp64(C, s, n, C0, s0, n0, X, None)


def test_masks_and_empty_batches(ext):
    d = 37
    X = rand(50, d)
    C0, s0, n0 = state(d, torch.float64)
    for X_, m in ((X, torch.zeros(50, dtype=torch.bool)), (X[:0], None), (X[:0], torch.zeros(0, dtype=torch.bool))):
        C, s, n = C0.clone(), s0.clone(), n0.clone()
        cov_accumulate_(C, X_, m, s=s, n=n)
        assert torch.equal(C, C0) and torch.equal(s, s0) and torch.equal(n, n0)
    C1, C2 = C0.clone(), C0.clone()
    cov_accumulate_(C1, X, torch.ones(50, dtype=torch.bool))
    cov_accumulate_(C2, X)
    assert torch.equal(C1.tril(), C2.tril())
    # the mask keeps exactly the selected rows
    mask = torch.rand(50) > 0.5
    C3 = C0.clone()
    cov_accumulate_(C3, X, mask)
    C4 = C0.clone()
    cov_accumulate_(C4, X[mask].contiguous())
    assert rel(cov_mirror(C3), cov_mirror(C4)) <= 1e-12


def test_accumulator_merge_state_and_covariance(ext):
    d = 123
    X = rand(400, d, dtype=torch.bfloat16).reshape(8, 50, d)
    mask = torch.rand(8, 50) > 0.2
    whole = CovAccumulator(d).update(X, mask)
    a, b = CovAccumulator(d), CovAccumulator(d)
    a.update(X[:3], mask[:3])
    b.update(X[3:], mask[3:])
    a.merge(b)
    assert int(a.n) == int(mask.sum())
    assert rel(a.second_moment(), whole.second_moment()) <= 1e-12
    Xk = X[mask].double()
    assert rel(a.second_moment(), Xk.T @ Xk / Xk.shape[0]) <= 1e-6
    assert rel(a.mean(), Xk.mean(0)) <= 1e-6
    assert rel(a.covariance(), torch.cov(Xk.T)) <= 1e-6
    assert rel(a.covariance(unbiased=False), torch.cov(Xk.T, correction=0)) <= 1e-6
    # checkpoint round trip through safetensors (plain tensors)
    st = pytest.importorskip("safetensors.torch")
    blob = st.save(a.state_dict())
    c = CovAccumulator(d).load_state_dict(st.load(blob))
    assert torch.equal(c.second_moment(), a.second_moment()) and torch.equal(c.n, a.n)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # plain tensors: loadable with weights_only=True
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=True)["s"], a.s)
    with pytest.raises(ValueError, match="merge"):
        a.merge(CovAccumulator(d + 1))
    with pytest.raises(ValueError, match="no rows"):
        CovAccumulator(d).second_moment()
    a.all_reduce()  # no process group: a no-op
    assert int(a.n) == int(mask.sum())


def test_errors_name_the_problem(ext):
    d = 9
    C, X = torch.zeros(d, d), rand(5, d)
    with pytest.raises(TypeError, match="accumulator C"):
        cov_accumulate_(C.half(), X)
    with pytest.raises(TypeError, match="X must be"):
        cov_accumulate_(C, X.int())
    with pytest.raises(TypeError, match="float64 X"):
        cov_accumulate_(C, X.double())
    with pytest.raises(TypeError, match="mask"):
        cov_accumulate_(C, X, torch.ones(5))
    with pytest.raises(TypeError, match="running sum"):
        cov_accumulate_(C, X, s=torch.zeros(d, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        cov_accumulate_(torch.zeros(d, d + 1), X)
    with pytest.raises(ValueError, match=r"X must be \[rows, 9\]"):
        cov_accumulate_(C, rand(5, d + 1))
    with pytest.raises(ValueError, match="mask must be"):
        cov_accumulate_(C, X, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="X must be contiguous"):
        cov_accumulate_(C, rand(d, 5).T)
    with pytest.raises(ValueError, match="C must be contiguous"):
        cov_accumulate_(rand(d, d).T, X)
    with pytest.raises(ValueError, match="device"):
        cov_accumulate_(C, X.to("meta"))
    # the raw op checks too, with the same exception types
    s, n = torch.zeros(d), torch.zeros((), dtype=torch.int64)
    with pytest.raises(TypeError, match="X must be"):
        ext.cov_accumulate_(C, s, n, X.int(), None)
    with pytest.raises(ValueError, match="contiguous"):
        ext.cov_accumulate_(C, s, n, rand(d, 5).T, None)
    with pytest.raises(ValueError, match="one device"):
        ext.cov_accumulate_(C, s, n, X.to("meta"), None)


def test_opcheck(ext):
    for d, xdtype, acc, masked in ((7, torch.float32, torch.float32, False), (33, torch.bfloat16, torch.float64, True)):
        C0, s0, n0 = state(d, acc)
        X = rand(20, d, dtype=xdtype)
        mask = torch.rand(20) > 0.5 if masked else None
        torch.library.opcheck(ext.cov_accumulate_.default, (C0, s0, n0, X, mask))


def test_fallback_is_logged_and_matches(ext, monkeypatch, caplog):
    d = 11
    X = rand(30, d)
    C0, s0, n0 = state(d, torch.float64)
    fast = [t.clone() for t in (C0, s0, n0)]
    cov_accumulate_(fast[0], X, s=fast[1], n=fast[2])
    monkeypatch.setattr(mod, "not_supported_reasons", lambda *a: ["simulated reason"])
    slow = [t.clone() for t in (C0, s0, n0)]
    with caplog.at_level(logging.WARNING, logger="kncore.ops"):
        cov_accumulate_(slow[0], X, s=slow[1], n=slow[2])
    assert "simulated reason" in caplog.text
    assert rel(cov_mirror(slow[0]), cov_mirror(fast[0])) <= 1e-12
    assert torch.equal(slow[2], fast[2])


def test_missing_extension(monkeypatch, caplog):
    monkeypatch.setattr(_ext, "_state", {"tried": True, "module": None, "error": "ImportError: simulated"})
    d = 5
    X = rand(8, d)
    C = torch.zeros(d, d, dtype=torch.float64)
    monkeypatch.setenv("KNCORE_REQUIRE_EXT", "0")
    with caplog.at_level(logging.WARNING, logger="kncore.ops"):
        cov_accumulate_(C, X)
    assert "simulated" in caplog.text
    assert rel(C, cov_accumulate_ref(torch.zeros_like(C), X)) <= 1e-12
    monkeypatch.setenv("KNCORE_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="simulated"):
        cov_accumulate_(C, X)
