"""In-place rank-one (or rank-k) weight update with a bit-exact undo, for ROME edits.

``rec = rank1_update_(W, u, v, alpha)`` computes ``W += alpha * u v^T`` in
place (rank k: ``U [m, k]``, ``V [n, k]``, ``W += alpha * U V^T``) and returns a
:class:`Rank1Undo`; ``rec.undo(W)`` (or :func:`rank1_undo_`) restores the very
same bytes. For bfloat16/float16 (and float32) W the maths runs in float32:
``W_new = round(float(W) + delta)``, ``delta[i, j] = sum_t (alpha*U[i,t]) * V[j,t]``
summed in increasing t; float64 W uses float64.

**Layouts.** ``transposed=False``: W is ``[len(u), len(v)]`` (``nn.Linear``
weight, ``[out, in]``). ``transposed=True``: W stores the transpose of the
logical weight (GPT-2 ``Conv1D`` weights are ``[in, out]``): the update applied is
``W += alpha * v u^T``, so u still indexes the output features. W itself may be
contiguous or the ``.t()`` view of a contiguous tensor; other strides are refused.

**Undo record.** Not a copy of W (a fresh 180 MB clone costs ~7x the update
on the 2-core CPU). The undo recomputes ``W' = round(W_new - delta)``, which
gives back W's bits for most elements; the update, which still sees the
original, records the rest in one of two forms, picked from a sample of rows:
*sparse* (flat index + original value of each miss, or whole rows where that is
smaller) for small edits, *dense* (``code``: one int8 per element, the distance
``bits(W) - bits(W')``, with the few that do not fit listed sparsely) for edits
of ROME's size, where 10-20% of elements miss. Dense codes are written in the
same pass and their buffers are pooled for reuse (:func:`rank1_pool_release`
frees them). ``Rank1Undo.nbytes`` says what was kept.
Undo checks W's identity, shape, dtype, version counter and a checksum of its
bits, and refuses (RuntimeError) a W modified in between.

C++: csrc/rank1_update.cpp. Reference: :func:`rank1_update_ref`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import _ext

__all__ = ["rank1_update_", "rank1_undo_", "rank1_update_ref", "rank1_checksum_ref", "Rank1Undo",
           "rank1_pool_release", "supported_dtypes", "supported_devices", "not_supported_reasons"]

supported_dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
supported_devices = ("cpu", "cuda")


@dataclass
class Rank1Undo:
    """What :func:`rank1_undo_` needs to restore W bit-exactly (plain tensors)."""

    U: torch.Tensor  # [rows of the stored W, k], as passed to the op (W's storage orientation)
    V: torch.Tensor  # [cols of the stored W, k]
    alpha: float
    code: torch.Tensor  # int8 [numel] (dense form) or empty (sparse form)
    exc_idx: torch.Tensor  # flat indices into the stored W (int32 below 2^31 elements)
    exc_val: torch.Tensor  # their original values (W's dtype)
    row_idx: torch.Tensor  # int64 rows stored whole
    row_val: torch.Tensor  # [len(row_idx), cols] original rows
    checksum: torch.Tensor  # int64 scalar, of W after the update
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    data_ptr: int
    version: int
    swapped: bool  # the op ran on W.t() (W was given as a transposed view)
    composite: bool = False  # made by the device-generic ATen path
    original: torch.Tensor | None = None  # reference/fallback path: a full copy
    used: bool = field(default=False)

    @property
    def nbytes(self) -> int:
        ts = (self.U, self.V, self.code, self.exc_idx, self.exc_val, self.row_idx, self.row_val, self.checksum,
              self.original)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def undo(self, W: torch.Tensor) -> None:
        rank1_undo_(W, self)


def _factors(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor, transposed: bool):
    """Validate; return (target, U, V, swapped): the contiguous tensor to update and
    U [target.shape[0], k], V [target.shape[1], k] such that target += alpha U V^T."""
    if not isinstance(W, torch.Tensor) or not isinstance(u, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise TypeError("rank1_update_: W, u and v must be tensors")
    if W.dtype not in supported_dtypes:
        raise TypeError(f"rank1_update_: W must be float32, bfloat16, float16 or float64, got {W.dtype}")
    if not (u.dtype.is_floating_point and v.dtype.is_floating_point):
        raise TypeError(f"rank1_update_: u and v must be floating point, got {u.dtype} and {v.dtype}")
    if W.dim() != 2:
        raise ValueError(f"rank1_update_: W must be 2-D, got shape {tuple(W.shape)}")
    if u.device != W.device or v.device != W.device:
        raise ValueError(f"rank1_update_: W, u and v must be on one device, got {W.device}, {u.device}, {v.device}")
    U = u.unsqueeze(1) if u.dim() == 1 else u
    V = v.unsqueeze(1) if v.dim() == 1 else v
    rows, cols = (W.shape[1], W.shape[0]) if transposed else (W.shape[0], W.shape[1])
    if U.dim() != 2 or V.dim() != 2 or U.shape[0] != rows or V.shape[0] != cols or U.shape[1] != V.shape[1]:
        lay = "transposed=True: W is [in, out] = [len(v), len(u)]" if transposed else "W is [len(u), len(v)]"
        raise ValueError(f"rank1_update_: shapes do not fit ({lay}): W {tuple(W.shape)}, u/U {tuple(u.shape)}, "
                         f"v/V {tuple(v.shape)}; expected u [{rows}] or U [{rows}, k], v [{cols}] or V [{cols}, k]")
    if transposed:  # stored W = (logical)^T, so stored W += alpha V U^T
        U, V = V, U
    if W.is_contiguous():
        return W, U, V, False
    if W.t().is_contiguous():  # e.g. a Conv1D weight passed as weight.t(): update its storage
        return W.t(), V, U, True
    raise ValueError(f"rank1_update_: W must be contiguous or the transpose of a contiguous tensor, "
                     f"got strides {W.stride()} for shape {tuple(W.shape)}")


def not_supported_reasons(W: torch.Tensor) -> list[str]:
    """Why the C++ op cannot take this (valid) W; empty when it can."""
    return _ext.not_supported_reasons(W.device, supported_devices)


def _delta_ref(U: torch.Tensor, V: torch.Tensor, alpha: float, acc: torch.dtype) -> torch.Tensor:
    """delta = sum_t (alpha U[:, t]) V[:, t]^T, summed in increasing t (the C++ op's order)."""
    aU = U.to(acc) * alpha
    VT = V.to(acc).T
    D = aU[:, :1] * VT[:1]
    for t in range(1, aU.shape[1]):
        D += aU[:, t:t + 1] * VT[t:t + 1]
    return D


def rank1_checksum_ref(W: torch.Tensor) -> torch.Tensor:
    """The op's checksum in plain PyTorch: sum_i (sum_j fold(bits_ij) mod 2^32) (2i+1) mod 2^64."""
    bits_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[W.element_size()]
    b = W.view(bits_dtype).to(torch.int64)
    lo32 = 0xFFFFFFFF
    if W.element_size() == 2:
        b = b & 0xFFFF
    elif W.element_size() == 4:
        b = b & lo32
    else:
        b = (b & lo32) + ((b >> 32) & lo32)
    rows = b.sum(1) & lo32
    weights = torch.arange(W.shape[0], device=W.device, dtype=torch.int64) * 2 + 1
    return (rows * weights).sum()


def rank1_update_ref(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor, alpha: float = 1.0, *,
                     transposed: bool = False) -> Rank1Undo:
    """Plain PyTorch: W.copy_(round(float(W) + delta)); the record is a full copy of W."""
    T, U, V, swapped = _factors(W, u, v, transposed)
    acc = torch.float64 if T.dtype == torch.float64 else torch.float32
    original = T.clone()
    T.copy_((T.to(acc) + _delta_ref(U, V, alpha, acc)).to(T.dtype))
    return _record(W, T, U, V, alpha, swapped, None, original=original)


def _record(W, T, U, V, alpha, swapped, out, *, composite=False, original=None) -> Rank1Undo:
    if out is None:  # reference record
        e = torch.empty(0, dtype=torch.int64, device=T.device)
        out = (torch.empty(0, dtype=torch.int8, device=T.device), e, T.new_empty(0), e, T.new_empty(0, T.shape[1]),
               rank1_checksum_ref(T))
    return Rank1Undo(U=U.detach().clone(), V=V.detach().clone(), alpha=float(alpha), code=out[0], exc_idx=out[1],
                     exc_val=out[2], row_idx=out[3], row_val=out[4], checksum=out[5], shape=tuple(W.shape),
                     dtype=W.dtype, device=W.device, data_ptr=W.data_ptr(), version=W._version,
                     swapped=swapped, composite=composite, original=original)


def rank1_update_(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor, alpha: float = 1.0, *,
                  transposed: bool = False) -> Rank1Undo:
    """W += alpha * u v^T in place (``W += alpha * v u^T`` with ``transposed=True``).

    u, v may be 1-D (rank one) or [*, k] (rank k). Returns the undo record.
    Errors: TypeError for a wrong dtype, ValueError for wrong shapes, devices
    or a layout that is neither contiguous nor a transposed contiguous tensor.
    """
    T, U, V, swapped = _factors(W, u, v, transposed)
    reasons = not_supported_reasons(T)
    if reasons:
        _ext.fallback("rank1_update_", reasons)
        return rank1_update_ref(W, u, v, alpha, transposed=transposed)
    out = torch.ops.kncore.rank1_update_(T, U, V, float(alpha))
    return _record(W, T, U, V, alpha, swapped, out)


def rank1_undo_(W: torch.Tensor, record: Rank1Undo) -> None:
    """Restore W to its bytes before the update that made ``record``.

    RuntimeError if W was modified since (version counter or checksum), if the
    record was already used or belongs to another tensor; ValueError/TypeError
    if W's shape or dtype do not match the record.
    """
    if not isinstance(record, Rank1Undo):
        raise TypeError(f"rank1_undo_: record must be a Rank1Undo, got {type(record).__name__}")
    if tuple(W.shape) != record.shape:
        raise ValueError(f"rank1_undo_: W has shape {tuple(W.shape)} but the record was made for {record.shape}")
    if W.dtype != record.dtype:
        raise TypeError(f"rank1_undo_: W is {W.dtype} but the record was made for {record.dtype}")
    if W.device != record.device or W.data_ptr() != record.data_ptr:
        raise RuntimeError("rank1_undo_: the record belongs to another tensor (different device or storage)")
    if record.used:
        raise RuntimeError("rank1_undo_: this record was already used")
    if W._version != record.version:
        raise RuntimeError(f"rank1_undo_: W was modified in place after rank1_update_ (version "
                           f"{record.version} -> {W._version}); refusing to undo")
    T = W.t() if record.swapped else W
    if record.original is not None:
        if not torch.equal(rank1_checksum_ref(T), record.checksum):
            raise RuntimeError("rank1_undo_: W was modified after rank1_update_ (checksum mismatch); "
                               "refusing to undo")
        T.copy_(record.original)
    else:
        _ext.require_ext()
        torch.ops.kncore.rank1_undo_(T, record.U, record.V, record.alpha, record.code, record.exc_idx, record.exc_val,
                                     record.row_idx, record.row_val, record.checksum, record.composite)
    record.used = True


def rank1_pool_release() -> int:
    """Free the pooled buffers of dead dense records; returns the bytes freed."""
    if not _ext.load():
        return 0
    return int(torch.ops.kncore.rank1_pool_release())


def _register_fake() -> None:
    @torch.library.register_fake("kncore::rank1_update_")
    def _(W, U, V, alpha=1.0, composite=False):
        _factors(W, U, V, False)  # the kernel's argument errors, at trace time
        ctx = torch.library.get_ctx()
        n_code, n_exc, n_rows = ctx.new_dynamic_size(), ctx.new_dynamic_size(), ctx.new_dynamic_size()
        idx_dtype = torch.int32 if W.numel() < 2**31 else torch.int64
        return (W.new_empty(n_code, dtype=torch.int8), W.new_empty(n_exc, dtype=idx_dtype), W.new_empty(n_exc), W.new_empty(n_rows, dtype=torch.int64),
                W.new_empty(n_rows, W.shape[1]), W.new_empty((), dtype=torch.int64))

    @torch.library.register_fake("kncore::rank1_undo_")
    def _(W, U, V, alpha, code, exc_idx, exc_val, row_idx, row_val, checksum, composite=False):
        return None

    @torch.library.register_fake("kncore::rank1_checksum")
    def _(W, composite=False):
        return W.new_empty((), dtype=torch.int64)


_ext.on_load(_register_fake)
