"""Integrated-gradients attribution of MLP neurons (knowledge neurons, Dai et al. 2022).

For a prompt, a target token and a layer L, neuron j's score is

    IG_j = a_j * integral_0^1 dP(target | a scaled by alpha) / dx_j  at x = alpha * a  d alpha

where ``a`` is the layer's neuron activations at the target position (the
[MASK] for BERT, the last prompt token for decoders), the baseline is zero and
P is the softmax probability of the target at that position. The integral is a
quadrature rule (``scheme``) with ``steps`` points.

:func:`attribute` computes exactly this (the same numbers, in fp32, as
:func:`attribute_ref`, which recomputes the whole prompt for every step as the
reference code does), but

* runs each prompt once and reuses its keys/values: for decoders every step is
  a one-token pass from layer L up;
* for ``site="act"`` uses the linearity of the down-projection: the step rows
  enter the residual stream after layer L as ``(resid_pre + attn_out) +
  alpha * (a @ W_down) + b``, and the IG of all m steps is one mat-vec
  ``a * (W_down @ sum_k w_k g_k)``;
* lets the step rows of every start layer travel together through the layers
  above (a matmul with 240 rows runs at twice the per-row rate of one with 20
  on the 2-core CPU, measured);
* asks autograd only for gradients with respect to the step rows (parameters
  frozen) and computes the head only at the target position.

The pieces that a kernel can replace are :func:`expand_steps` (build the step
rows) and :func:`reduce_steps` (weighted per-group sum and the mat-vec).
"""
from __future__ import annotations

import functools
import logging
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from . import runtime
from . import validation as V
from .lm import LM, InputError
from .models.base import BLOCK_PARALLEL, BLOCK_SANDWICH, BLOCK_SEQUENTIAL
from .runtime import KVCache, Patch

log = logging.getLogger("kncore")

SCHEMES = ("riemann-left", "linspace", "midpoint", "trapezoid", "gauss")
SITES = ("act", "pre_act")
MULTI_TOKEN = ("teacher", "greedy", "forbid")


