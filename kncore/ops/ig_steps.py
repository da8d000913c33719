"""Integrated-gradient steps, expanded and reduced in batches (linearity trick).

For the neurons a [d_ff] of one group (a prompt at a layer), IG's steps
alpha_k * a only enter the model through the MLP output, which is linear in a:
``mlp_out(alpha_k a) = alpha_k (a @ W_down) + b``. So

1. ``y = a @ W_down`` once per group, then :func:`expand_steps` writes every
   step row ``alphas[r] * y[index[r]] + b`` [R, d_model] in one pass (no scaled
   copies of a, no per-step down-projection);
2. those rows replace the layer's ``mlp_out`` in the pass over the layers above
   (e.g. ``Patch("mlp_out", L, positions=last, value=rows)``) and autograd gives
   ``grads`` = d(score)/d(rows) [R, d_model];
3. :func:`reduce_steps` returns ``IG[g] = a[g] * (W_down @ sum_{r in g} w_r grads[r])``
   [G, d_ff] in fp32: one deterministic pass over the gradients and one over
   W_down instead of one per step.

:func:`expand_steps` and :func:`reduce_steps` have the signatures of
:func:`kncore.attribution.expand_steps` / ``reduce_steps`` (plus optional row
weights), so the IG engine can swap them in. :func:`ig_expand` /
:func:`ig_reduce` take dense [B, m, ...] layouts.

Each entry runs the Triton kernel (``kernels/ig_steps.py``) on CUDA when
:func:`not_supported_reasons` is empty, else the plain PyTorch reference; a
fallback on a GPU is logged on the ``kncore.ops`` logger. ``KNCORE_KERNELS``
works as for :mod:`kncore.ops.mlp_capture`.
"""
from __future__ import annotations

import torch

from .dispatch import SUPPORTED_DTYPES, kernel_module, log_fallback, triton_reasons

_module = None


def kernels():
    """The kernel module, ``kncore.kernels.ig_steps`` (``kernels/ig_steps.py``)."""
    global _module
    if _module is None:
        _module = kernel_module("ig_steps")
    return _module


def not_supported_reasons(*tensors, coefficients=()) -> list[str]:
    """Why the Triton kernels cannot take these tensors (empty list: they can).

    Pass the call's data tensors (None entries are skipped; the first sets the
    device; floating ones must be in :data:`SUPPORTED_DTYPES`) and, as
    ``coefficients``, the step factors and weights (any float dtype, fp64 too).
    """
    ts = [t for t in tensors if torch.is_tensor(t)]
    cs = [t for t in coefficients if torch.is_tensor(t)]
    dev = ts[0].device
    reasons = triton_reasons(kernels(), dev.type, "the kernels run")
    for t in ts + cs:
        if t.device != dev:
            reasons.append(f"tensors on {t.device} and {dev}")
    for t in ts:
        if t.is_floating_point() and t.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {t.dtype} is not one of {SUPPORTED_DTYPES}")
    return list(dict.fromkeys(reasons))


def _pick(name, *tensors, coefficients=()):
    """The kernel module's ``name`` where the kernels apply, else ``name_ref`` (logged)."""
    K = kernels()
    reasons = not_supported_reasons(*tensors, coefficients=coefficients)
    if reasons:
        log_fallback(f"ig_steps.{name}", reasons, tensors[0].device)
        return getattr(K, name + "_ref")
    return getattr(K, name)


def expand_steps(base, index, alphas, bias=None):
    """Step rows ``alphas[r] * base[index[r]] + bias``: [R, width] in base's dtype.

    base [G, width]: ``a @ W_down`` per group (act site) or the pre-activation
    (pre_act site); index [R] each row's group; alphas [R]; bias [width], per
    group [G, width] (with a baseline a0: ``a0 @ W_down + b``), or None.
    Differentiable in base, alphas and bias.
    """
    return _pick("expand_steps", base, index, bias, coefficients=(alphas,))(base, index, alphas, bias)


def segment_sum(rows, index, n_groups, weights=None):
    """``out[g] = sum_{r: index[r] = g} weights[r] * rows[r]``: [n_groups, width] fp32."""
    return _pick("segment_sum", rows, index, coefficients=(weights,))(rows, index, n_groups, weights)


def reduce_steps(grads, index, n_groups, act, w_down=None, weights=None):
    """IG per group, fp32 [G, d_ff]: ``act[g] * (W_down @ sum_{r in g} w_r grads[r])``.

    grads [R, width] d(score)/d(step rows); index [R]; act [G, d_ff] the
    neurons; w_down [d_ff, width] (``adapter.down_weight(L)``, a view) for the
    act site, None for pre_act (then ``act * sum``); weights [R] quadrature
    weights, or None when the gradients already carry them.
    """
    fn = _pick("reduce_steps", grads, index, act, w_down, coefficients=(weights,))
    return fn(grads, index, n_groups, act, w_down, weights)


def ig_expand(y, bias, alphas):
    """Every step's MLP output ``alphas[(b,) k] * y[b] + bias[(b)]``: [B, m, D] in y's dtype.

    y [B, D] = a @ W_down; bias [D], [B, D] or None; alphas [m] or [B, m].
    """
    return _pick("ig_expand", y, bias, coefficients=(alphas,))(y, bias, alphas)


def ig_reduce(a, w_down, g, weights=None):
    """IG of the neurons a [B, d_ff]: ``a * ((sum_k w_k g[:, k]) @ w_down.T)``, fp32 [B, d_ff].

    g [B, m, D] d(score)/d(step outputs); weights [m] or [B, m] (None: 1/m, the
    Riemann sum).
    """
    return _pick("ig_reduce", a, w_down, g, coefficients=(weights,))(a, w_down, g, weights)
