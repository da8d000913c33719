"""Fused MLP up-projection + activation with neuron scaling.

Dispatch between the Triton kernel (``kernels/mlp_capture.py``, imported as
``kncore.kernels.mlp_capture``) and its plain PyTorch reference:

* CUDA tensors use the kernel when :func:`not_supported_reasons` is empty; a
  fallback to the reference on a GPU is logged (warning once per reason, on the
  ``kncore.ops`` logger), because a fallback nobody sees is a performance bug.
* CPU tensors use the reference; ``KNCORE_KERNELS`` changes that as
  :mod:`kncore.ops.dispatch` says (``force``: the kernel through Triton's
  interpreter, for tests; ``off``: never the kernel).

The runtime (:func:`kncore.runtime.run`) calls :func:`fused_pre_act` for every
MLP on CUDA, so every method gets the fused pass without asking for it.
"""
from __future__ import annotations

import torch

from .dispatch import SUPPORTED_DTYPES, kernel_module, log_fallback, triton_reasons

ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu")

_module = None


def kernels():
    """The kernel module, ``kncore.kernels.mlp_capture`` (``kernels/mlp_capture.py``)."""
    global _module
    if _module is None:
        _module = kernel_module("mlp_capture")
    return _module


def mlp_capture_ref(*args, **kwargs):
    """The plain PyTorch definition (see ``kernels/mlp_capture.py``)."""
    return kernels().mlp_capture_ref(*args, **kwargs)


def not_supported_reasons(x, w, b=None, *, act, w_up=None, b_up=None, neuron_scale=None,
                          neuron_rows=None) -> list[str]:
    """Why the Triton kernel cannot run this call (empty list: it can).

    Same arguments as :func:`mlp_capture`. Shape errors are not reasons: they
    raise in either path.
    """
    reasons = triton_reasons(kernels(), x.device.type, "the kernel runs")
    if act not in ACTIVATIONS:
        reasons.append(f"activation {act!r} is not one of {ACTIVATIONS}")
    if x.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {x.dtype} is not one of {SUPPORTED_DTYPES}")
    for name, t in (("w", w), ("b", b), ("w_up", w_up), ("b_up", b_up)):
        if t is not None and t.dtype != x.dtype:
            reasons.append(f"{name} has dtype {t.dtype}, x has {x.dtype}")
    grad = torch.is_grad_enabled()
    for name, t in (("w", w), ("b", b), ("w_up", w_up), ("b_up", b_up), ("neuron_scale", neuron_scale)):
        if t is not None and grad and t.requires_grad:
            reasons.append(f"{name} requires grad (the kernel differentiates x only)")
    for name, t in (("w", w), ("b", b), ("w_up", w_up), ("b_up", b_up), ("neuron_scale", neuron_scale),
                    ("neuron_rows", neuron_rows)):
        if t is not None and t.device != x.device:
            reasons.append(f"{name} is on {t.device}, x on {x.device}")
    return reasons


def mlp_capture(x, w, b=None, *, act, w_up=None, b_up=None, neuron_scale=None,
                neuron_rows=None, return_pre=False):
    """``act(x @ w + b) [* (x @ w_up + b_up)]``, scaled per neuron on chosen rows.

    x [M, d]; w, w_up [d, d_ff] (any strides: ``linear.weight.t()``); b, b_up
    [d_ff]; ``act`` one of :data:`ACTIVATIONS` (``w_up`` given: gated, e.g.
    SwiGLU = ``silu``); neuron_scale [d_ff] applied on the rows where
    neuron_rows [M] (bool; None: all) is True (0 suppresses, 2 enhances).
    Returns ``MLPCaptureOut(act [M, d_ff], pre [M, d_ff] | None)``. The
    Triton kernel where supported (CUDA),
    else the reference; differentiable with respect to x either way.
    """
    reasons = not_supported_reasons(x, w, b, act=act, w_up=w_up, b_up=b_up, neuron_scale=neuron_scale,
                                    neuron_rows=neuron_rows)
    K = kernels()
    fn = K.mlp_capture
    if reasons:
        log_fallback("mlp_capture", reasons, x.device)
        fn = K.mlp_capture_ref
    return fn(x, w, b, act=act, w_up=w_up, b_up=b_up, neuron_scale=neuron_scale,
              neuron_rows=neuron_rows, return_pre=return_pre)


# --------------------------------------------------------------------------- model glue

def activation_name(fn) -> str | None:
    """The kernel's name for a Hugging Face / torch activation module or function, or None."""
    import torch.nn.functional as F

    if fn in (F.gelu,):
        return "gelu"
    if fn in (F.silu,):
        return "silu"
    if fn in (F.relu,):
        return "relu"
    cls = type(fn).__name__
    if cls in ("NewGELUActivation", "FastGELUActivation", "GELUTanh", "PytorchGELUTanh"):
        return "gelu_tanh"  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written three ways
    if cls == "GELUActivation":
        return "gelu"  # F.gelu or its Python erf form
    if cls in ("SiLUActivation", "SiLU"):
        return "silu"
    if cls == "ReLU":
        return "relu"
    if cls == "GELU" and isinstance(fn, torch.nn.GELU):
        return "gelu_tanh" if fn.approximate == "tanh" else "gelu"
    return None


