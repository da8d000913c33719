"""Integrated-gradient steps expanded and reduced in batches (Triton).

IG over the neurons a [d_ff] of one layer (one *group*: a prompt at a layer)
scales them by step factors alpha_k and sums the gradients. The MLP output is
linear in a, so

    mlp_out(alpha_k a) = alpha_k (a @ W_down) + b          (W_down [d_ff, d_model])

and no step needs a scaled copy of a, nor its own down-projection:

* forward, :func:`expand_steps`: from one vector per group (y = a @ W_down,
  or the pre-activation for the pre_act site) write every step row
  ``alphas[r] * base[index[r]] + bias`` [R, width] in one pass. Its backward is
  the alpha-weighted per-group sum of the row gradients.
* backward, :func:`reduce_steps`: from the gradients of the score with respect
  to the step rows, ``IG[g] = act[g] * (W_down @ sum_{r in g} w_r grads[r])``:
  one deterministic per-group reduction (:func:`segment_sum`) and one
  projection back to the neurons, fused with the multiply by act, instead of
  one projection per step.

``index`` [R] names each row's group; the rows of a group need not be
contiguous. :func:`ig_expand` / :func:`ig_reduce` are the same for dense
[B, m, ...] layouts (B groups of m steps). With a baseline a0, pass ``a - a0``
as the neurons and ``a0 @ W_down + b`` as a per-group bias.

Plain PyTorch references: :func:`expand_steps_ref`, :func:`segment_sum_ref`,
:func:`reduce_steps_ref`, :func:`ig_expand_ref`, :func:`ig_reduce_ref`, and
:func:`ig_steps_ref`, the literal definition that does materialise the scaled
copies. :mod:`kncore.ops.ig_steps` dispatches between kernels and references.
"""
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the references still work; kncore.ops reports why the kernels do not
    triton = None

    class tl:  # the kernels' annotations need tl.constexpr to exist
        constexpr = None

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- references

def _per_prompt(t, B):
    """[m] or [B, m] -> [B, m] (a broadcast view)."""
    return t.expand(B, -1) if t.dim() == 1 else t


def _dense_index(B, m, device):
    return torch.arange(B, device=device).repeat_interleave(m)


def expand_steps_ref(base, index, alphas, bias=None):
    """Step rows ``alphas[r] * base[index[r]] + bias`` [R, width] in base's dtype.

    base [G, width]; index [R]; alphas [R]; bias [width] or per group [G, width].
    """
    z = base.index_select(0, index) * alphas[:, None].to(base.dtype)
    if bias is None:
        return z
    return z + (bias if bias.dim() == 1 else bias.index_select(0, index)).to(base.dtype)


def segment_sum_ref(rows, index, n_groups, weights=None):
    """``out[g] = sum_{r: index[r] = g} weights[r] * rows[r]``: [G, width] fp32."""
    v = rows.float() if weights is None else rows.float() * weights.float()[:, None]
    return torch.zeros(n_groups, rows.shape[1], dtype=torch.float32, device=rows.device).index_add_(0, index, v)


def reduce_steps_ref(grads, index, n_groups, act, w_down=None, weights=None):
    """IG per group ``act[g] * (W_down @ segment_sum(grads)[g])`` (no w_down: ``act * sum``), fp32 [G, d_ff].

    grads [R, width]: gradients with respect to the step rows (already
    weighted, or weighted by ``weights`` [R]); act [G, d_ff]; w_down [d_ff, width].
    """
    g = segment_sum_ref(grads, index, n_groups, weights)
    if w_down is not None:
        g = g @ w_down.float().t()
    return act.float() * g


def ig_expand_ref(y, bias, alphas):
    """Dense :func:`expand_steps`: ``out[b, k] = alphas[(b,) k] * y[b] + bias[(b)]`` [B, m, D] in y's dtype."""
    out = _per_prompt(alphas, y.shape[0]).to(y.dtype)[:, :, None] * y[:, None, :]
    if bias is not None:
        out = out + (bias[None, None, :] if bias.dim() == 1 else bias[:, None, :]).to(y.dtype)
    return out


def ig_reduce_ref(a, w_down, g, weights=None):
    """Dense :func:`reduce_steps`, as a plain run computes it in a's dtype: ``a * ((sum_k w_k g[:, k]) @ w_down.T)``.

    a [B, d_ff]; w_down [d_ff, D]; g [B, m, D]; weights [m] or [B, m] (None: 1/m).
    Returns fp32 [B, d_ff].
    """
    B, m, _ = g.shape
    if weights is None:
        weights = torch.full((m,), 1.0 / m, device=g.device)
    gs = (_per_prompt(weights, B).to(g.dtype)[:, :, None] * g).sum(1)
    return (a * (gs @ w_down.t())).float()


