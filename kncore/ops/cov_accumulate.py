"""Symmetric second-moment accumulation, C += X^T X, for ROME statistics.

Raw op :func:`cov_accumulate_` (C++ ``kncore::cov_accumulate_``, csrc/cov_accumulate.cpp)
and the readable reference :func:`cov_accumulate_ref`; :class:`CovAccumulator`
wraps them with a row count and a running sum.

**Storage.** Only the *lower* triangle of C (``C[i, j]`` with ``i >= j``) is
computed: half the FLOPs of ``C.addmm_(X.T, X)``. Entries above the diagonal are
unspecified (some hold partial sums), so the raw C is only meaningful after
mirroring: :func:`cov_mirror` returns ``tril(C) + tril(C, -1).T``.
:meth:`CovAccumulator.second_moment` and :meth:`~CovAccumulator.covariance`
do that for you. Maths runs in C's dtype (float32 or float64); X may be
float32, bfloat16 or float16 (float64 with a float64 C).

Measured on the 2-core CPU (bench/bench_cov.py): see bench/results/.
"""
from __future__ import annotations

import torch

from .. import _ext

__all__ = ["cov_accumulate_", "cov_accumulate_ref", "cov_mirror", "CovAccumulator", "supported_dtypes",
           "supported_acc_dtypes", "supported_devices", "not_supported_reasons"]

supported_dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # X
supported_acc_dtypes = (torch.float32, torch.float64)  # C and s
supported_devices = ("cpu", "cuda")


def _check(C: torch.Tensor, X: torch.Tensor, mask, s, n) -> None:
    """Raise TypeError/ValueError naming the problem; shared by the fast and reference paths."""
    for name, t in (("C", C), ("X", X), ("s", s), ("n", n)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cov_accumulate_: {name} must be a tensor, got {type(t).__name__}")
    if C.dtype not in supported_acc_dtypes:
        raise TypeError(f"cov_accumulate_: accumulator C must be float32 or float64, got {C.dtype}")
    if X.dtype not in supported_dtypes:
        raise TypeError(f"cov_accumulate_: X must be float32, bfloat16 or float16, got {X.dtype}")
    if X.dtype == torch.float64 and C.dtype != torch.float64:
        raise TypeError("cov_accumulate_: float64 X with a float32 accumulator would lose precision")
    if s.dtype != C.dtype:
        raise TypeError(f"cov_accumulate_: running sum s must have C's dtype {C.dtype}, got {s.dtype}")
    if n.dtype != torch.int64:
        raise TypeError(f"cov_accumulate_: row count n must be int64, got {n.dtype}")
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"cov_accumulate_: C must be a square [d, d] matrix, got shape {tuple(C.shape)}")
    d = C.shape[0]
    if X.dim() != 2 or X.shape[1] != d:
        raise ValueError(f"cov_accumulate_: X must be [rows, {d}] to match C, got shape {tuple(X.shape)}")
    if s.shape != (d,):
        raise ValueError(f"cov_accumulate_: s must be [{d}], got shape {tuple(s.shape)}")
    if n.numel() != 1:
        raise ValueError(f"cov_accumulate_: n must hold one element, got shape {tuple(n.shape)}")
    for name, t in (("C", C), ("s", s), ("X", X)):
        if not t.is_contiguous():
            raise ValueError(f"cov_accumulate_: {name} must be contiguous (call .contiguous())")
    for name, t in (("s", s), ("n", n), ("X", X)):
        if t.device != C.device:
            raise ValueError(f"cov_accumulate_: {name} is on {t.device} but C is on {C.device}; "
                             "C, s, n and X must be on one device")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"cov_accumulate_: mask must be a bool tensor, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != (X.shape[0],):
            raise ValueError(f"cov_accumulate_: mask must be [{X.shape[0]}] (one flag per row of X), "
                             f"got shape {tuple(mask.shape)}")
        if mask.device != X.device:
            raise ValueError(f"cov_accumulate_: mask is on {mask.device} but X is on {X.device}")


def not_supported_reasons(C: torch.Tensor, X: torch.Tensor, mask=None) -> list[str]:
    """Why the C++ op cannot take these (valid) inputs; empty when it can."""
    return _ext.not_supported_reasons(C.device, supported_devices)


def cov_accumulate_ref(C, X, mask=None, *, s=None, n=None):
    """Plain PyTorch: C += Xk^T Xk (full matrix), s += sum(Xk), n += rows, Xk = kept rows in C's dtype."""
    Xk = (X if mask is None else X[mask]).to(C.dtype)
    C.addmm_(Xk.T, Xk)
    if s is not None:
        s.add_(Xk.sum(0))
    if n is not None:
        n.add_(Xk.shape[0])
    return C


def cov_accumulate_(C: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None = None, *,
                    s: torch.Tensor | None = None, n: torch.Tensor | None = None) -> torch.Tensor:
    """C += X^T X over the rows that ``mask`` keeps; returns C.

    Only the lower triangle of C is written validly (see the module docstring;
    read C through :func:`cov_mirror`). ``s`` ([d], C's dtype) and ``n`` (int64
    scalar), when given, receive the column sum and the number of kept rows.
    Errors: TypeError for a wrong dtype, ValueError for a wrong shape, device or
    a non-contiguous input.
    """
    s_ = s if s is not None else C.new_zeros(C.shape[:1] if C.dim() else (0,))
    n_ = n if n is not None else torch.zeros((), dtype=torch.int64, device=C.device)
    _check(C, X, mask, s_, n_)
    reasons = not_supported_reasons(C, X, mask)
    if reasons:
        _ext.fallback("cov_accumulate_", reasons)
        return cov_accumulate_ref(C, X, mask, s=s, n=n)
    torch.ops.kncore.cov_accumulate_(C, s_, n_, X, mask)
    return C