def _in_out_weight(mod):
    """(W [d_in, d_out] view, bias) of a Linear or a GPT-2 Conv1D, or None."""
    if isinstance(mod, torch.nn.Linear):
        return mod.weight.t(), mod.bias
    if type(mod).__name__ == "Conv1D" and mod.weight.dim() == 2:  # transformers' GPT-2 Conv1D: [in, out]
        return mod.weight, mod.bias
    return None


def mlp_params(ad, L: int):
    """``(params, reason)``: the up-projection of block L as kernel arguments
    ``dict(act, w, b, w_up, b_up)``, or None and why the fused path cannot take it."""
    mods = ad.mlp_modules(L)
    if mods is None:
        return None, f"architecture {ad.arch!r} has no fused-MLP mapping"
    # The fused pass replaces mlp_pre + mlp_act, so it must be the class that
    # names the modules (declares mlp_paths or overrides mlp_modules) that
    # also computes with them.
    owner = next(c for c in type(ad).__mro__ if "mlp_modules" in vars(c) or "mlp_paths" in vars(c))
    if type(ad).mlp_pre is not owner.mlp_pre or type(ad).mlp_act is not owner.mlp_act:
        return None, f"{type(ad).__name__} overrides mlp_pre/mlp_act"
    up, fn, gate_up = mods.up, mods.act, mods.gate_up
    act = activation_name(fn)
    if act is None:
        return None, f"activation {type(fn).__name__} has no kernel"
    wb = _in_out_weight(up)
    if wb is None:
        return None, f"up-projection {type(up).__name__} is not a Linear or Conv1D"
    params = dict(act=act, w=wb[0], b=wb[1], w_up=None, b_up=None)
    if gate_up is not None:
        wb = _in_out_weight(gate_up)
        if wb is None:
            return None, f"up-projection {type(gate_up).__name__} is not a Linear"
        params.update(w_up=wb[0], b_up=wb[1])
    return params, None


def _patch_factor(p) -> float | None:
    """The factor of a neuron patch that only multiplies (a number as ``scale``,
    or a zero ``value``: suppression), else None."""
    if p.fn is not None or p.neurons is None:
        return None
    if p.scale is not None:
        s = p.scale
        return float(s) if not torch.is_tensor(s) or s.numel() == 1 else None
    v = p.value
    return 0.0 if v.numel() == 1 and float(v) == 0 else None


def neuron_scaling(plist, position_ids: torch.Tensor, d_ff: int, device):
    """The kernel's ``(neuron_scale [d_ff], neuron_rows [B*n])`` for the ``act``
    patches of one block, or None where its epilogue cannot apply them (then
    the runtime's plain site does). It can when every patch multiplies the same
    neurons by the same factor on rows and positions no two patches share:
    what :func:`kncore.patch_neurons` holds (one patch per target position)."""
    from ..runtime import selection_mask

    f = _patch_factor(plist[0])
    nidx = torch.as_tensor(plist[0].neurons, device=device, dtype=torch.long).reshape(-1) if f is not None else None
    rows = torch.zeros(position_ids.shape, dtype=torch.bool, device=device)
    for p in plist:
        if f is None or _patch_factor(p) != f or \
                not torch.equal(torch.as_tensor(p.neurons, device=device, dtype=torch.long).reshape(-1), nidx):
            return None
        sel = selection_mask(p, position_ids).to(device)
        if (rows & sel).any():
            return None  # a second patch on the same entries scales them twice
        rows |= sel
    scale = torch.ones(d_ff, dtype=torch.float32, device=device)
    scale[nidx] = f
    return scale, rows.reshape(-1)


def fused_pre_act(ad, L: int, x: torch.Tensor, table: dict | None = None, position_ids=None):
    """``(pre, act, done)`` of block L's MLP from one fused kernel pass
    (``pre``, ``act`` [..., d_ff]), or None (after logging why) where the
    kernel does not apply. ``table`` holds the run's patches by (site, layer):
    a patch at ``pre_act`` must see the pre-activation before the activation,
    so it sends the layer to the plain path; the ``act`` patches of
    :func:`kncore.patch_neurons` (suppress, enhance: a factor on some neurons)
    are applied in the kernel's epilogue (``neuron_scale``, ``neuron_rows``;
    ``position_ids`` [B, n] place them) and come back in ``done``.
    """
    reasons = []
    if table and table.get(("pre_act", L)):
        reasons.append("patches at pre_act act between the projection and the activation")
    params, why = mlp_params(ad, L)
    if why:
        reasons.append(why)
    x2 = x.reshape(-1, x.shape[-1])
    if params is not None:
        reasons += not_supported_reasons(x2, params["w"], params["b"], act=params["act"], w_up=params["w_up"],
                                         b_up=params["b_up"])
    if reasons:
        log_fallback("mlp_capture in the runtime", reasons, x.device)
        return None
    acts = (table or {}).get(("act", L))
    scaling = None
    if acts and position_ids is not None and tuple(position_ids.shape) == tuple(x.shape[:-1]):
        scaling = neuron_scaling(acts, position_ids, params["w"].shape[-1], x.device)
    kw = {} if scaling is None else dict(neuron_scale=scaling[0].to(x.dtype), neuron_rows=scaling[1])
    out = kernels().mlp_capture(x2, params["w"], params["b"], act=params["act"], w_up=params["w_up"],
                                b_up=params["b_up"], return_pre=True, **kw)
    shape = tuple(x.shape[:-1]) + (out.act.shape[-1],)
    return out.pre.view(shape), out.act.view(shape), (tuple(acts) if scaling is not None else ())