def ig_steps_ref(a, w_down, bias, alphas, g=None, weights=None):
    """The literal IG steps: m scaled copies of a, each down-projected.

    Returns (outputs [B, m, D], IG [B, d_ff] or None). IG is the weighted sum
    over steps of a * d(score)/d(alpha_k a), where ``g`` [B, m, D] is
    d(score)/d(output_k). Slow on purpose: the kernels are tested against it.
    """
    B, m = a.shape[0], _per_prompt(alphas, a.shape[0]).shape[1]
    steps = (_per_prompt(alphas, B).to(a.dtype)[:, :, None] * a[:, None, :]).detach().requires_grad_(True)
    with torch.enable_grad():
        out = steps @ w_down
        if bias is not None:
            out = out + (bias[None, None, :] if bias.dim() == 1 else bias[:, None, :])
        ig = None
        if g is not None:
            (d_steps,) = torch.autograd.grad(out, steps, g.to(out.dtype))
            if weights is None:
                weights = torch.full((m,), 1.0 / m, device=a.device)
            ig = (a[:, None, :] * d_steps * _per_prompt(weights, B).to(a.dtype)[:, :, None]).sum(1).float()
    return out.detach(), ig


# --------------------------------------------------------------------------- kernels

def _jit(fn):
    return fn if triton is None else triton.jit(fn)


@_jit
def _to_out(v, dtype: tl.constexpr, EMU_BF16: tl.constexpr):
    # fp32 -> output dtype; see kernels/mlp_capture.py: Triton's interpreter
    # truncates fp32 -> bf16, so there bf16 is rounded to nearest even by hand.
    if EMU_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(dtype)
    return out