# ---------------------------------------------------------------------------
# quadrature
# ---------------------------------------------------------------------------
def scheme_points(scheme: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points alpha in [0, 1] and weights (float64) of a quadrature scheme.

    ``riemann-left``: alpha = k/m, k = 0..m-1, weights 1/m (Dai et al.);
    ``linspace``: alpha = linspace(0, 1, m), weights 1/m (the knowledge-neurons
    package: it sums m gradients and divides by m, so it is not a proper
    quadrature rule: its bias does not vanish like riemann-left's);
    ``midpoint``: alpha = (k + 1/2)/m, weights 1/m;
    ``trapezoid``: alpha = linspace(0, 1, m), end weights halved (m >= 2);
    ``gauss``: Gauss-Legendre nodes and weights mapped to [0, 1].
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    m = steps
    k = torch.arange(m, dtype=torch.float64)
    if scheme == "riemann-left":
        return k / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if scheme == "linspace":
        return torch.linspace(0, 1, m, dtype=torch.float64), torch.full((m,), 1.0 / m, dtype=torch.float64)
    if scheme == "midpoint":
        return (k + 0.5) / m, torch.full((m,), 1.0 / m, dtype=torch.float64)
    if scheme == "trapezoid":
        if m < 2:
            raise ValueError("the trapezoid scheme needs steps >= 2")
        w = torch.full((m,), 1.0 / (m - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (m - 1)
        return torch.linspace(0, 1, m, dtype=torch.float64), w
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(m)
    return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)


def _has_zero(scheme: str) -> bool:
    """Whether the scheme evaluates alpha = 0 (then F(0) comes for free)."""
    return scheme in ("riemann-left", "linspace", "trapezoid")


def rows_per_group(scheme: str, steps: int) -> int:
    """Step rows of one (item, layer) group: the steps, plus an alpha = 0 row
    for F(0) when the scheme has none."""
    return steps + (0 if _has_zero(scheme) else 1)


# ---------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------
@dataclass
class Attribution:
    """Integrated-gradients scores of every neuron of some layers, per prompt.

    ``scores`` [n_prompts, n_layers, d_ff] float32: ``scores[i, j]`` belongs to
    layer ``layers[j]``. For a multi-token target it is the mean over the target
    tokens of each token's attribution.
    ``base_probs`` [n_prompts]: probability of the whole target (the product of
    the per-token probabilities in ``token_probs``) in the unmodified model.
    ``prompt_ids`` / ``target_ids``: the tokens used. ``contexts[i][t]`` is the
    token sequence whose target position predicts ``target_ids[i][t]``.
    ``completeness_gap`` [n_prompts, n_layers]: |sum_j IG_j - (F(a) - F(0))| /
    |F(a) - F(0)|, F the target probability with the layer's activations at the
    target position scaled; for several target tokens the largest over tokens.
    ``prob_delta`` [n_prompts, n_layers]: F(a) - F(0) (mean over target tokens).
    ``steps_used`` [n_prompts, n_layers]: steps after any ``gap_tol`` refinement
    (largest over target tokens).
    """

    scores: torch.Tensor
    layers: list
    site: str
    scheme: str
    steps: int
    multi_token: str
    prompts: list
    targets: list
    prompt_ids: list
    target_ids: list
    contexts: list
    base_probs: torch.Tensor
    token_probs: list
    completeness_gap: torch.Tensor
    prob_delta: torch.Tensor
    steps_used: torch.Tensor
    model: str = ""
    meta: dict = field(default_factory=dict)

    def __repr__(self):
        return (f"Attribution({len(self.prompts)} prompts x {len(self.layers)} layers x {self.scores.shape[-1]} "
                f"neurons, site={self.site}, scheme={self.scheme}, steps={self.steps}, "
                f"median completeness gap={float(self.completeness_gap.median()):.3g})")

    def layer_index(self, layer: int) -> int:
        """Position of a model layer in ``layers`` (and in the scores' axis 1)."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise KeyError(f"layer {layer} was not attributed; layers: {self.layers}") from None


# ---------------------------------------------------------------------------
# items: (context tokens, target position, target token)
# ---------------------------------------------------------------------------
@dataclass
class Item:
    prompt: int          # index of the prompt it belongs to
    ids: list            # context tokens
    pos: int             # target position
    target: int          # target token id


def _check_prompts(prompts, targets):
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InputError("no prompts given")
    if isinstance(targets, str):
        targets = [targets] * len(prompts)
    targets = list(targets)
    if len(targets) != len(prompts):
        raise InputError(f"{len(prompts)} prompts but {len(targets)} targets: give one target per prompt "
                         "(or a single string for all)")
    for i, (p, t) in enumerate(zip(prompts, targets)):
        if not isinstance(p, str):
            raise InputError(f"prompt {i} must be a string, got {type(p).__name__}")
        if not isinstance(t, str):
            raise InputError(f"target {i} must be a string, got {type(t).__name__}")
    return prompts, targets


def check_layers(lm: LM, layers) -> list:
    """``layers`` (None: all, an int, or a sequence) as a list of distinct layers checked against the model."""
    N = lm.n_layers
    if layers is None:
        return list(range(N))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for L in layers:
        if isinstance(L, bool) or not isinstance(L, int) and not (torch.is_tensor(L) and L.dim() == 0):
            raise ValueError(f"layers must be integers, got {L!r}")
        L = int(L)
        if not 0 <= L < N:
            raise ValueError(f"layer {L} out of range: the model has layers 0..{N - 1}")
        if L in out:
            raise ValueError(f"layer {L} given twice")
        out.append(L)
    if not out:
        raise ValueError("layers is empty")
    return out


def check_options(lm: LM, scheme, site, steps, multi_token, gap_tol, max_steps):
    scheme_points(scheme, steps)  # validates scheme and steps
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {SITES}")
    if multi_token not in MULTI_TOKEN:
        raise ValueError(f"unknown multi_token {multi_token!r}; expected one of {MULTI_TOKEN}")
    if gap_tol is not None and not (isinstance(gap_tol, (int, float)) and gap_tol > 0):
        raise ValueError(f"gap_tol must be a positive number or None, got {gap_tol!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < steps):
        raise ValueError(f"max_steps must be an integer >= steps ({steps}), got {max_steps!r}")


@torch.no_grad()
def _greedy(lm: LM, seqs: list, n_new: list) -> list:
    """Append n_new[i] greedy tokens to each sequence (the unmodified model)."""
    seqs = [list(s) for s in seqs]
    for step in range(max(n_new, default=0)):
        todo = [i for i, k in enumerate(n_new) if k > step]
        b = lm.batch_ids([seqs[i] for i in todo])
        logits = lm.run(b.input_ids, attention_mask=b.attention_mask, logits="last").logits
        for i, t in zip(todo, logits.argmax(-1).tolist()):
            seqs[i].append(int(t))
    return seqs


def build_items(lm: LM, prompts, targets, multi_token: str = "teacher"):
    """Tokenise prompts and targets into attribution items.

    Returns (items, prompt_ids, target_ids, contexts). A multi-token target of a
    decoder gives one item per target token: with ``"teacher"`` the context of
    token t is the prompt followed by the gold tokens before t; with
    ``"greedy"`` (the knowledge-neurons package's way) the prompt followed by
    the model's own greedy tokens. ``"forbid"`` makes a multi-token target an
    error. Masked LMs need single-token targets.
    """
    prompts, targets = _check_prompts(prompts, targets)
    if multi_token not in MULTI_TOKEN:
        raise ValueError(f"unknown multi_token {multi_token!r}; expected one of {MULTI_TOKEN}")
    n_ctx = lm.adapter.n_ctx
    prompt_ids, target_ids = [], []
    for i, (p, t) in enumerate(zip(prompts, targets)):
        try:
            ids = lm.tokenize(p)
            tids = lm.target_ids(p, t)
        except InputError as e:
            raise InputError(f"prompt {i} ({p[:60]!r}): {e}") from None
        if len(tids) > 1 and (multi_token == "forbid" or lm.is_mlm):
            toks = [lm.tokenizer.decode([x]) for x in tids]
            why = "a masked LM predicts one token at [MASK]" if lm.is_mlm else "multi_token='forbid'"
            raise InputError(f"prompt {i}: target {t!r} must be one token ({why}) but is {len(tids)}: {toks}")
        if len(ids) + len(tids) - 1 > n_ctx:
            raise InputError(f"prompt {i}: prompt ({len(ids)} tokens) and target ({len(tids)}) exceed the "
                             f"model's context of {n_ctx}")
        prompt_ids.append(ids)
        target_ids.append(tids)
    if multi_token == "greedy":
        full = _greedy(lm, prompt_ids, [len(t) - 1 for t in target_ids])
    else:
        full = [ids + tids[:-1] for ids, tids in zip(prompt_ids, target_ids)]
    items, contexts = [], []
    for i, (ids, tids) in enumerate(zip(prompt_ids, target_ids)):
        ctx_i = []
        for j, tok in enumerate(tids):
            ctx = full[i][: len(ids) + j]
            items.append(Item(i, ctx, lm.target_position(ctx), int(tok)))
            ctx_i.append(ctx)
        contexts.append(ctx_i)
    return items, prompt_ids, target_ids, contexts


# ---------------------------------------------------------------------------
# the two swappable pieces: step expansion and reduction
# ---------------------------------------------------------------------------
def expand_steps(base: torch.Tensor, index: torch.Tensor, alphas: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Step rows ``alphas[r] * base[index[r]] (+ bias)``: [R, width].

    ``base`` [G, width] holds one vector per group (``a @ W_down`` for the act
    site, the pre-activation for pre_act); ``index`` [R] the group of each row.
    Computed and returned in fp32 for bf16/fp16 bases (fp64 stays fp64), as the
    Triton kernel computes it: a bf16 alpha = 0.85 is 0.8516, and each bf16
    product and bias add would round again; the caller rounds once.
    """
    acc = torch.promote_types(base.dtype, torch.float32)
    z = base.index_select(0, index).to(acc) * alphas[:, None].to(acc)
    return z if bias is None else z + bias.to(acc)


def reduce_steps(grads: torch.Tensor, index: torch.Tensor, n_groups: int, act: torch.Tensor,
                 w_down: torch.Tensor | None = None) -> torch.Tensor:
    """IG per group from the (already weighted) step-row gradients.

    ``grads`` [R, width]; ``index`` [R] group of each row; ``act`` [G, d_ff]
    the activations. With ``w_down`` [d_ff, d_model] the gradients are with
    respect to the MLP output and IG = act * (W_down @ sum_k g_k); without,
    they are with respect to the activation and IG = act * sum_k g_k.
    Returns float32 [G, d_ff].
    """
    acc = torch.promote_types(grads.dtype, torch.float32)  # fp32, or fp64 for fp64 models
    g = torch.zeros(n_groups, grads.shape[1], dtype=acc, device=grads.device)
    g.index_add_(0, index, grads.to(acc))
    if w_down is not None:
        g = g @ w_down.to(acc).t()
    return (act.to(acc) * g).float()


def _step_ops(device: torch.device):
    """(expand, reduce) for tensors on ``device``: the Triton kernels of
    :mod:`kncore.ops.ig_steps` on CUDA (or with ``KNCORE_KERNELS=force``, which
    sends CPU tensors through Triton's interpreter), else the functions above."""
    from .ops.dispatch import wants_kernels

    if wants_kernels(device) and device.type != "meta":
        try:
            from .ops import ig_steps
        except ImportError as e:  # a source tree without the kernels: say so once
            if not getattr(_step_ops, "warned", False):
                log.warning("kncore.ops.ig_steps unavailable (%s); IG steps use PyTorch", e)
                _step_ops.warned = True
        else:
            return ig_steps.expand_steps, ig_steps.reduce_steps
    return expand_steps, reduce_steps


# ---------------------------------------------------------------------------
# the fast engine
# ---------------------------------------------------------------------------
@dataclass
class _Base:
    """What one unmodified pass over a chunk of items leaves behind."""
    items: list
    layers: list
    ids: torch.Tensor          # [B, T]
    mask: torch.Tensor         # [B, T] bool
    pos: torch.Tensor          # [B] target positions
    tgt: torch.Tensor          # [B] target ids
    probs: torch.Tensor        # [B] F(1), float32
    act: dict                  # L -> [B, d_ff] site values at the target position
    entry: dict                # L -> hidden the step rows start from
    prefix: KVCache | None     # decoders: keys/values of every position before the target
    inject: bool               # pre-LN decoder: rows enter the residual stream after layer L
    aux: dict                  # L -> [B, d_ff] what the activation needs besides pre_act (LLaMA's up-projection)


def _with_grad(fn):
    """Run fn with autograd on, also when called under no_grad or inference_mode."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)
    return wrapper


@contextmanager
def _frozen(model):
    """Parameters without requires_grad for the duration (restored after)."""
    was = [p for p in model.parameters() if p.requires_grad]
    for p in was:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in was:
            p.requires_grad_(True)


def _nonfinite(bad: torch.Tensor) -> torch.Tensor:
    """``bad.nonzero()``: where a check failed. On the meta device (kncore.planner
    runs the engine there) values are unknown and nothing is reported."""
    return torch.empty(0, bad.dim(), dtype=torch.long) if bad.is_meta else bad.nonzero()


def _name(items, prompts, gi):
    p = items[gi].prompt
    return f"prompt {p}" + (f" ({prompts[p][:50]!r})" if prompts else "")


def base_captures(ad, layers: list, site: str) -> tuple[list, bool]:
    """(the sites the base pass captures, whether step rows are injected)."""
    inject = ad.causal and ad.block_style in (BLOCK_SEQUENTIAL, BLOCK_PARALLEL, BLOCK_SANDWICH)
    caps = [(site, L) for L in layers] + [("resid_pre", L) for L in layers]
    if inject:
        caps += [("attn_out", L) for L in layers]
    return caps, inject


@torch.no_grad()
def _base_pass(lm: LM, items: list, layers: list, site: str, prompts=None) -> _Base:
    ad = lm.adapter
    b = lm.batch_ids([it.ids for it in items])
    dev = b.input_ids.device
    pos = torch.tensor([it.pos for it in items], device=dev)
    tgt = torch.tensor([it.target for it in items], device=dev)
    # Pre-LN decoders: a step row's layer L differs from the base pass only in
    # its MLP output, so it enters the residual stream after layer L as
    # (resid_pre + attn_out) + mlp_out(alpha): layer L's attention and (for
    # act) its whole MLP are not recomputed.
    caps, inject = base_captures(ad, layers, site)
    run = functools.partial(_run_wide, lm) if _wide_ends(lm) else lm.run
    out = run(b.input_ids, attention_mask=b.attention_mask, capture=caps,
              capture_positions=pos if ad.causal else None, return_kv=ad.causal, logits=pos)
    rows = torch.arange(len(items), device=dev)
    act, entry, aux = {}, {}, {}
    for L in layers:
        a = out[(site, L)]
        a = a[:, 0] if ad.causal else a[rows, pos]
        bad = _nonfinite((~torch.isfinite(a)).any(-1))
        if len(bad):
            raise ValueError(f"{_name(items, prompts, int(bad[0]))}, layer {L}: non-finite {site} activations")
        act[L] = a
        if inject:
            h = out[("resid_pre", L)][:, 0]
            a = out[("attn_out", L)][:, 0]
            # the runtime's h + a (sandwich: h + post_attn_norm(a))
            entry[L] = h + (ad.post_attn_norm(L, a) if ad.block_style == BLOCK_SANDWICH else a)
            if site == "pre_act":  # the MLP's input, as the runtime forms it
                if ad.block_style == BLOCK_PARALLEL:
                    x = ad.ln1(L, h) if ad.mlp_norm_shared else ad.ln2(L, h)
                else:
                    x = ad.ln2(L, entry[L])
                aux[L] = ad.mlp_pre(L, x)[1]
        elif ad.causal:
            entry[L] = out[("resid_pre", L)]  # [B, 1, d]
        else:
            entry[L] = out[("resid_pre", L)]  # [B, T, d]: bidirectional, the whole sequence
    probs = _probs(out.logits).gather(1, tgt[:, None])[:, 0]
    for i in _nonfinite(~torch.isfinite(probs)).flatten().tolist():
        raise ValueError(f"{_name(items, prompts, i)}: the target probability is not finite (NaN/inf "
                         "in the model's output)")
    prefix = None
    if ad.causal:
        T = b.input_ids.shape[1]
        keep = torch.arange(T - 1, device=dev)[None] < pos[:, None]  # positions before the target
        first = min(layers)
        cut = lambda ts: [None if (t is None or L < first) else t[:, :, : T - 1] for L, t in enumerate(ts)]
        prefix = KVCache(cut(out.kv.k), cut(out.kv.v), keep)
    return _Base(items, layers, b.input_ids, b.attention_mask, pos, tgt, probs, act, entry, prefix, inject, aux)


def _run_wide(lm: LM, input_ids, *, attention_mask, capture, capture_positions, return_kv, logits):
    """``lm.run`` of a bf16/fp16 model computed in fp32, one block at a time
    with that block's weights upcast; captures and keys/values rounded once to
    the model's dtype, logits in fp32. IG's base pass (one pass per prompt,
    against steps x layers one-token rows) takes it for bf16 models: the
    prefix, neurons and residual the step rows start from then carry one
    rounding instead of a bf16 forward's (SmolLM2, 3 prompts x 30 layers, 20
    steps: largest completeness gap 3.5 -> 1.4, fp32's 1.6; the step rows stay
    bf16)."""
    ad, dt, wide = lm.adapter, lm.dtype, torch.float32
    N = ad.n_layers
    blocks = [_block_params(lm, L) for L in range(N)]
    in_blocks = {id(p) for ps in blocks for p in ps}
    rest = [p for p in lm.model.parameters() if id(p) not in in_blocks]
    kw = dict(attention_mask=attention_mask, capture_positions=capture_positions, return_kv=return_kv)
    with _weights_in(rest, wide):
        out = runtime.run(ad, input_ids, stop_layer=0, **kw)  # the embeddings
    h, captured = out.hidden, {}
    ks, vs = [None] * N, [None] * N
    for L in range(N):
        with _weights_in(blocks[L], wide):
            o = runtime.run(ad, hidden=h, start_layer=L, stop_layer=L + 1, logits=None,
                            capture=[c for c in capture if c[1] == L], **kw)
        h = o.hidden
        captured.update({k: v.to(dt) for k, v in o.captured.items()})
        if return_kv:
            ks[L], vs[L] = o.kv.k[L].to(dt), o.kv.v[L].to(dt)
    with _weights_in(rest, wide):
        lg = runtime.run(ad, hidden=h, start_layer=N, logits=logits, **kw).logits
    return runtime.RunOutput(lg, h.to(dt), captured, runtime.KVCache(ks, vs, out.kv.mask if return_kv else None))


def _step_pass(lm: LM, base: _Base, site: str, g_item, g_layer, r_group, r_alpha, r_weight, scale, prompts=None,
               make_patch=None):
    """Run the step rows of some (item, layer) groups and reduce them to IG.

    g_item/g_layer [G]: item index and model layer of each group; r_group,
    r_alpha, r_weight [R]: the rows. ``scale`` [B] multiplies each item's
    objective (a power of two, exact). Returns (IG [G, d_ff] float32, the target
    probability of every row [R] float32). ``make_patch``: see
    :func:`run_segments`. On the meta device the index tensors (g_item,
    g_layer, r_group) live on the CPU (see :func:`ig_chunk`) and go to the
    data's device where they index it (a no-op elsewhere).
    """
    ad = lm.adapter
    N = ad.n_layers
    dev = base.ids.device
    causal = ad.causal
    # Order rows by start layer: the rows of layer L join the active set at L
    # (or after L when injected) and stay in it up to the head.
    r_layer = g_layer[r_group]
    order = torch.argsort(r_layer, stable=True)
    order_d = order.to(dev)
    r_group, r_alpha, r_weight, r_layer = r_group[order], r_alpha[order_d], r_weight[order_d], r_layer[order]
    r_item = g_item[r_group]

    expand, reduce = _step_ops(dev)
    leaves, segs = [], []  # one _Segment per start layer
    start = 0
    for L in r_layer.unique().tolist():
        n = int((r_layer == L).sum())
        sl = slice(start, start + n)
        start += n
        items_ = r_item[sl]
        items_d = items_.to(dev)
        bias = ad.down_bias(L)
        if site == "act":
            y = base.act[L] @ ad.down_weight(L)  # [B, d]: a @ W_down, once per item
            z = expand(y, items_d, r_alpha[sl], bias)
        else:
            z = expand(base.act[L], items_d, r_alpha[sl])
        z = z.detach().requires_grad_(True)
        leaves.append(z)
        segs.append(_segment(ad, base, site, L, items_, z, base.entry[L].dtype))

    h, past_rows, mask = run_segments(ad, segs, base.prefix, make_patch)
    # past_rows is now the item of each row in active-set order, which is the
    # sorted order of the rows (segments were appended by start layer).
    past_d = past_rows.to(dev)
    logits = runtime.run(ad, hidden=h, start_layer=N, attention_mask=mask,
                         logits="last" if causal else base.pos.index_select(0, past_d)).logits
    p = _TargetProb.apply(logits, base.tgt.index_select(0, past_d))
    bad = _nonfinite(~torch.isfinite(p))
    if len(bad):
        r = int(bad[0])
        raise ValueError(f"{_name(base.items, prompts, int(past_rows[r]))}, layer {int(r_layer[r])}: the target "
                         f"probability is not finite at alpha={float(r_alpha[r]):.3g}")
    coef = (r_weight * scale.index_select(0, r_item.to(dev))).to(p.dtype)
    grads = torch.autograd.grad(p, leaves, grad_outputs=coef)
    ig = torch.empty(len(g_item), ad.d_ff, dtype=torch.float32, device=dev)
    start = 0
    for L, g in zip(r_layer.unique().tolist(), grads):
        sl = slice(start, start + g.shape[0])
        start += g.shape[0]
        groups = r_group[sl].unique()  # sorted group ids of this layer
        local = torch.searchsorted(groups, r_group[sl]).to(dev)
        w = ad.down_weight(L) if site == "act" else None
        gi = g_item[groups].to(dev)
        act = base.act[L].index_select(0, gi)
        ig[groups.to(dev)] = reduce(g, local, len(groups), act, w) / scale.float().index_select(0, gi)[:, None]
    probs = torch.empty_like(p)
    probs[order_d] = p.detach()
    return ig, probs


def _segment(ad, base: _Base, site: str, L: int, items_, z, dt) -> "_Segment":
    """The :class:`_Segment` of rows that start at layer L (items ``items_``)
    with the site's values ``z``; ``dt`` the dtype the rows are carried in (the
    model's; fp32 for :func:`_end_probs`). ``items_`` may live on the CPU while
    the data is on the meta device (see :func:`ig_chunk`): it indexes the data
    on the data's device and is kept as given in the segment."""
    items_d = items_.to(base.entry[L].device)
    if base.inject:
        if site == "act":
            m = z
        else:
            ax = base.aux[L]
            m = ad.mlp_down(L, ad.mlp_act(L, z.to(dt), None if ax is None else ax.index_select(0, items_d).to(dt)))
        if ad.block_style == BLOCK_SANDWICH:
            m = ad.post_mlp_norm(L, m)
        # The residual plus the step's MLP output, added in fp32 and rounded
        # once to dt (a no-op for fp32 and fp64 models).
        acc = torch.promote_types(dt, torch.float32)
        h = (base.entry[L].index_select(0, items_d).to(acc) + m.to(acc)).to(dt)[:, None]
        return _Segment(L + 1, h, items_, None, None)
    causal = ad.causal
    h = base.entry[L].index_select(0, items_d).to(dt)
    mask = None if causal else base.mask.index_select(0, items_d)
    where = (torch.zeros(len(items_), dtype=torch.long, device=h.device) if causal
             else base.pos.index_select(0, items_d))
    return _Segment(L, h, items_, mask, _LeafSite("mlp_out" if site == "act" else "pre_act", L, z, where))


def _wide_ends(lm) -> bool:
    """Whether IG's base pass runs in fp32 (:func:`_run_wide`) and F(a) and F(0)
    for the completeness gap come from :func:`_end_probs` (fp32) rather than the
    unmodified pass and the alpha = 0 step row: for bf16/fp16 models (fp32 and
    fp64 models keep their results bit for bit). A bf16 forward evaluates F with an error of about 0.01
    on SmolLM2 (F(a) 0.25-0.77), uncorrelated between alpha = 0 and 1, while a
    layer's F(a) - F(0) can be ~1e-3; the bf16 gradients integrate to within a
    few 1e-3 of the fp32 F(a) - F(0) from the same prefix (measured, 3 prompts
    x 11 layers), so the endpoints, not the integral, made bf16's gap."""
    return lm.dtype.itemsize < 4


@contextmanager
def _weights_in(params, dtype):
    """The floating parameters ``params`` held in ``dtype`` for the duration
    (a converted copy); the original tensors are put back after, untouched."""
    held = {}
    for p in params:
        if p.is_floating_point() and p.dtype != dtype and id(p) not in held:
            held[id(p)] = (p, p.data)
    # The converted tensors are referenced here until the block ends: the
    # planner's memory model (kncore.planner) sees a tensor's bytes as freed
    # when its last reference goes, and ``p.data = t`` keeps t's storage but
    # not t itself.
    wide = []
    try:
        for p, d in held.values():
            wide.append(d.to(dtype))
            p.data = wide[-1]
        yield
    finally:
        for p, d in held.values():
            p.data = d
        wide.clear()


def _block_params(lm: LM, L: int) -> list:
    from .models.base import get_module
    return list(get_module(lm.model, lm.adapter.layer_module_name(L)).parameters())


@torch.no_grad()
def _end_probs(lm: LM, base: _Base, site: str, g_item, g_layer, make_patch=None):
    """(F(0), F(a)) [G] of every (item, layer) group, computed in fp32 from the
    base pass's prefix: two rows per group (alpha = 0 and 1) whose residual
    stream, blocks and head run in fp32, each block's weights upcast only while
    it runs (so no fp32 copy of the whole model is ever held). ``make_patch``:
    see :func:`run_segments`; index tensors may live on the CPU (meta device)."""
    ad, dev, wide = lm.adapter, base.ids.device, torch.float32
    G = len(g_item)
    order = torch.argsort(g_layer, stable=True)  # groups by start layer, as run_segments wants
    r_group = order.repeat_interleave(2)
    r_alpha = torch.tensor([0.0, 1.0], dtype=wide, device=g_item.device).repeat(G)
    r_layer, r_item = g_layer[r_group], g_item[r_group]
    blocks = {}

    def block(L):
        if L not in blocks:
            blocks[L] = _block_params(lm, L)
        return _weights_in(blocks[L], wide)

    segs = []
    for L in r_layer.unique().tolist():
        sel = (r_layer == L).nonzero()[:, 0]
        items_, al = r_item[sel], r_alpha[sel].to(dev)
        items_d = items_.to(dev)
        with block(L):
            a = base.act[L].to(wide)
            z = (expand_steps(a @ ad.down_weight(L), items_d, al, ad.down_bias(L)) if site == "act"
                 else expand_steps(a, items_d, al))
            segs.append(_segment(ad, base, site, L, items_, z, wide))
    h, past_rows, mask = run_segments(ad, segs, base.prefix, make_patch, layer_ctx=block)
    past_d = past_rows.to(dev)
    in_blocks = {id(p) for L in range(ad.n_layers) for p in (blocks.get(L) or _block_params(lm, L))}
    with _weights_in([p for p in lm.model.parameters() if id(p) not in in_blocks], wide):
        logits = runtime.run(ad, hidden=h, start_layer=ad.n_layers, attention_mask=mask,
                             logits="last" if ad.causal else base.pos.index_select(0, past_d)).logits
    p = _probs(logits).gather(1, base.tgt.index_select(0, past_d)[:, None])[:, 0].view(G, 2)
    f0, f1 = torch.empty(G, dtype=p.dtype, device=dev), torch.empty(G, dtype=p.dtype, device=dev)
    order_d = order.to(dev)
    f0[order_d], f1[order_d] = p[:, 0], p[:, 1]
    return f0, f1


class _LeafSite(NamedTuple):
    """Where a segment's IG leaf rows enter the forward: ``z`` at ``site``
    of layer ``layer``, in each row's column ``where``."""

    site: str
    layer: int
    z: torch.Tensor
    where: torch.Tensor


class _Segment(NamedTuple):
    """The rows of one start layer: they join the active set at ``enter_layer``
    with hidden states ``hidden`` [rows, positions, d], their items (cache rows)
    ``items``, the attention ``mask`` (masked LMs) and, when they join before
    their leaf is applied, the ``leaf`` patch site."""

    enter_layer: int
    hidden: torch.Tensor
    items: torch.Tensor
    mask: torch.Tensor | None
    leaf: _LeafSite | None


def run_segments(ad, segs: list, prefix, make_patch=None, layer_ctx=None):
    """Walk step-row :class:`_Segment` s (in enter order) from the first one's layer through
    the last block: the rows of a segment join the active set at its layer.
    Returns (hidden, past_rows, mask) of every row, in active-set order.
    ``make_patch(pb, off, n_rows, n_pos)`` builds a segment's patch
    (default :func:`_row_patch`; kncore.planner passes one the meta device runs);
    ``layer_ctx(l)``, a context block l runs in (:func:`_end_probs`: fp32 weights)."""
    make_patch = make_patch or _row_patch
    N, causal = ad.n_layers, ad.causal
    h = past_rows = mask = None
    si = 0
    for l in range(segs[0].enter_layer, N + 1):
        patches = []
        while si < len(segs) and segs[si].enter_layer == l:
            _, hs, its, ms, pb = segs[si]
            off = 0 if h is None else h.shape[0]
            if pb is not None:
                patches.append(make_patch(pb, off, hs.shape[0], hs.shape[1]))
            h = hs if h is None else torch.cat([h, hs])
            past_rows = its if past_rows is None else torch.cat([past_rows, its])
            if not causal:
                mask = ms if mask is None else torch.cat([mask, ms])
            si += 1
        if l == N:
            break
        with layer_ctx(l) if layer_ctx is not None else nullcontext():
            h = runtime.run(ad, hidden=h, start_layer=l, stop_layer=l + 1, attention_mask=mask,
                            past=prefix if causal else None, past_rows=past_rows if causal else None,
                            patches=patches, logits=None).hidden
    return h, past_rows, mask


def _row_patch(pb: _LeafSite, off, n_rows, n_pos):
    """A patch that puts the leaf rows z at each row's target column."""
    site, L, z, where = pb
    rows = torch.arange(off, off + n_rows, device=z.device)

    def put(sel):  # sel: [n_rows * n_pos, w] in row-major order
        x = sel.reshape(n_rows, n_pos, -1)
        return x.index_put((torch.arange(n_rows, device=x.device), where), z.to(x.dtype)).reshape(sel.shape)

    return Patch(site, L, rows=rows, fn=put)


class _TargetProb(torch.autograd.Function):
    """softmax(logits)[r, target[r]] with a one-pass backward.

    dP_t/dlogits = P_t (onehot_t - softmax): the backward scales the saved
    softmax in place instead of running a zero-filled gather gradient and
    softmax's backward (passes over [rows, vocab]: 6 -> 3; the head's softmax
    and fill were 6% of a GPT-2-small run, bench/bench_ig.py). Single use:
    the graph must not be retained.
    """

    @staticmethod
    def forward(ctx, logits, target):
        sm = _probs(logits)
        p = sm.gather(1, target[:, None])[:, 0]
        ctx.save_for_backward(sm, p, target)
        ctx.dtype = logits.dtype
        return p

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        sm, p, target = ctx.saved_tensors
        gp = (g * p)[:, None]
        grad = sm.mul_(-gp).scatter_add_(1, target[:, None], gp)
        return grad.to(ctx.dtype), None


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax in fp32 (fp64 for fp64 models)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)


def _pow2_scale(probs: torch.Tensor) -> torch.Tensor:
    """1 / 2^floor(log2 p): keeps the objective near 1 so fp16 gradients do
    not underflow; a power of two, so exact in every float format."""
    e = torch.floor(torch.log2(probs.double().clamp_min(1e-30))).clamp(-100, 0)
    return torch.exp2(-e)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


# Fraction of the free memory an "auto" batch may plan to use: the rest is
# left to the allocator's fragmentation and to other processes.
AUTO_MEMORY_FRACTION = {"cuda": 0.8, "cpu": 0.35}


def chunk_size(lm: LM, lengths: list, layers: list, per_group: int, site: str, batch_size,
               budget_bytes: int | None = None, device_type: str | None = None) -> int:
    """Items per chunk. ``"auto"``: the most items whose planned peak memory
    (:func:`kncore.planner.attribute_chunk_memory`, the same step schedule costed
    on the meta device) fits ``budget_bytes`` (default: a fraction of the free
    memory), minus the weights."""
    dev_type = device_type or lm.device.type
    if batch_size == "auto":
        from .planner import attribute_chunk_memory
        if budget_bytes is None:
            budget_bytes = int(_free_bytes(lm.device) * AUTO_MEMORY_FRACTION.get(dev_type, 0.35))
        fixed, per = attribute_chunk_memory(lm, max(lengths), layers, per_group, site)
        k = max(1, int((budget_bytes - fixed) // max(per, 1)))
        if dev_type != "cuda":
            # CPU: a [rows, 768] x [768, 3072] matmul runs at 36, 39 and 47
            # GFLOP/s with 240, 720 and 1440 rows (one core, GPT-2-small
            # shape): little is left to gain past ~2000 rows, while memory grows.
            k = min(k, max(1, 2048 // max(1, per_group * len(layers))))
        return min(k, len(lengths))
    if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1:
        return batch_size
    raise ValueError(f"batch_size must be 'auto' or a positive integer, got {batch_size!r}")


def chunk_items(lengths: list, k: int) -> list:
    """Item indices in chunks of k, items of similar length together (less
    padding in the one base pass)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i: i + k] for i in range(0, len(order), k)]


def _chunks(lm: LM, items: list, layers: list, per_group: int, site: str, batch_size):
    lengths = [len(it.ids) for it in items]
    return chunk_items(lengths, chunk_size(lm, lengths, layers, per_group, site, batch_size))


def ig_chunk(lm, items, layers, site, scheme, steps, gap_tol=None, max_steps=None, prompts=None, make_patch=None):
    """IG, F(1), F(0), gaps and steps for every (item, layer) of a chunk:
    the base pass, then the step pass (and, with ``gap_tol``, the refinement
    passes).

    kncore.planner costs a chunk by running this on the meta device (no
    ``gap_tol``; ``make_patch``: a leaf patch the meta device runs, see
    :func:`run_segments`): there the index bookkeeping (groups, rows) is
    done on the CPU, where the real run does it on the model's device, and the
    checks of values are skipped."""
    dev = lm.device
    idev = torch.device("cpu") if dev.type == "meta" else dev
    base = _base_pass(lm, items, layers, site, prompts)
    B, nL = len(items), len(layers)
    g_item = torch.arange(B, device=idev).repeat_interleave(nL)
    g_layer = torch.tensor(layers, device=idev).repeat(B)
    G = B * nL
    scale = _pow2_scale(base.probs)

    def rows_for(groups, alphas, weights):
        m = len(alphas)
        rg = groups.repeat_interleave(m)
        return rg, alphas.to(dev).repeat(len(groups)), weights.to(dev).repeat(len(groups))

    alphas, weights = scheme_points(scheme, steps)
    wide_ends = _wide_ends(lm)
    zero_row = not _has_zero(scheme) and not wide_ends
    if zero_row:  # one alpha = 0 row per group for F(0), weight 0
        alphas = torch.cat([alphas, alphas.new_zeros(1)])
        weights = torch.cat([weights, weights.new_zeros(1)])
    all_g = torch.arange(G, device=idev)
    rg, ra, rw = rows_for(all_g, alphas, weights)
    ig, p = _step_pass(lm, base, site, g_item, g_layer, rg, ra, rw, scale, prompts, make_patch)
    if wide_ends:
        f0, f1 = _end_probs(lm, base, site, g_item, g_layer, make_patch)
    else:
        zi = int((alphas == 0).nonzero()[0])
        f0 = p.view(G, len(alphas))[:, zi]
        f1 = base.probs[g_item.to(dev)]
    m_used = torch.full((G,), steps, dtype=torch.long, device=dev)
    gap = _gap(ig, f1, f0)
    while gap_tol is not None:
        todo = ((gap > gap_tol) & (m_used * 2 <= max_steps)).nonzero()[:, 0]
        if len(todo) == 0:
            break
        m = int(m_used[todo].max())  # every group in todo has the same m
        if scheme == "riemann-left":
            # Left points at 2m = the old m points plus the m midpoints: keep
            # the old result and run only the new half.
            a2, w2 = scheme_points("midpoint", m)
            keep = 0.5
            w2 = w2 * 0.5
        else:
            a2, w2 = scheme_points(scheme, 2 * m)
            keep = 0.0
        rg, ra, rw = rows_for(todo, a2, w2)
        ig2, _ = _step_pass(lm, base, site, g_item, g_layer, rg, ra, rw, scale, prompts)
        ig[todo] = keep * ig[todo] + ig2[todo]
        m_used[todo] = 2 * m
        gap[todo] = _gap(ig[todo], f1[todo], f0[todo])
    if gap_tol is not None and bool((gap > gap_tol).any()):
        log.warning("%d of %d (prompt, layer) pairs still have a completeness gap above %g at max_steps=%d",
                    int((gap > gap_tol).sum()), G, gap_tol, max_steps)
    for gi in _nonfinite(~torch.isfinite(ig).all(-1))[:, 0].tolist():
        raise ValueError(f"{_name(items, prompts, gi // nL)}, layer {layers[gi % nL]}: non-finite attribution "
                         "scores")
    return (ig.view(B, nL, -1), base.probs, (f1 - f0).view(B, nL), gap.view(B, nL), m_used.view(B, nL))


# the name attribute() calls (tests replace it to watch the chunks it makes)
_ig_chunk = ig_chunk


def _gap(ig, f1, f0):
    """|sum IG - (F(1) - F(0))| / |F(1) - F(0)| per group (0 when both are 0)."""
    num = (ig.double().sum(-1) - (f1.double() - f0.double())).abs()
    den = (f1.double() - f0.double()).abs()
    out = torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num == 0, 0.0, math.inf))
    return out.float()


@_with_grad
def attribute(
    lm: LM,
    prompts: Sequence[str] | str,
    targets: Sequence[str] | str,
    *,
    steps: int = 20,
    layers: Sequence[int] | int | None = None,
    scheme: str = "riemann-left",
    site: str = "act",
    batch_size: int | str = "auto",
    progress: bool = True,
    multi_token: str = "teacher",
    gap_tol: float | None = None,
    max_steps: int | None = None,
) -> Attribution:
    """Integrated-gradients scores of every MLP neuron for each prompt's target.

    ``prompts``: a string or a list; ``targets``: one per prompt (or one string
    for all). ``steps``: quadrature points per (prompt, layer). ``layers``: the
    layers to attribute (None: all). ``scheme``: one of :data:`SCHEMES` (see
    :func:`scheme_points`). ``site``: ``"act"`` (the neurons, input of the
    down-projection) or ``"pre_act"`` (the pre-activation; what the
    knowledge-neurons package scales for GPT models). ``batch_size``: number of
    (prompt, target token) items packed together, or ``"auto"`` (from free
    memory). ``multi_token``: ``"teacher"`` (gold tokens as context, the
    attribution averaged over target tokens), ``"greedy"`` (the model's own
    greedy tokens as context, as knowledge-neurons does) or ``"forbid"``.
    ``gap_tol``: double the steps (up to ``max_steps``, default 16 x steps) of
    each (prompt, layer) whose completeness gap exceeds it.
    """
    runtime.check_decoder_only(lm.adapter)  # before any planning, which builds a decoder-only model
    V.check_all(steps=steps, batch_size=batch_size)
    prompts, targets = _check_prompts(prompts, targets)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        V.text(f"prompt {i}", p), V.text(f"target {i}", t)
    layers = check_layers(lm, layers)
    check_options(lm, scheme, site, steps, multi_token, gap_tol, max_steps)
    if gap_tol is not None and max_steps is None:
        max_steps = 16 * steps
    items, prompt_ids, target_ids, contexts = build_items(lm, prompts, targets, multi_token)
    chunks = _chunks(lm, items, layers, rows_per_group(scheme, steps), site, batch_size)
    nI, nL = len(items), len(layers)
    dev = lm.device
    acc = torch.promote_types(lm.dtype, torch.float32)
    ig = torch.empty(nI, nL, lm.d_ff, dtype=torch.float32, device=dev)
    f1 = torch.empty(nI, dtype=acc, device=dev)
    delta = torch.empty(nI, nL, dtype=acc, device=dev)
    gap = torch.empty(nI, nL, dtype=torch.float32, device=dev)
    used = torch.empty(nI, nL, dtype=torch.long, device=dev)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=nI, desc="IG", unit="item", disable=None)
    with _frozen(lm.model):
        for ch in chunks:
            res = _ig_chunk(lm, [items[i] for i in ch], layers, site, scheme, steps, gap_tol, max_steps, prompts)
            idx = torch.tensor(ch, device=dev)
            ig[idx], f1[idx], delta[idx], gap[idx], used[idx] = res
            if bar is not None:
                bar.update(len(ch))
    if bar is not None:
        bar.close()
    return _assemble(lm, items, prompts, targets, prompt_ids, target_ids, contexts, layers, site, scheme, steps,
                     multi_token, ig, f1, delta, gap, used)


def _assemble(lm, items, prompts, targets, prompt_ids, target_ids, contexts, layers, site, scheme, steps,
              multi_token, ig, f1, delta_f, gap, used) -> Attribution:
    """Average items into prompts and pack the result (f1 [items]: F(a) of the
    unmodified pass; delta_f [items, layers]: F(a) - F(0))."""
    nP = len(prompts)
    owner = torch.tensor([it.prompt for it in items], device=ig.device)
    count = torch.bincount(owner, minlength=nP).float()
    scores = torch.zeros(nP, *ig.shape[1:], dtype=torch.float32, device=ig.device).index_add_(0, owner, ig)
    scores /= count[:, None, None]
    delta = torch.zeros(nP, ig.shape[1], dtype=torch.float32, device=ig.device)
    delta.index_add_(0, owner, delta_f.float())
    delta /= count[:, None]
    own2 = owner[:, None].expand_as(gap)
    worst = gap.new_zeros(nP, gap.shape[1]).scatter_reduce_(0, own2, gap, "amax", include_self=False)
    steps_used = used.new_zeros(nP, used.shape[1]).scatter_reduce_(0, own2, used, "amax", include_self=False)
    token_probs = [[] for _ in range(nP)]
    for it, p in zip(items, f1.double().tolist()):
        token_probs[it.prompt].append(p)
    base_probs = torch.tensor([math.prod(tp) for tp in token_probs], dtype=torch.float32)
    return Attribution(scores=scores.cpu(), layers=list(layers), site=site, scheme=scheme, steps=steps,
                       multi_token=multi_token, prompts=prompts, targets=targets, prompt_ids=prompt_ids,
                       target_ids=target_ids, contexts=contexts, base_probs=base_probs, token_probs=token_probs,
                       completeness_gap=worst.cpu(), prob_delta=delta.cpu(), steps_used=steps_used.cpu(),
                       model=lm.name)


# ---------------------------------------------------------------------------
# the plain reference
# ---------------------------------------------------------------------------
@_with_grad
def attribute_ref(
    lm: LM,
    prompts: Sequence[str] | str,
    targets: Sequence[str] | str,
    *,
    steps: int = 20,
    layers: Sequence[int] | int | None = None,
    scheme: str = "riemann-left",
    site: str = "act",
    multi_token: str = "teacher",
    batch_size: int | None = None,
) -> Attribution:
    """What :func:`attribute` computes, the plain way (the reference code's).

    For every (prompt, target token, layer) the whole prompt is recomputed once
    per step, in batches of ``batch_size`` steps (default: all), with the
    site's activations at the target position replaced by alpha * a (a leaf),
    and ``torch.autograd.grad`` gives the gradient with respect to it.
    """
    prompts, targets = _check_prompts(prompts, targets)
    layers = check_layers(lm, layers)
    check_options(lm, scheme, site, steps, multi_token, None, None)
    items, prompt_ids, target_ids, contexts = build_items(lm, prompts, targets, multi_token)
    alphas, weights = scheme_points(scheme, steps)
    dev, nL = lm.device, len(layers)
    acc = torch.promote_types(lm.dtype, torch.float32)
    ig = torch.empty(len(items), nL, lm.d_ff, dtype=torch.float32, device=dev)
    f1 = torch.empty(len(items), dtype=acc, device=dev)
    f0 = torch.empty(len(items), nL, dtype=acc, device=dev)
    with _frozen(lm.model):
        for i, it in enumerate(items):
            ids = torch.tensor([it.ids], device=dev)
            with torch.no_grad():
                out = lm.run(ids, capture=[(site, L) for L in layers], capture_positions=torch.tensor([it.pos]),
                             logits=torch.tensor([it.pos]))
            f1[i] = _probs(out.logits)[0, it.target]
            for j, L in enumerate(layers):
                a = out[(site, L)][0, 0]
                total = torch.zeros(lm.d_ff, dtype=acc, device=dev)
                al = torch.cat([alphas.new_zeros(1), alphas])  # alpha = 0 first, for F(0)
                wt = torch.cat([weights.new_zeros(1), weights])
                bs = batch_size or len(al)
                for s in range(0, len(al), bs):
                    a_s, w_s = al[s: s + bs].to(dev), wt[s: s + bs].to(dev)
                    x = (a_s[:, None].to(a.dtype) * a).requires_grad_(True)
                    rows = ids.expand(len(a_s), -1)
                    o = lm.run(rows, patches=[Patch(site, L, positions=it.pos, value=x)],
                               logits=torch.full((len(a_s),), it.pos, device=dev))
                    p = _probs(o.logits)[:, it.target]
                    if s == 0:
                        f0[i, j] = p[0].detach()
                    (g,) = torch.autograd.grad(p, x, grad_outputs=w_s.to(p.dtype))
                    total += g.to(acc).sum(0)
                ig[i, j] = (a.to(acc) * total).float()
    used = torch.full((len(items), nL), steps, dtype=torch.long, device=dev)
    gap = torch.stack([_gap(ig[:, j], f1, f0[:, j]) for j in range(nL)], 1)
    return _assemble(lm, items, prompts, targets, prompt_ids, target_ids, contexts, layers, site, scheme, steps,
                     multi_token, ig, f1, f1[:, None] - f0, gap, used)