def cov_mirror(C: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from C's lower triangle: tril(C) + tril(C, -1)^T."""
    return C.tril() + C.tril(-1).mT


class CovAccumulator:
    """Running X^T X (lower triangle), row count and column sum of a stream of batches.

    >>> acc = CovAccumulator(d, dtype=torch.float64)
    >>> for h in batches: acc.update(h, mask)      # h [..., d], mask [...] bool
    >>> acc.all_reduce()                           # sum over ranks, if torch.distributed runs
    >>> acc.second_moment()                        # E[x x^T], as ROME's layer_stats "mom2"

    State is three plain tensors (``C``, ``s``, ``n``), so :meth:`state_dict`
    saves with safetensors.
    """

    def __init__(self, d: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"):
        if dtype not in supported_acc_dtypes:
            raise TypeError(f"CovAccumulator: dtype must be float32 or float64, got {dtype}")
        self.C = torch.zeros(d, d, dtype=dtype, device=device)
        self.s = torch.zeros(d, dtype=dtype, device=device)
        self.n = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def d(self) -> int:
        return self.C.shape[0]

    def update(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> CovAccumulator:
        """Add the rows of X ([..., d]; leading dims flattened) that ``mask`` ([...], bool) keeps."""
        if X.dim() < 1 or X.shape[-1] != self.d:
            raise ValueError(f"CovAccumulator.update: X must be [..., {self.d}], got shape {tuple(X.shape)}")
        X2 = X.reshape(-1, self.d)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.shape != X.shape[:-1]:
                raise ValueError(f"CovAccumulator.update: mask must have shape {tuple(X.shape[:-1])}, got "
                                 f"{tuple(getattr(mask, 'shape', ()))}")
            mask = mask.reshape(-1)
        cov_accumulate_(self.C, X2, mask, s=self.s, n=self.n)
        return self

    def merge(self, other: CovAccumulator) -> CovAccumulator:
        """Add another accumulator's statistics (same d, dtype and device) into this one."""
        if other.C.shape != self.C.shape or other.C.dtype != self.C.dtype or other.C.device != self.C.device:
            raise ValueError(f"CovAccumulator.merge: other is d={other.d} {other.C.dtype} on {other.C.device}, "
                             f"this is d={self.d} {self.C.dtype} on {self.C.device}")
        self.C += other.C  # the unspecified upper parts add up to something unspecified: fine
        self.s += other.s
        self.n += other.n
        return self

    def all_reduce(self, group=None) -> CovAccumulator:
        """Sum C, s and n over the ranks of ``group`` when torch.distributed is initialised."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for t in (self.C, self.s, self.n):
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return self

    def _count(self) -> int:
        if self.n.is_meta:  # the planner (kncore.planner.stats_schedule): shapes and bytes, no values
            return 1
        n = int(self.n)
        if n == 0:
            raise ValueError("CovAccumulator: no rows accumulated yet")
        return n

    def mean(self) -> torch.Tensor:
        return self.s / self._count()

    def second_moment(self) -> torch.Tensor:
        """E[x x^T] = C / n, mirrored to the full symmetric [d, d] matrix (ROME's mom2 moment)."""
        return cov_mirror(self.C) / self._count()

    def covariance(self, unbiased: bool = True) -> torch.Tensor:
        """Centred covariance (C - n mu mu^T) / (n - 1) (or / n). Prefer float64: the
        subtraction cancels digits when the mean is large next to the spread."""
        n = self._count()
        mu = self.s / n
        centred = cov_mirror(self.C) - n * torch.outer(mu, mu)
        denom = n - 1 if unbiased else n
        if denom <= 0:
            raise ValueError("CovAccumulator.covariance: unbiased covariance needs at least 2 rows")
        return centred / denom

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors: C (lower triangle, upper part zeroed), s, n."""
        return {"C": self.C.tril(), "s": self.s.clone(), "n": self.n.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> CovAccumulator:
        C, s, n = state["C"], state["s"], state["n"]
        if C.shape != self.C.shape or s.shape != self.s.shape or n.numel() != 1:
            raise ValueError(f"CovAccumulator.load_state_dict: expected C {tuple(self.C.shape)}, s ({self.d},), "
                             f"n scalar; got C {tuple(C.shape)}, s {tuple(s.shape)}, n {tuple(n.shape)}")
        self.C.copy_(C)
        self.s.copy_(s)
        self.n.copy_(n.reshape(()))
        return self


def _register_fake() -> None:
    @torch.library.register_fake("kncore::cov_accumulate_")
    def _(C, s, n, X, mask=None, composite=False):
        _check(C, X, mask, s, n)  # shape/dtype/device errors at trace time, as the kernel would raise
        return None


_ext.on_load(_register_fake)