@_jit
def _expand_kernel(base_ptr, idx_ptr, al_ptr, b_ptr, out_ptr, D, s_gr, s_gd, s_bg, s_bd,
                   HAS_B: tl.constexpr, EMU_BF16: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (row, D block); the group's vector comes from L2 after its first row.
    r = tl.program_id(0)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = rd < D
    gi = tl.load(idx_ptr + r).to(tl.int64)
    v = tl.load(al_ptr + r).to(tl.float32) * tl.load(base_ptr + gi * s_gr + rd * s_gd, mask=ok, other=0.0).to(tl.float32)
    if HAS_B:
        v += tl.load(b_ptr + gi * s_bg + rd * s_bd, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + r.to(tl.int64) * D + rd, _to_out(v, out_ptr.dtype.element_ty, EMU_BF16), mask=ok)


@_jit
def _segment_sum_kernel(rows_ptr, perm_ptr, off_ptr, w_ptr, out_ptr, D, s_r, s_d,
                        HAS_W: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[g] = sum of the group's rows in fp32, in a fixed order (deterministic,
    # unlike index_add_'s atomics on a GPU); every row is read exactly once.
    gi = tl.program_id(0)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = rd < D
    start = tl.load(off_ptr + gi)
    end = tl.load(off_ptr + gi + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(start, end):
        r = tl.load(perm_ptr + i)
        v = tl.load(rows_ptr + r * s_r + rd * s_d, mask=ok, other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + r).to(tl.float32)
        acc += v
    tl.store(out_ptr + gi.to(tl.int64) * D + rd, acc, mask=ok)


@_jit
def _project_kernel(gs_ptr, w_ptr, a_ptr, out_ptr, G, F, D, s_wf, s_wd, s_ag, s_af,
                    IEEE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[g, f] = a[g, f] * sum_d gs[g, d] * W[f, d]: a skinny matmul (G rows)
    # that streams W once per row block, with the multiply by a in its epilogue.
    # gs stays fp32 and W is upcast (exact), so a bf16 model loses no more than
    # tf32's rounding of gs; fp32 models get an IEEE dot unless torch allows tf32.
    rg = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    rf = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    rd = tl.arange(0, BLOCK_D)
    g_ok = rg < G
    f_ok = rf < F
    acc = tl.zeros((BLOCK_G, BLOCK_F), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = rd < D - d0
        gt = tl.load(gs_ptr + rg[:, None] * D + (d0 + rd)[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + rf[None, :].to(tl.int64) * s_wf + (d0 + rd)[:, None] * s_wd,
                     mask=d_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
        if IEEE:
            acc = tl.dot(gt, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(gt, wt, acc, input_precision="tf32")
    at = tl.load(a_ptr + rg[:, None] * s_ag + rf[None, :] * s_af, mask=g_ok[:, None] & f_ok[None, :], other=0.0)
    tl.store(out_ptr + rg[:, None] * F + rf[None, :], acc * at.to(tl.float32), mask=g_ok[:, None] & f_ok[None, :])


AVAILABLE = triton is not None
INTERPRETED = AVAILABLE and not isinstance(_expand_kernel, triton.runtime.JITFunction)

# Bandwidth-bound streaming kernels. Block sizes are unmeasured guesses until
# bench/bench_kernels.py runs on a GPU (none in the development session).
_BLOCK_D = 64 if INTERPRETED else 256
_PROJECT_CONFIGS = [] if triton is None else [
    triton.Config({"BLOCK_G": bg, "BLOCK_F": bf, "BLOCK_D": bd}, num_stages=s, num_warps=w)
    for bg, bf, bd, s, w in [(16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (32, 128, 32, 4, 4),
                             (64, 128, 32, 3, 8), (16, 256, 32, 3, 8)]
]
if INTERPRETED or not AVAILABLE:
    _project = _project_kernel
    _PROJECT_META = {"BLOCK_G": 16, "BLOCK_F": 64, "BLOCK_D": 32}  # few numpy programs on test shapes
else:
    _project = triton.autotune(configs=_PROJECT_CONFIGS, key=["G", "F", "D"])(_project_kernel)
    _PROJECT_META = {}


def _launcher(kernel):
    if INTERPRETED:
        return kernel
    return torch.library.wrap_triton(kernel) if hasattr(torch.library, "wrap_triton") else kernel


# The _*_launch functions are the one place each kernel's arguments and flags
# are derived from a call: the impls launch what they return, and
# kernels/aot.py calls them on meta tensors to compile what dispatch would.

def _expand_launch(base, index, alphas, bias):
    """(out, grid, kernel arguments, constexprs) of :func:`_expand_impl`."""
    R, D = index.shape[0], base.shape[1]
    out = torch.empty((R, D), device=base.device, dtype=base.dtype)
    bs = (0, 0) if bias is None else ((0, bias.stride(0)) if bias.dim() == 1 else bias.stride())
    args = (base, index, alphas, bias, out, D, base.stride(0), base.stride(1), bs[0], bs[1])
    flags = dict(HAS_B=bias is not None, EMU_BF16=INTERPRETED and base.dtype == torch.bfloat16, BLOCK_D=_BLOCK_D)
    return out, (R, triton.cdiv(D, _BLOCK_D)), args, flags


def _expand_impl(base: torch.Tensor, index: torch.Tensor, alphas: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
    out, grid, args, flags = _expand_launch(base, index, alphas, bias)
    if out.numel() == 0:
        return out
    _launcher(_expand_kernel)[grid](*args, **flags)
    return out


def _segment_sum_launch(rows, index, n_groups, weights):
    """(out, grid, kernel arguments, constexprs) of :func:`_segment_sum_impl`."""
    D = rows.shape[1]
    out = torch.zeros((n_groups, D), device=rows.device, dtype=torch.float32)
    # The rows of each group, in row order: a CSR built on the device, no host sync.
    perm = torch.argsort(index, stable=True)
    counts = torch.zeros(n_groups + 1, device=rows.device, dtype=torch.long)
    counts.index_add_(0, index + 1, torch.ones_like(index))
    offsets = counts.cumsum(0)
    args = (rows, perm, offsets, weights, out, D, rows.stride(0), rows.stride(1))
    flags = dict(HAS_W=weights is not None, BLOCK_D=_BLOCK_D)
    return out, (n_groups, triton.cdiv(D, _BLOCK_D)), args, flags


def _segment_sum_impl(rows: torch.Tensor, index: torch.Tensor, n_groups: int,
                      weights: Optional[torch.Tensor]) -> torch.Tensor:
    if n_groups * rows.shape[1] == 0 or rows.shape[0] == 0:
        return torch.zeros((n_groups, rows.shape[1]), device=rows.device, dtype=torch.float32)
    out, grid, args, flags = _segment_sum_launch(rows, index, n_groups, weights)
    _launcher(_segment_sum_kernel)[grid](*args, **flags)
    return out


def _project_launch(gs, w_down, act):
    """(out, grid, kernel arguments, constexprs) of :func:`_project_impl`."""
    G, D = gs.shape
    F = w_down.shape[0]
    out = torch.empty((G, F), device=act.device, dtype=torch.float32)
    grid = lambda META: (triton.cdiv(G, META["BLOCK_G"]), triton.cdiv(F, META["BLOCK_F"]))
    ieee = INTERPRETED or (w_down.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    args = (gs, w_down, act, out, G, F, D, w_down.stride(0), w_down.stride(1), act.stride(0), act.stride(1))
    return out, grid, args, dict(IEEE=ieee, **_PROJECT_META)


def _project_impl(gs: torch.Tensor, w_down: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    out, grid, args, flags = _project_launch(gs, w_down, act)
    if out.numel() == 0:
        return out
    _launcher(_project)[grid](*args, **flags)
    return out


# --------------------------------------------------------------------------- autograd

def autograd_function(impl, setup, backward):
    """``impl`` as a ``torch.autograd.Function`` (what torch < 2.6, without triton_op, uses)."""

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = impl(*args)
            setup(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    return Op.apply


def _register(name, impl, setup=None, backward=None):
    if not hasattr(torch.library, "triton_op"):
        return impl if backward is None else autograd_function(impl, setup, backward)
    try:
        op = torch.library.triton_op(f"kncore::{name}", mutates_args=())(impl)
    except RuntimeError:  # already registered (this file imported under a second module name)
        return getattr(torch.ops.kncore, name)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup)
    return op


def _expand_setup(ctx, inputs, output):
    base, index, alphas, bias = inputs
    ctx.n_groups, ctx.base_dtype = base.shape[0], base.dtype
    ctx.bias_dim = None if bias is None else bias.dim()
    ctx.save_for_backward(base, index, alphas)


def _expand_backward(ctx, g):
    base, index, alphas = ctx.saved_tensors
    g_base = _segment_sum_op(g, index, ctx.n_groups, alphas).to(ctx.base_dtype)
    g_bias = None
    if ctx.bias_dim == 1:
        g_bias = g.sum(0)
    elif ctx.bias_dim == 2:
        g_bias = _segment_sum_op(g, index, ctx.n_groups, None).to(g.dtype)
    g_alphas = (g.float() * base.index_select(0, index).float()).sum(-1).to(alphas.dtype)
    return g_base, None, g_alphas, g_bias


if AVAILABLE:
    _segment_sum_op = _register("ig_segment_sum", _segment_sum_impl)
    _expand_op = _register("ig_expand_steps", _expand_impl, _expand_setup, _expand_backward)
    _project_op = _register("ig_project", _project_impl)


def _need_triton():
    if not AVAILABLE:
        raise RuntimeError("the ig_steps kernels need triton (pip install triton); "
                           "kncore.ops.ig_steps falls back to the references")


# --------------------------------------------------------------------------- entries

def _check_index(index, R, device):
    if index.dim() != 1 or (R is not None and index.shape[0] != R) or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be a 1-D integer tensor with one entry per row"
                         f"{'' if R is None else f' ({R})'}; got {tuple(index.shape)} {index.dtype}")
    if index.device != device:
        raise ValueError(f"index is on {index.device}, expected {device}")


def expand_steps(base, index, alphas, bias=None):
    """Step rows ``alphas[r] * base[index[r]] + bias``: [R, width] in base's dtype (Triton).

    base [G, width] (fp32/fp16/bf16, any strides): ``a @ W_down`` per group for
    the act site, the pre-activation for pre_act; index [R] each row's group;
    alphas [R]; bias [width], per group [G, width], or None. Computed in fp32
    with one rounding. Differentiable in base, alphas and bias (the backward of
    base is the alpha-weighted :func:`segment_sum`). Out-of-range indices are
    not checked on the GPU (as ``index_select`` does not).
    """
    _need_triton()
    if base.dim() != 2 or base.dtype not in DTYPES:
        raise ValueError(f"base must be [G, width] in {DTYPES}; got {tuple(base.shape)} {base.dtype}")
    _check_index(index, None, base.device)
    if alphas.shape != index.shape or alphas.device != base.device:
        raise ValueError(f"alphas must be [R={index.shape[0]}] on {base.device}; got {tuple(alphas.shape)}")
    if bias is not None:
        if tuple(bias.shape) not in ((base.shape[1],), tuple(base.shape)) or bias.device != base.device:
            raise ValueError(f"bias must be [width] or [G, width] = {tuple(base.shape)} on {base.device}; "
                             f"got {tuple(bias.shape)}")
    return _expand_op(base, index.long(), alphas, bias)


def segment_sum(rows, index, n_groups, weights=None):
    """``out[g] = sum_{r: index[r] = g} weights[r] * rows[r]``: [n_groups, width] fp32 (Triton).

    rows [R, width] any strides; index [R] in [0, n_groups); weights [R] or None.
    Deterministic: each group's rows are summed in row order.
    """
    _need_triton()
    if rows.dim() != 2:
        raise ValueError(f"rows must be [R, width]; got {tuple(rows.shape)}")
    _check_index(index, rows.shape[0], rows.device)
    if weights is not None and (weights.shape != index.shape or weights.device != rows.device):
        raise ValueError(f"weights must be [R={rows.shape[0]}] on {rows.device}; got {tuple(weights.shape)}")
    return _segment_sum_op(rows, index.long(), int(n_groups), weights)


def reduce_steps(grads, index, n_groups, act, w_down=None, weights=None):
    """IG per group from the step-row gradients: fp32 [G, d_ff] (Triton).

    ``act[g] * (W_down @ sum_{r in g} w_r grads[r])`` with w_down [d_ff, width]
    (gradients with respect to the MLP output, the act site), or
    ``act[g] * sum_{r in g} w_r grads[r]`` without (pre_act site). grads [R,
    width]; index [R]; act [G, d_ff]; weights [R] (None: the gradients are
    already weighted). Same signature and numbers as
    :func:`kncore.attribution.reduce_steps`.
    """
    _need_triton()
    if act.dim() != 2 or act.shape[0] != n_groups:
        raise ValueError(f"act must be [n_groups={n_groups}, d_ff]; got {tuple(act.shape)}")
    gs = segment_sum(grads, index, n_groups, weights)
    if w_down is None:
        if act.shape[1] != gs.shape[1]:
            raise ValueError(f"without w_down act and grads need the same width; got {act.shape[1]}, {gs.shape[1]}")
        return act.float() * gs
    if w_down.dim() != 2 or w_down.shape != (act.shape[1], gs.shape[1]) or w_down.dtype not in DTYPES:
        raise ValueError(f"w_down must be [d_ff={act.shape[1]}, width={gs.shape[1]}] in {DTYPES}; "
                         f"got {tuple(w_down.shape)} {w_down.dtype}")
    return _project_op(gs, w_down, act)


def ig_expand(y, bias, alphas):
    """Dense :func:`expand_steps`: ``alphas[(b,) k] * y[b] + bias[(b)]`` as [B, m, D].

    y [B, D] = a @ W_down; bias [D], [B, D] or None; alphas [m] or [B, m].
    """
    if y.dim() != 2:
        raise ValueError(f"y must be [B, D]; got {tuple(y.shape)}")
    B = y.shape[0]
    if alphas.dim() not in (1, 2) or (alphas.dim() == 2 and alphas.shape[0] != B):
        raise ValueError(f"alphas must be [m] or [B={B}, m]; got {tuple(alphas.shape)}")
    al = _per_prompt(alphas, B)
    m = al.shape[1]
    return expand_steps(y, _dense_index(B, m, y.device), al.reshape(-1), bias).view(B, m, -1)


def ig_reduce(a, w_down, g, weights=None):
    """Dense :func:`reduce_steps`: IG [B, d_ff] fp32 = ``a * ((sum_k w_k g[:, k]) @ w_down.T)``.

    g [B, m, D] (copied if its rows are not evenly strided, e.g. a step-major
    tensor transposed); weights [m] or [B, m]; None: 1/m (the Riemann sum).
    """
    if g.dim() != 3 or g.shape[0] != a.shape[0]:
        raise ValueError(f"g must be [B={a.shape[0]}, m, D]; got {tuple(g.shape)}")
    B, m, D = g.shape
    if weights is None:
        weights = torch.full((m,), 1.0 / m, device=g.device)
    if weights.dim() not in (1, 2) or weights.shape[-1] != m or (weights.dim() == 2 and weights.shape[0] != B):
        raise ValueError(f"weights must be [m={m}] or [B={B}, m]; got {tuple(weights.shape)}")
    w = _per_prompt(weights, B).reshape(-1)
    return reduce_steps(g.reshape(B * m, D), _dense_index(B, m, g.device), B, a, w_down, w)
