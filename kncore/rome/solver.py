"""The per-layer linear algebra of the batch editors, in float64.

Every editor here writes its update at one layer as ``Delta = R A^T`` with
``R [d_model, B]`` the residual it assigns to that layer (one column per
request) and ``A [d_ff, B]`` the adjusted keys, so the rank-k op applies it
as a rank-B update with an exact undo:

* MEMIT (Meng et al. 2023, ``memit_main.execute_memit``):
  ``A = (lambda C + K K^T)^-1 K`` with ``lambda = mom2_update_weight``.
* EMMET (Gupta et al. 2024, equality-constrained batched ROME):
  ``A = C'^-1 K (K^T C'^-1 K + ridge I)^-1`` with ``C' = lambda C + mu I``
  (``mu = update_norm_lambda``, ``ridge = emmet_lambda``); with B = 1 and no
  ridge this is ROME's update.

C is the second moment E[k k^T] of the keys (:func:`kncore.rome.layer_stats`)
and K the edited keys ``[d_ff, B]``. Both systems are symmetric positive
definite when they are solvable, so they are solved by Cholesky; a failed
factorisation is reported (:class:`SingularSystem`) instead of returning noise.
"""
from __future__ import annotations

import torch

from .editing import SingularStatistics


# Beyond this the float64 solve keeps fewer than ~4 correct digits (eps 2.2e-16):
# the update would be rounding noise, so it is refused.
MAX_COND = 1e12


class SingularSystem(SingularStatistics):
    """lambda C + K K^T (or EMMET's k x k system) cannot be solved."""


def _chol(M: torch.Tensor, what: str, fix: str) -> torch.Tensor:
    if not torch.isfinite(M).all():
        raise SingularSystem(f"{what} holds NaN or inf")
    Lf, info = torch.linalg.cholesky_ex((M + M.T) / 2)
    if int(info) != 0:
        raise SingularSystem(f"{what} is singular or not positive definite (Cholesky failed at column "
                             f"{int(info)}): {fix}")
    dg = Lf.diagonal()
    cond = float((dg.max() / dg.min()) ** 2)  # a lower bound on the condition number
    if not cond < MAX_COND:
        raise SingularSystem(f"{what} is numerically singular (condition number >= {cond:.1e}): {fix}")
    return Lf


def memit_keys(C: torch.Tensor | None, K: torch.Tensor, weight: float) -> torch.Tensor:
    """MEMIT's adjusted keys ``(weight C + K K^T)^-1 K`` (C None: the identity)."""
    K = K.double()
    d = K.shape[0]
    Cw = (torch.eye(d, dtype=K.dtype, device=K.device) if C is None else C.to(K.device, torch.float64)) * weight
    Lf = _chol(Cw + K @ K.T, "lambda C + K K^T",
               "compute the statistics over more text, or raise mom2_update_weight / set mom2_reg")
    return torch.cholesky_solve(K, Lf)


def emmet_keys(C: torch.Tensor | None, K: torch.Tensor, weight: float, ridge: float,
               norm_lambda: float = 0.0) -> torch.Tensor:
    """EMMET's adjusted keys ``C'^-1 K (K^T C'^-1 K + ridge I)^-1``."""
    K = K.double()
    d, B = K.shape
    eye = torch.eye(d, dtype=K.dtype, device=K.device)
    Cw = (eye if C is None else C.to(K.device, torch.float64)) * weight + norm_lambda * eye
    Lc = _chol(Cw, "lambda C (+ update_norm_lambda I)",
               "compute the statistics over more text, or set mom2_reg or update_norm_lambda")
    CiK = torch.cholesky_solve(K, Lc)
    D = K.T @ CiK + ridge * torch.eye(B, dtype=K.dtype, device=K.device)
    Ld = _chol(D, "EMMET's K^T C^-1 K + ridge I",
               "two requests share a key (same subject and prompt?) or emmet_lambda is 0: "
               "set emmet_lambda > 0")
    return torch.cholesky_solve(CiK.T, Ld).T
