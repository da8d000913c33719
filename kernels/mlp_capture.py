"""Fused MLP up-projection + activation, with neuron scaling (Triton).

One pass computes, for rows x [M, d] of the MLP input,

    pre = x @ W + b                               (the ``pre_act`` site)
    h   = act(pre)            or  act(pre) * (x @ W_up + b_up)   (gated: SwiGLU)
    h   = h * neuron_scale[j]   on rows where neuron_rows[m]   (suppress / enhance)

and writes ``h`` (the ``act`` site, the neurons) and optionally ``pre``,
straight from the matmul epilogue. Eager PyTorch does the same in 2 (4 gated)
full [M, d_ff] round trips through memory after the matmuls.

Activations: ``gelu_tanh`` (GPT-2 / GPT-J ``gelu_new``), ``gelu`` (erf, BERT),
``silu`` (LLaMA's SwiGLU with ``W_up``) and ``relu``.

Faces of this op (every op has a plain reference, a fast path, a test and a
bench): :func:`mlp_capture_ref` is the plain PyTorch
definition; :func:`mlp_capture` runs the Triton kernel through a
``torch.library.triton_op`` (an ``autograd.Function`` before torch 2.6) whose
backward gives gradients with respect to ``x`` (weights are frozen in kncore);
:mod:`kncore.ops.mlp_capture` decides between the two and logs why it falls back.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the references still work; kncore.ops reports why the kernels do not
    triton = None

    class tl:  # the kernels' annotations need tl.constexpr to exist
        constexpr = None

ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class MLPCaptureOut(NamedTuple):
    act: torch.Tensor            # [M, d_ff] the neuron activations (after the neuron scale)
    pre: Optional[torch.Tensor]  # [M, d_ff] pre-activation (the gate for SwiGLU), if asked


# --------------------------------------------------------------------------- reference

def _act_ref(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "gelu":
        return F.gelu(z)
    if name == "silu":
        return F.silu(z)
    if name == "relu":
        return F.relu(z)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def mlp_capture_ref(x, w, b=None, *, act, w_up=None, b_up=None, neuron_scale=None,
                    neuron_rows=None, return_pre=False) -> MLPCaptureOut:
    """Plain PyTorch definition of :func:`mlp_capture` (same arguments), in x's dtype.

    x [M, d]; w, w_up [d, d_ff]; b, b_up [d_ff]; neuron_scale [d_ff];
    neuron_rows [M] bool (rows the neuron scale applies to; None: all).
    """
    pre = x @ w if b is None else torch.addmm(b, x, w)
    h = _act_ref(act, pre)
    if w_up is not None:
        h = h * (x @ w_up if b_up is None else torch.addmm(b_up, x, w_up))
    if neuron_scale is not None:
        scaled = h * neuron_scale.to(h.dtype)
        h = scaled if neuron_rows is None else torch.where(neuron_rows[:, None], scaled, h)
    return MLPCaptureOut(h, pre if return_pre else None)


# --------------------------------------------------------------------------- kernel

_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


@_jit
def _sigmoid(t):
    e = tl.exp(-tl.abs(t))  # never overflows
    return tl.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@_jit
def _activation(z, ACT: tl.constexpr):
    # z is fp32. gelu_tanh uses 0.5 * (1 + tanh(u)) == sigmoid(2u).
    if ACT == 0:
        out = z * _sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    elif ACT == 1:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 2:
        out = z * _sigmoid(z)
    else:
        out = tl.maximum(z, 0.0)
    return out


@_jit
def _to_out(v, dtype: tl.constexpr, EMU_BF16: tl.constexpr):
    # fp32 -> output dtype. On a GPU the cast rounds to nearest even. Triton's
    # interpreter (3.9) truncates fp32 -> bf16 and its "rtne" mode carries into
    # the exponent wrongly, so under the interpreter bf16 is rounded here by hand.
    if EMU_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(dtype)
    return out


@_jit
def _mlp_capture_kernel(
        x_ptr, w_ptr, b_ptr, wu_ptr, bu_ptr, ns_ptr, nr_ptr,
        act_ptr, pre_ptr, up_ptr,
        M, N, K, stride_xm, stride_xk, stride_wk, stride_wn, stride_uk, stride_un,
        M_KEY,  # autotuning key only (a power-of-2 bucket of M)
        ACT: tl.constexpr, GATED: tl.constexpr, HAS_B: tl.constexpr, HAS_BU: tl.constexpr,
        HAS_NS: tl.constexpr, HAS_NR: tl.constexpr,
        STORE_PRE: tl.constexpr, STORE_UP: tl.constexpr, EMU_BF16: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M row tiles in a row reuse the same W column tiles from L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rk[:, None] * stride_wk + rn[None, :].to(tl.int64) * stride_wn
    u_ptrs = wu_ptr + rk[:, None] * stride_uk + rn[None, :].to(tl.int64) * stride_un
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if EMU_BF16:  # the interpreter's dot mishandles bf16; bf16 products are exact in fp32
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        if IEEE:
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc)
        if GATED:
            ut = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if EMU_BF16:
                ut = ut.to(tl.float32)
            if IEEE:
                acc_u = tl.dot(xt, ut, acc_u, input_precision="ieee")
            else:
                acc_u = tl.dot(xt, ut, acc_u)
            u_ptrs += BLOCK_K * stride_uk
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_B:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    h = _activation(acc, ACT)
    if GATED:
        if HAS_BU:
            acc_u += tl.load(bu_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        h = h * acc_u
    if HAS_NS:
        ns = tl.load(ns_ptr + rn, mask=n_ok, other=1.0).to(tl.float32)[None, :]
        if HAS_NR:
            sel = tl.load(nr_ptr + rm, mask=m_ok, other=0) != 0
            h = tl.where(sel[:, None], h * ns, h)
        else:
            h = h * ns

    ok = m_ok[:, None] & n_ok[None, :]
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    out = _to_out(h, act_ptr.dtype.element_ty, EMU_BF16)
    tl.store(act_ptr + offs, out, mask=ok)
    if STORE_PRE:
        tl.store(pre_ptr + offs, _to_out(acc, act_ptr.dtype.element_ty, EMU_BF16), mask=ok)
    if STORE_UP:
        tl.store(up_ptr + offs, _to_out(acc_u, act_ptr.dtype.element_ty, EMU_BF16), mask=ok)


AVAILABLE = triton is not None
INTERPRETED = AVAILABLE and not isinstance(_mlp_capture_kernel, triton.runtime.JITFunction)

# GPU tiles: the standard Triton matmul configurations for Ampere/Hopper, cut
# by _prune_configs for each launch. Not yet timed on a GPU (none in the
# development sessions): bench/bench_kernels.py measures the choice.
# Dropped, as compiled by Triton 3.9 and its ptxas (bench/results/bench_kernels_compile_*):
# (128, 128, 32, 4, 4): its plain variant spills 8 B at 255 registers on sm_90
# and its gated one 3.7 KB (128 fp32 accumulators a thread); (32, 128, 64, 4, 4):
# 4 B spilled on sm_80 in fp32 (tf32) without optional inputs; (16, 128, 128, 3, 4):
# 20 B on sm_90 in bf16 and fp16 without optional inputs.
_GPU_CONFIGS = [] if triton is None else [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in [(128, 128, 64, 3, 8), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                             (64, 64, 64, 4, 4), (16, 64, 128, 4, 4)]
]
# fp32 with IEEE dots (torch's allow_tf32 off) runs the matmuls on FMA units,
# operand fragments in registers. Compiled with Triton 3.9's ptxas, gated with
# all flags: 64x64x64 spilled 3240 B on sm_80 and 1916 B on sm_90, 64x64x32
# 688 / 8364 B, 32x64x32 12 B on sm_90, 16x64x64 496 / 24 B, and 64x64x16 16 B
# on sm_90 in the LLaMA variant (gated, no bias); 32x32x32 spilled nowhere.
_IEEE_CONFIGS = [] if triton is None else [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4)]
_AUTOTUNE_CONFIGS = _GPU_CONFIGS + _IEEE_CONFIGS
# ("all flags" in these notes: measured when the kernel also took per-row
# scales and captured rows, two optional inputs it no longer has.)
# Limits that _prune_configs applies, measured by compiling every configuration
# for sm_80 and sm_90 (tests/test_kernels_compile.py; the table is in
# bench/results/bench_kernels_compile_*): every configuration with 128 fp32
# accumulators a thread (one per output element and matmul: 2 * BLOCK_M *
# BLOCK_N / threads when gated) spilled on one target or both (bf16, all flags:
# 48 to 3752 B); every one with at most 64 did not.
_MAX_ACC_PER_THREAD = 64
# Shared memory: Triton stages the x and weight tiles in up to num_stages
# buffers on sm_90 and num_stages - 1 on sm_80 (measured: bf16 64x64x64, 4
# stages, gated: 98304 B on sm_90, 73728 B on sm_80), against 227 KiB and
# 163 KiB a block.
_STAGED_LIMITS = ((0, 227 * 1024), (-1, 163 * 1024))  # (buffers - num_stages, bytes)


def _fits(cfg, gated: bool, elem_bytes: int) -> bool:
    kw = cfg.kwargs
    n_mm = 2 if gated else 1
    tile = (kw["BLOCK_M"] * kw["BLOCK_K"] + n_mm * kw["BLOCK_K"] * kw["BLOCK_N"]) * elem_bytes
    return (n_mm * kw["BLOCK_M"] * kw["BLOCK_N"] <= _MAX_ACC_PER_THREAD * 32 * cfg.num_warps
            and all((cfg.num_stages + d) * tile <= limit for d, limit in _STAGED_LIMITS))


def _prune_configs(configs, elem_bytes: int, flags: dict):
    """The configurations autotuning tries for a launch with these constexprs
    and inputs of ``elem_bytes``: the IEEE list for IEEE dots, else the others,
    within the register and shared-memory limits above (the one place they are
    applied: the autotuner and the ahead-of-time compile test both call this)."""
    out = [c for c in configs if any(c is i for i in _IEEE_CONFIGS) == bool(flags["IEEE"])
           and _fits(c, bool(flags["GATED"]), elem_bytes)]
    if not out:
        raise ValueError(f"no mlp_capture configuration fits {elem_bytes}-byte inputs with {flags}")
    return out


# The interpreter runs each program in numpy: 32x64x32 tiles ran a 51x40x123
# call in 0.09 s against 0.35 s for 16x32x16, and still leave several partial
# tiles on odd test shapes.
_INTERP_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}



if INTERPRETED or not AVAILABLE:
    _kernel = _mlp_capture_kernel
else:  # GATED and IEEE in the key: each has its own pruned list (tensor dtypes are in every key)
    _kernel = triton.autotune(configs=_AUTOTUNE_CONFIGS, key=["M_KEY", "N", "K", "GATED", "IEEE"],
                              prune_configs_by={"early_config_prune": lambda configs, nargs, **kw:
                                                _prune_configs(configs, nargs["x_ptr"].element_size(), kw)})(_mlp_capture_kernel)


def _launcher(kernel):
    if INTERPRETED:
        return kernel
    return torch.library.wrap_triton(kernel) if hasattr(torch.library, "wrap_triton") else kernel


def _ieee(dtype) -> bool:
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _launch(x, w, b, w_up, b_up, neuron_scale, neuron_rows,
            act: str, store_pre: bool, store_up: bool):
    """What :func:`_forward` launches: (outputs (act, pre, up), kernel arguments, constexprs).

    The one place the kernel's arguments and flags are derived from a call;
    ``kernels/aot.py`` calls it on meta tensors to compile what dispatch would.
    """
    M, K = x.shape
    N = w.shape[1]
    gated = w_up is not None
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    pre = torch.empty_like(out) if store_pre else x.new_empty(0)  # (outputs may not alias)
    up = torch.empty_like(out) if (store_up and gated) else x.new_empty(0)
    nr = None if neuron_rows is None else neuron_rows.to(torch.int8)
    args = (x, w, b, w_up if gated else w, b_up, neuron_scale, nr,
            out, pre, up,
            M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            (w_up if gated else w).stride(0), (w_up if gated else w).stride(1),
            min(triton.next_power_of_2(max(M, 1)), 4096))
    flags = dict(
        ACT=_ACT_CODE[act], GATED=gated, HAS_B=b is not None, HAS_BU=b_up is not None,
        HAS_NS=neuron_scale is not None, HAS_NR=nr is not None,
        STORE_PRE=store_pre, STORE_UP=store_up and gated,
        EMU_BF16=INTERPRETED and x.dtype == torch.bfloat16, IEEE=_ieee(x.dtype) or INTERPRETED)
    return (out, pre, up), args, flags


def _forward(x, w, b, w_up, b_up, neuron_scale, neuron_rows,
             act: str, store_pre: bool, store_up: bool):
    """Launch the kernel. Returns (act, pre, up); unrequested ones are empty."""
    outs, args, flags = _launch(x, w, b, w_up, b_up, neuron_scale, neuron_rows,
                                act, store_pre, store_up)
    M, N = x.shape[0], w.shape[1]
    if M == 0:
        return outs
    meta = _INTERP_CONFIG if INTERPRETED else {}
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
    _launcher(_kernel)[grid](*args, **flags, **meta)
    return outs


# --------------------------------------------------------------------------- autograd

def _op_impl(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], w_up: Optional[torch.Tensor],
             b_up: Optional[torch.Tensor], neuron_scale: Optional[torch.Tensor],
             neuron_rows: Optional[torch.Tensor], act: str, store_pre: bool,
             store_up: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, w, b, w_up, b_up, neuron_scale, neuron_rows, act, store_pre, store_up)


def _setup_context(ctx, inputs, output):
    x, w, b, w_up, b_up, neuron_scale, neuron_rows, act, _, _ = inputs
    _, pre, up = output
    ctx.act = act
    ctx.save_for_backward(x, w, b, w_up, b_up, neuron_scale, neuron_rows, pre, up)


def _act_grad(name, g, z):
    """g * act'(z), as PyTorch's own autograd computes it."""
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(g, z, approximate="tanh")
    if name == "gelu":
        return torch.ops.aten.gelu_backward(g, z)
    if name == "silu":
        return torch.ops.aten.silu_backward(g, z)
    return torch.ops.aten.threshold_backward(g, z, 0)


def _backward(ctx, g_act, g_pre, g_up):
    # Gradients with respect to x only; mlp_capture refuses weights or scales
    # that require grad, so the Nones below are never a silent wrong answer.
    x, w, b, w_up, b_up, neuron_scale, neuron_rows, pre, up = ctx.saved_tensors
    M, N = x.shape[0], w.shape[1]
    g = torch.zeros((M, N), device=x.device, dtype=x.dtype) if g_act is None else g_act
    if neuron_scale is not None:
        scaled = g * neuron_scale.to(g.dtype)
        g = scaled if neuron_rows is None else torch.where(neuron_rows[:, None], scaled, g)
    if pre.numel() == 0:  # not stored: recompute
        pre = x @ w if b is None else torch.addmm(b, x, w)
    gated = w_up is not None
    if gated:
        if up.numel() == 0:
            up = x @ w_up if b_up is None else torch.addmm(b_up, x, w_up)
        gu = g * _act_ref(ctx.act, pre)
        if g_up is not None and g_up.numel():
            gu = gu + g_up
        g = g * up
    gp = _act_grad(ctx.act, g, pre)
    if g_pre is not None and g_pre.numel():
        gp = gp + g_pre
    gx = gp @ w.t()
    if gated:
        gx = gx + gu @ w_up.t()
    return (gx,) + (None,) * 9


def autograd_function():
    """The op as a ``torch.autograd.Function`` (what torch < 2.6, without triton_op, uses)."""

    class MLPCapture(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = _op_impl(*args)
            _setup_context(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return _backward(ctx, *grads)

    return MLPCapture.apply


def _register():
    if not hasattr(torch.library, "triton_op"):
        return autograd_function()
    try:
        op = torch.library.triton_op("kncore::mlp_capture", mutates_args=())(_op_impl)
    except RuntimeError:  # already registered (this file imported under a second module name)
        return torch.ops.kncore.mlp_capture
    op.register_autograd(_backward, setup_context=_setup_context)
    return op


_op = _register() if AVAILABLE else None


# --------------------------------------------------------------------------- entry

def _check(x, w, b, w_up, b_up, neuron_scale, neuron_rows, act):
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"need x [M, d] and w [d, d_ff]; got x {tuple(x.shape)}, w {tuple(w.shape)}")
    M, N = x.shape[0], w.shape[1]
    if x.dtype not in DTYPES:
        raise ValueError(f"dtype {x.dtype} not supported by the kernel; supported: {DTYPES}")
    shapes = {"b": (b, (N,)), "w_up": (w_up, tuple(w.shape)), "b_up": (b_up, (N,)),
              "neuron_scale": (neuron_scale, (N,)),
              "neuron_rows": (neuron_rows, (M,))}
    for nm, (t, shape) in shapes.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{nm} has shape {tuple(t.shape)}; expected {shape}")
        if t.device != x.device:
            raise ValueError(f"{nm} is on {t.device}, x on {x.device}")
    for nm, t in (("w", w), ("w_up", w_up), ("b", b), ("b_up", b_up)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{nm} has dtype {t.dtype}, x has {x.dtype}")
    if w.device != x.device:
        raise ValueError(f"w is on {w.device}, x on {x.device}")
    if b_up is not None and w_up is None:
        raise ValueError("b_up given without w_up")
    if neuron_rows is not None and (neuron_rows.dtype != torch.bool or neuron_scale is None):
        raise ValueError("neuron_rows must be a bool [M] mask and comes with neuron_scale")
    for nm, t in (("w", w), ("b", b), ("w_up", w_up), ("b_up", b_up), ("neuron_scale", neuron_scale)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{nm} requires grad; the kernel differentiates x only "
                             "(use mlp_capture_ref, or freeze it)")


def mlp_capture(x, w, b=None, *, act, w_up=None, b_up=None, neuron_scale=None,
                neuron_rows=None, return_pre=False) -> MLPCaptureOut:
    """Fused ``act(x @ w + b) [* (x @ w_up + b_up)]``, scaled per neuron (Triton).

    Same arguments and result as :func:`mlp_capture_ref`. ``w``/``w_up`` may be
    any strided [d, d_ff] view (``linear.weight.t()`` needs no copy). Matmuls
    accumulate in fp32 and the epilogue runs in fp32; outputs are in x's dtype.
    Differentiable with respect to ``x``. Use :func:`kncore.ops.mlp_capture.mlp_capture`
    to get the reference automatically where the kernel does not apply.
    """
    if not AVAILABLE:
        raise RuntimeError("the mlp_capture kernel needs triton (pip install triton); "
                           "kncore.ops.mlp_capture.mlp_capture falls back to the reference")
    _check(x, w, b, w_up, b_up, neuron_scale, neuron_rows, act)
    grad = torch.is_grad_enabled() and x.requires_grad
    a, pre, _ = _op(x, w, b, w_up, b_up, neuron_scale, neuron_rows, act, return_pre or grad, grad)
    return MLPCaptureOut(a, pre if return_pre else None)
