"""kncore.ops.rank1_update_: W += alpha u v^T in place with a bit-exact undo.

Every path (C++ CPU loop, the device-generic ATen path CUDA uses, the Python
reference) must compute the reference's numbers and restore W's exact bytes,
including -0.0, NaN, inf and elements whose low bits the addition destroys.
"""
from __future__ import annotations

import logging

import pytest
import torch

from kncore import _ext
from kncore.testing import cpu_has_avx512
from kncore.ops import rank1_update as mod
from kncore.ops.rank1_update import Rank1Undo, rank1_checksum_ref, rank1_undo_, rank1_update_, rank1_update_ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture
def ext():
    if not _ext.load():
        if _ext.required():
            pytest.fail(f"KNCORE_REQUIRE_EXT=1 but the extension is missing: {_ext.load_error()}")
        pytest.skip(f"kncore._C not built: {_ext.load_error()}")
    return torch.ops.kncore


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS[t.element_size()]).clone()


def weight(m, n, dtype, special=True):
    """Random weight with the values that make undo hard: tiny, huge, -0.0, nan, inf."""
    W = torch.randn(m, n, dtype=torch.float64) * 0.05
    if special:
        W.view(-1)[torch.randperm(m * n)[: max(1, m * n // 50)]] *= 1e-4  # lose low bits under a big delta
        flat = W.view(-1)
        flat[torch.randint(0, m * n, (1,))] = -0.0
        if m * n > 3:
            flat[torch.randint(0, m * n, (3,))] = torch.tensor([float("nan"), float("inf"), -float("inf")],
                                                               dtype=torch.float64)
    return W.to(dtype)


def same_bytes(a, b) -> bool:
    return torch.equal(bits(a), bits(b))


def run(path, ext, W, u, v, alpha, transposed):
    if path == "ref":
        return rank1_update_ref(W, u, v, alpha, transposed=transposed)
    if path.startswith("kernel"):
        return rank1_update_(W, u, v, alpha, transposed=transposed)
    # the device-generic ATen path (what CUDA runs), forced on CPU
    T, U, V, swapped = mod._factors(W, u, v, transposed)
    out = ext.rank1_update_(T, U, V, alpha, True)
    return mod._record(W, T, U, V, alpha, swapped, out, composite=True)


# every dtype on the CPU kernel, the device-generic path and the reference;
# fp32 also with its AVX-512 rows off (the portable row loops)
PATHS = [(dt, path) for dt in DTYPES for path in ("kernel", "generic", "ref")] + [(torch.float32, "kernel-portable")]


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype,path", PATHS, ids=[f"{d}-{p}" for d, p in PATHS])
@pytest.mark.parametrize("size", ["large", "small"])
def test_update_then_undo_is_bit_exact(request, ext, size, dtype, path, k, transposed):
    if path == "kernel-portable":
        request.getfixturevalue("portable")
    # a large delta: most elements miss, so the kernel keeps the dense form;
    # a small one: few miss, the sparse form
    out_f, in_f = 37, 123
    shape = (in_f, out_f) if transposed else (out_f, in_f)
    W = weight(*shape, dtype, special=size == "large")
    u = torch.randn(out_f, k).squeeze(1) if k == 1 else torch.randn(out_f, k)
    v = torch.randn(in_f, k).squeeze(1) if k == 1 else torch.randn(in_f, k)
    if size == "small":  # RMS(delta) = 3e-4 RMS(W) (fp64 misses more: 1e-7), and a few special values
        u = u * 0.05 * (1e-7 if dtype == torch.float64 else 3e-4) / k ** 0.5
        W.view(-1)[[5, 50, 500, 1000]] = torch.tensor([-0.0, float("nan"), float("inf"), 1e-30]).to(dtype)
    alpha = float(torch.empty(()).uniform_(0.3, 2.0))
    W0 = W.clone()
    expect = W.clone()
    rank1_update_ref(expect, u, v, alpha, transposed=transposed)
    rec = run(path, ext, W, u, v, alpha, transposed)
    # the same numbers as the reference (nan where it has nan)
    torch.testing.assert_close(W, expect, rtol=0, atol=0, equal_nan=True)
    assert not same_bytes(W, W0)
    if path == "kernel":
        assert rec.code.numel() == (W.numel() if size == "large" else 0)
    rec.undo(W)
    assert same_bytes(W, W0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", ["large", "small"])
def test_cuda_update_then_undo_is_bit_exact(ext, size, dtype, k, transposed):
    """CUDA runs the device-generic path: the CPU reference's bits, then W's own bytes back."""
    out_f, in_f = 37, 1230
    shape = (in_f, out_f) if transposed else (out_f, in_f)
    W = weight(*shape, dtype, special=size == "large")
    u = torch.randn(out_f, k).squeeze(1) if k == 1 else torch.randn(out_f, k)
    v = torch.randn(in_f, k).squeeze(1) if k == 1 else torch.randn(in_f, k)
    if size == "small":
        u = u * 0.05 * (1e-7 if dtype == torch.float64 else 3e-4) / k ** 0.5
    alpha = float(torch.empty(()).uniform_(0.3, 2.0))
    expect = W.clone()
    rank1_update_ref(expect, u, v, alpha, transposed=transposed)
    Wc, uc, vc = W.cuda(), u.cuda(), v.cuda()
    W0 = Wc.clone()
    rec = rank1_update_(Wc, uc, vc, alpha, transposed=transposed)
    assert rec.device.type == "cuda" and rec.original is None  # the op ran, not the copying fallback
    # equal values (a GPU may give NaN another payload than the CPU)
    torch.testing.assert_close(Wc.cpu(), expect, rtol=0, atol=0, equal_nan=True)
    rec.undo(Wc)
    assert same_bytes(Wc, W0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_error_vs_fp64_within_2x_of_torch(ext, dtype):
    W = weight(64, 300, dtype, special=False)
    u, v = torch.randn(64), torch.randn(300) * 0.02
    exact = W.double() + 0.7 * torch.outer(u.double(), v.double())
    ours = W.clone()
    rank1_update_(ours, u, v, 0.7)
    theirs = W.clone().addr_(u.to(dtype), v.to(dtype), alpha=0.7)
    err = (ours.double() - exact).norm() / exact.norm()
    bar = (theirs.double() - exact).norm() / exact.norm()
    assert err <= 2 * bar + torch.finfo(dtype).eps * 1e-3, f"{err:.3g} > 2 x {bar:.3g}"


def test_transposed_view_and_layouts(ext):
    out_f, in_f = 29, 71
    base = weight(in_f, out_f, torch.bfloat16)  # Conv1D storage [in, out]
    u, v = torch.randn(out_f), torch.randn(in_f)
    # Conv1D weight with transposed=True == the same update on its logical [out, in] view
    a, b = base.clone(), base.clone()
    ra = rank1_update_(a, u, v, 0.5, transposed=True)
    rb = rank1_update_(b.t(), u, v, 0.5)  # logical weight as a non-contiguous view
    assert rb.swapped and same_bytes(a, b)
    ra.undo(a)
    rb.undo(b.t())
    assert same_bytes(a, base) and same_bytes(b, base)


def test_record_is_small_for_realistic_edits(ext):
    # ROME-sized delta, ~1% of the weights: exceptions are the ~1% of elements whose sum
    # moves up a binade; at 6 bytes each the record is a few % of a copy of W
    W = (torch.randn(512, 1024) * 0.05).bfloat16()
    u, v = torch.randn(512) * 0.05, torch.randn(1024) * 0.01
    W0 = W.clone()
    rec = rank1_update_(W, u, v)
    assert rec.exc_idx.dtype == torch.int32
    assert rec.nbytes < 0.1 * W.numel() * W.element_size(), rec.nbytes
    rec.undo(W)
    assert same_bytes(W, W0)


def test_sparse_form_stores_heavy_rows_whole(ext):
    # a small edit (the sparse form) with two rows whose delta swamps the weights:
    # nearly every element of those rows misses -> they are stored whole
    W = (torch.randn(4096, 64) * 0.05).float()
    u = torch.randn(4096) * 1e-7
    u[[1, 2]] = 10.0  # rows the form's sample (64K elements: every 4th row) does not see
    W0 = W.clone()
    rec = rank1_update_(W, u, torch.randn(64))
    assert rec.code.numel() == 0 and rec.row_idx.tolist() == [1, 2]
    assert rec.nbytes <= 4096 * 4 + 64 * 4 + 2 * 64 * 4 + 1024
    rec.undo(W)
    assert same_bytes(W, W0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_record_form_for_rome_sized_edits(ext, dtype):
    # RMS(delta) = 15% of RMS(W), as real ROME edits: ~10% of elements miss.
    # fp32/fp64: the dense form, one int8 per element, the few that do not fit
    # (|W| << |delta|, -0.0, nan) listed. 16-bit: the sparse form, which is
    # smaller there (6 bytes per miss) and already faster than torch's addr_.
    # Either way undo gives back every byte.
    m, n = 96, 300
    W = weight(m, n, dtype)
    rms = W.double().nan_to_num(0, 0, 0).pow(2).mean().sqrt().item()
    u, v = torch.randn(m) * (0.15 * rms) ** 0.5, torch.randn(n) * (0.15 * rms) ** 0.5
    W0 = W.clone()
    rec = rank1_update_(W, u, v)
    if W.element_size() == 2:
        assert rec.code.numel() == 0 and 0.02 < rec.exc_idx.numel() / W.numel() < 1 / 6
        rec.undo(W)
        assert same_bytes(W, W0)
        return
    assert rec.code.dtype == torch.int8 and rec.code.numel() == W.numel()
    escaped = int((rec.code == -128).sum())
    assert escaped == rec.exc_idx.numel() > 0 and rec.row_idx.numel() == 0
    assert (rec.code.abs() <= 1).float().mean() > 0.95  # nearly all within one ulp
    rec.undo(W)
    assert same_bytes(W, W0)


@pytest.fixture
def portable(ext):
    """Switches the fp32 AVX-512 rows off for the test (the portable loops run)."""
    with _ext.avx512_off("rank1"):
        yield


@pytest.mark.skipif(not cpu_has_avx512(), reason="the CPU has no AVX-512")
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("scale", [1e-6, 0.15, 30.0], ids=["sparse", "dense", "escapes"])
@pytest.mark.parametrize("n", [16, 64, 203, 1024], ids=lambda n: f"n{n}")
def test_avx512_rows_give_the_portable_records(ext, n, scale, k):
    # the same W, factors and record bytes from both row kernels: rows of whole
    # 16- and 64-lane chunks, ragged tails, both record forms, rank 1 and k, and
    # deltas that swamp W (codes that escape to the exception list)
    m = 48
    W0 = weight(m, n, torch.float32)
    U, V = torch.randn(m, k) * scale ** 0.5, torch.randn(n, k) * (0.05 * scale) ** 0.5
    Wa, Wp = W0.clone(), W0.clone()
    assert ext.rank1_avx512()
    ra = ext.rank1_update_(Wa, U, V, 0.7)
    with _ext.avx512_off("rank1"):
        assert not ext.rank1_avx512()
        rp = ext.rank1_update_(Wp, U, V, 0.7)
    assert same_bytes(Wa, Wp)
    assert (ra[0].numel() > 0) == (scale > 1e-3)  # the form the scale aims at
    for a, p in zip(ra, rp):
        assert a.dtype == p.dtype and torch.equal(a, p)
    if scale > 1:
        assert ra[1].numel() > 0  # escapes were listed
    ext.rank1_undo_(Wa, U, V, 0.7, *ra)
    assert same_bytes(Wa, W0)


def test_dense_buffers_are_reused(ext):
    W = (torch.randn(256, 2048) * 0.05).float()  # a 512 KiB code buffer
    u, v = torch.randn(256) * 0.1, torch.randn(2048) * 0.1
    mod.rank1_pool_release()
    rec = rank1_update_(W, u, v)
    ptr = rec.code.data_ptr()
    rec.undo(W)
    del rec  # its buffer goes to the pool ...
    assert torch.ops.kncore.rank1_pool_held() >= W.numel()
    rec = rank1_update_(W, u, v)  # ... and is taken again
    assert rec.code.data_ptr() == ptr and torch.ops.kncore.rank1_pool_held() == 0
    W2 = W.clone()
    rec2 = rank1_update_(W2, u, v)  # two live records: two buffers
    assert rec2.code.data_ptr() != ptr
    rec2.undo(W2)
    rec.undo(W)
    del rec, rec2
    assert mod.rank1_pool_release() >= 2 * W.numel()
    assert torch.ops.kncore.rank1_pool_held() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_checksums_agree(ext, dtype):
    W = weight(23, 45, dtype)
    ref = rank1_checksum_ref(W)
    assert torch.equal(ext.rank1_checksum(W, False), ref)
    assert torch.equal(ext.rank1_checksum(W, True), ref)


def test_undo_refuses_modified_or_foreign_weights(ext):
    W = weight(20, 30, torch.float32)
    u, v = torch.randn(20), torch.randn(30)
    rec = rank1_update_(W, u, v)
    W[3, 4] += 1.0  # in place: version counter
    with pytest.raises(RuntimeError, match="modified"):
        rec.undo(W)
    W = weight(20, 30, torch.float32)
    rec = rank1_update_(W, u, v)
    W.data[3, 4] += 1.0  # behind autograd's back: only the checksum sees it
    with pytest.raises(RuntimeError, match="checksum"):
        rec.undo(W)
    W = weight(20, 30, torch.float32)
    rec = rank1_update_(W, u, v)
    with pytest.raises(ValueError, match="shape"):
        rec.undo(W[:10])
    with pytest.raises(TypeError, match="dtype|float32"):
        rank1_undo_(W.double(), rec)
    with pytest.raises(RuntimeError, match="another tensor"):
        rec.undo(W.clone())
    rec.undo(W)
    with pytest.raises(RuntimeError, match="already used"):
        rec.undo(W)
    with pytest.raises(TypeError, match="Rank1Undo"):
        rank1_undo_(W, object())
    # the raw op refuses a wrong checksum as well
    out = ext.rank1_update_(W, u, v, 1.0)
    with pytest.raises(RuntimeError, match="checksum"):
        ext.rank1_undo_(W, u, v, 1.0, *out[:5], out[5] + 1)
    with pytest.raises(ValueError, match="codes"):
        ext.rank1_undo_(W, u, v, 1.0, out[0][:-1], *out[1:])
    with pytest.raises(ValueError, match="dense record"):
        ext.rank1_undo_(W, u, v, 1.0, *out, True)
    ext.rank1_undo_(W, u, v, 1.0, *out)


def test_errors_name_the_problem(ext):
    W, u, v = weight(6, 8, torch.float32, special=False), torch.randn(6), torch.randn(8)
    with pytest.raises(TypeError, match="W must be"):
        rank1_update_(W.int(), u, v)
    with pytest.raises(TypeError, match="floating point"):
        rank1_update_(W, u.int(), v)
    with pytest.raises(ValueError, match="shapes do not fit"):
        rank1_update_(W, v, u)
    with pytest.raises(ValueError, match="shapes do not fit"):
        rank1_update_(W, torch.randn(6, 2), torch.randn(8, 3))
    with pytest.raises(ValueError, match="transposed=True"):
        rank1_update_(W, u, v, transposed=True)
    with pytest.raises(ValueError, match="2-D"):
        rank1_update_(W[0], u, v)
    with pytest.raises(ValueError, match="contiguous"):
        rank1_update_(weight(6, 16, torch.float32)[:, ::2], u, v)
    with pytest.raises(ValueError, match="one device"):
        rank1_update_(W, u.to("meta"), v)
    with pytest.raises(ValueError, match="contiguous"):
        ext.rank1_update_(weight(6, 16, torch.float32)[:, ::2], u, v, 1.0)
    with pytest.raises(TypeError, match="W must be"):
        ext.rank1_update_(W.int(), u, v, 1.0)


def test_opcheck(ext):
    # opcheck's AOT test calls the op twice on the same tensors and compares the
    # outputs; rank1_update_'s record describes the W it found, which the first
    # call changed. So that test runs below on fresh clones instead.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for dtype, k in ((torch.float32, 1), (torch.bfloat16, 2)):
        W = weight(9, 14, dtype)
        U, V = torch.randn(9, k), torch.randn(14, k)
        torch.library.opcheck(ext.rank1_update_.default, (W, U, V, 0.5), test_utils=utils)
        torch.library.opcheck(ext.rank1_checksum.default, (W,))
        out = ext.rank1_update_(W, U, V, 0.5)
        torch.library.opcheck(ext.rank1_undo_.default, (W, U, V, 0.5, *out), test_utils=utils)


def test_traces_under_torch_compile(ext):
    def edit(W, U, V):
        return ext.rank1_update_(W, U, V, 0.5)

    W, U, V = weight(9, 14, torch.bfloat16), torch.randn(9, 2), torch.randn(14, 2)
    W_eager, W_compiled = W.clone(), W.clone()
    eager = edit(W_eager, U, V)
    compiled = torch.compile(edit, backend="aot_eager", fullgraph=True, dynamic=True)(W_compiled, U, V)
    assert same_bytes(W_eager, W_compiled)
    for a, b in zip(eager, compiled):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert same_bytes(a, b) if a.numel() and a.is_floating_point() else torch.equal(a, b)


def test_fallback_record_is_exact(ext, monkeypatch, caplog):
    monkeypatch.setattr(mod, "not_supported_reasons", lambda *a: ["simulated reason"])
    W = weight(12, 19, torch.bfloat16)
    u, v = torch.randn(12), torch.randn(19)
    W0 = W.clone()
    with caplog.at_level(logging.WARNING, logger="kncore.ops"):
        rec = rank1_update_(W, u, v, 2.0)
    assert "simulated reason" in caplog.text and isinstance(rec, Rank1Undo) and rec.original is not None
    rec.undo(W)
    assert same_bytes(W, W0)
    rec = rank1_update_(W, u, v, 2.0)
    W.data[0, 0] = 7.0
    with pytest.raises(RuntimeError, match="checksum"):
        rec.undo(W)


def test_missing_extension(monkeypatch):
    monkeypatch.setattr(_ext, "_state", {"tried": True, "module": None, "error": "ImportError: simulated"})
    W = weight(5, 6, torch.float32)
    W0 = W.clone()
    monkeypatch.setenv("KNCORE_REQUIRE_EXT", "0")
    rec = rank1_update_(W, torch.randn(5), torch.randn(6))
    rec.undo(W)
    assert same_bytes(W, W0)
    monkeypatch.setenv("KNCORE_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="simulated"):
        rank1_update_(W, torch.randn(5), torch.randn(6))
