"""ROME edits (Meng et al. 2022): a rank-one update of the MLP down-projection
at one layer, with an exact undo.

For a request ``{"prompt": "The capital of {} is", "subject": "Canada",
"target_new": "Rome"}`` at layer L (ROME's ``compute_u``/``compute_v``/
``rome_main``, followed line by line where it matters):

1. k* = the down-projection input (site ``act``) at the subject's last token,
   averaged over the context templates (:mod:`kncore.rome.templates`).
2. u = C^-1 k* (``mom2_adjustment``; C = E[k k^T] from :func:`layer_stats`,
   solved by Cholesky in float64) or u = k*; ``left = u / ||u||``.
3. v* = v + delta: Adam on delta, added to the MLP output at the subject's
   last token of every rewriting prompt (template + prompt + target,
   teacher-forced) and of the KL prompts. The loss is the mean target NLL
   + ``kl_factor`` * KL(new || old) of the next-token distribution at the
   subject in ``"{} is a"`` + ``v_weight_decay * ||delta|| / ||v||^2``; delta
   is clamped to ``clamp_norm_factor * ||v||``; the loop stops below
   ``early_stop_loss`` and takes at most ``v_num_grad_steps - 1`` Adam steps
   (ROME evaluates the loss ``v_num_grad_steps`` times).
4. ``right = (v* - v) / (k . left)`` with k and v the key and MLP output at the
   subject of the bare prompt, and W += left right^T (in the orientation of the
   weight: GPT-2's Conv1D stores [d_ff, d_model], Linear [d_model, d_ff]),
   through the rank-one op (``kncore.ops.rank1_update``), whose undo record
   restores W bit for bit.

Speed: a change at (layer L, token p) cannot reach layers <= L or tokens < p,
so step 3 computes the prompts once, keeps their keys/values, and each Adam
step only runs layers L+1.. on the tokens from the subject's last one on,
starting from the cached residual plus delta, with logits only at the scored
positions. :mod:`kncore.rome.reference` is the plain version (ROME's full
forward per step through Hugging Face hooks) that the tests compare with.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..lm import InputError
from ..models.base import BLOCK_PARALLEL, BLOCK_SANDWICH, BLOCK_SEQUENTIAL
from ..runtime import KVCache
from .hparams import ROMEHparams, hparams_for, load_hparams
from .stats import LayerStats, StatsCacheMismatch, layer_stats, load_stats
from .templates import context_templates

log = logging.getLogger("kncore")

_CHOL: dict = {}  # (fingerprint, layer, stats key, reg, device) -> Cholesky factor of C (float64)


class SingularStatistics(InputError):
    """The second moment C cannot be inverted."""


# -- requests ---------------------------------------------------------------------

@dataclass
class Request:
    """One edit: ``prompt`` holds ``{}`` where the subject goes."""

    prompt: str
    subject: str
    target: str

    def text(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)


def parse_request(req) -> Request:
    """Accept ROME/CounterFact (``target_new: {"str": ...}``) and plain dicts.

    The prompt may hold ``{}`` for the subject or the subject itself (its first
    occurrence is taken, as EasyEdit does).
    """
    if isinstance(req, Request):
        return req
    if not isinstance(req, dict):
        raise InputError(f"a ROME request is a dict with prompt, subject and target_new, got {type(req).__name__}")
    if "requested_rewrite" in req:  # a whole CounterFact record
        req = req["requested_rewrite"]
    missing = [k for k in ("prompt", "subject", "target_new") if k not in req]
    if missing:
        raise InputError(f"ROME request lacks {missing}: {req!r}")
    prompt, subject, target = req["prompt"], req["subject"], req["target_new"]
    if isinstance(target, dict):
        target = target.get("str")
    if not isinstance(subject, str) or not subject.strip():
        raise InputError(f"empty subject in request {req!r}")
    if not isinstance(target, str) or not target.strip():
        raise InputError(f"empty target in request {req!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"empty prompt in request {req!r}")
    n = prompt.count("{}")
    if n > 1:
        raise InputError(f"prompt {prompt!r} holds {n} '{{}}'; ROME needs exactly one subject slot")
    if n == 0:
        if subject not in prompt:
            raise InputError(f"subject {subject!r} is not in the prompt {prompt!r} (and the prompt has no '{{}}')")
        prompt = prompt.replace(subject, "{}", 1)
    if prompt.replace("{}", "").strip() == "":
        raise InputError(f"prompt {prompt!r} holds nothing but the subject")
    return Request(prompt, subject, target)


# -- token positions ----------------------------------------------------------------

def locate(lm, template: str, subject: str, fact_token: str = "subject_last") -> tuple[list, int]:
    """Token ids of ``template`` with the subject filled in, and the index of
    the token ROME reads the fact at (``fact_token``)."""
    ci = template.index("{}")
    text = template[:ci] + subject + template[ci + 2:]
    ids = lm.tokenize(text)
    if fact_token == "last":
        return ids, len(ids) - 1
    first, last = lm.char_tokens(text, ci, ci + len(subject), ids)
    return ids, (last if fact_token == "subject_last" else first)


# -- the pieces of an edit ---------------------------------------------------------

def _vec_dtype(lm):
    return torch.float64 if lm.dtype == torch.float64 else torch.float32


@torch.no_grad()
def compute_keys(lm, layer: int, rows: list[tuple[list, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Down-projection inputs and MLP outputs at one position per row:
    ``(act [R, d_ff], mlp_out [R, d_model])`` in one batched forward that stops at ``layer``."""
    b = lm.batch_ids([ids for ids, _ in rows])
    pos = torch.tensor([p for _, p in rows], device=lm.device)
    out = lm.run(b.input_ids, attention_mask=b.attention_mask, stop_layer=layer + 1, logits=None,
                 capture=[("act", layer), ("mlp_out", layer)], capture_positions=pos)
    return out[("act", layer)][:, 0], out[("mlp_out", layer)][:, 0]


def _cholesky(lm, layer: int, stats: LayerStats, reg: float) -> torch.Tensor:
    key = None
    if stats.meta.get("source") != "tensor":
        key = (lm.fingerprint(), layer, stats.key, float(reg), str(lm.device))
        if key in _CHOL:
            return _CHOL[key]
    C = stats.second_moment
    if C.shape != (lm.d_ff, lm.d_ff):
        raise InputError(f"statistics for layer {layer} are {tuple(C.shape)}, but the model's keys have "
                         f"d_ff = {lm.d_ff}")
    if 0 <= stats.n_tokens < lm.d_ff and reg == 0:
        raise SingularStatistics(
            f"the second moment of layer {layer} comes from {stats.n_tokens} tokens, fewer than the "
            f"{lm.d_ff} key dimensions, so it is singular: compute statistics over more text, or set "
            "hparams mom2_reg (e.g. 1e-3) to regularise it")
    C = C.to(device=lm.device, dtype=torch.float64)
    if not torch.isfinite(C).all():
        raise SingularStatistics(f"the second moment of layer {layer} holds NaN or inf")
    C = (C + C.T) / 2
    if reg > 0:
        C = C + reg * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    Lf, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0:
        raise SingularStatistics(
            f"the second moment of layer {layer} is not positive definite (Cholesky failed at column "
            f"{int(info)}; {stats.n_tokens} tokens, d_ff {lm.d_ff}): compute statistics over more text, "
            "or set hparams mom2_reg (e.g. 1e-3) to add that fraction of its mean diagonal")
    dg = Lf.diagonal()
    cond = float((dg.max() / dg.min()) ** 2)  # a lower bound on cond(C)
    if cond > 1e12:
        log.warning("the second moment of layer %d is ill-conditioned (cond >= %.1e); u = C^-1 k may be "
                    "dominated by noise: consider mom2_reg", layer, cond)
    if key is not None:
        _CHOL[key] = Lf
    return Lf


def clear_cache() -> None:
    """Forget the cached Cholesky factors of C (and the context templates)."""
    from . import templates
    _CHOL.clear()
    templates._CACHE.clear()


def left_vector(lm, layer: int, k_star: torch.Tensor, hparams: ROMEHparams,
                stats: LayerStats | None) -> torch.Tensor:
    """ROME's u / ||u|| with u = C^-1 k* (``mom2_adjustment``) or u = k*."""
    if hparams.mom2_adjustment:
        Lf = _cholesky(lm, layer, stats, hparams.mom2_reg)
        u = torch.cholesky_solve(k_star.to(torch.float64)[:, None], Lf)[:, 0]
    else:
        u = k_star.to(torch.float64)
    return (u / u.norm()).to(_vec_dtype(lm))


@dataclass
class _Rows:
    ids: list          # token ids per row
    lookup: list       # the position delta is added at
    n_rewrite: int     # rows [0, n_rewrite) are rewriting prompts, then KL prompts
    prompt_len: list   # per rewriting row: tokens before the target
    target: list       # target token ids

    def key_rows(self, fact_token: str = "subject_last") -> list[tuple[list, int]]:
        """(ids, position) of the rows the key is read from: every rewriting prompt
        without its target, or the prompt itself alone for ROME's ``"last"``."""
        n = 1 if fact_token == "last" else self.n_rewrite
        return [(self.ids[i][: self.prompt_len[i]], self.lookup[i]) for i in range(n)]


def build_rows(lm, req: Request, templates: list[str], fact_token: str, kl_prompts: list[str]) -> _Rows:
    """ROME's rewriting prompts (template + prompt + target[:-1]) and KL prompts."""
    target = lm.target_ids(req.text(), req.target)
    ids, look, plen = [], [], []
    for t in templates:
        p_ids, p = locate(lm, t.replace("{}", req.prompt, 1), req.subject, fact_token)
        ids.append(p_ids + target[:-1])
        look.append(p)
        plen.append(len(p_ids))
    for k in kl_prompts:
        k_ids, p = locate(lm, k, req.subject, fact_token)
        ids.append(k_ids)
        look.append(p)
    n = max(len(x) for x in ids)
    if n > lm.adapter.n_ctx:
        raise InputError(f"a rewriting prompt is {n} tokens, longer than the model's context {lm.adapter.n_ctx}")
    return _Rows(ids, look, len(templates), plen, target)


def optimise_delta(lm, layer: int, rows: _Rows, hparams: ROMEHparams):
    """ROME's ``compute_v`` loop on the cached prefix: returns
    ``(delta, v_init, losses, p_target)``."""
    return optimise_deltas(lm, layer, [rows], hparams)[0]


def optimise_deltas(lm, layer: int, rows_list: list, hparams: ROMEHparams, init_site: str = "mlp_out"):
    """ROME's ``compute_v`` / MEMIT's ``compute_z`` for several requests at once:
    one list ``[(delta, v_init, losses, p_target)]`` per request.

    Each request keeps its own delta, its own loss (mean target NLL of its
    rewriting rows + KL of its KL rows + weight decay), its own early stop and
    clamp: its rows never attend to another request's rows, and Adam updates
    each parameter from its own gradient (a stopped request gets no gradient,
    so Adam skips it), so the result is the one-request loop run per request.
    ``init_site``: ``"mlp_out"`` (ROME's v = MLP output) or ``"resid_post"``
    (MEMIT's z = the layer's output); the clamp and weight decay use its norm.
    The work is :func:`v_prepare` (the base pass and its cache) and one
    :func:`v_loss` per step: what :func:`kncore.plan` runs on the meta device.
    """
    st = v_prepare(lm, layer, rows_list, init_site)
    R, dev, vd = st.R, st.dev, st.vd
    inits, init_norm = st.inits, st.init_norm
    deltas = [torch.zeros(lm.adapter.d_model, dtype=vd, device=dev, requires_grad=True) for _ in range(R)]
    opt = torch.optim.Adam(deltas, lr=hparams.v_lr)
    losses = [[] for _ in range(R)]
    p_target = [float("nan")] * R
    active = [True] * R
    max_norm = hparams.clamp_norm_factor * init_norm
    for it in range(hparams.v_num_grad_steps):
        loss, p_req = v_loss(st, torch.stack(deltas), hparams)
        loss_val = loss.detach().tolist()
        p_req = p_req.tolist()
        for j in range(R):
            if not active[j]:
                continue
            losses[j].append(loss_val[j])
            p_target[j] = p_req[j]
            if loss_val[j] < hparams.early_stop_loss or it == hparams.v_num_grad_steps - 1:
                active[j] = False
        log.debug("v* step %d: mean loss %.4f, %d of %d requests still optimised", it,
                  sum(loss_val) / R, sum(active), R)
        on = [j for j in range(R) if active[j]]
        if not on:
            break
        grads = torch.autograd.grad(loss[on].sum(), [deltas[j] for j in on])
        for j in range(R):
            deltas[j].grad = None
        for j, g in zip(on, grads):
            deltas[j].grad = g
        opt.step()
        with torch.no_grad():
            for j in on:
                if deltas[j].norm() > max_norm[j]:
                    deltas[j].mul_(max_norm[j] / deltas[j].norm())
    return [(deltas[j].detach(), inits[j], losses[j], p_target[j]) for j in range(R)]


@dataclass
class _VState:
    """What the v*/z* steps read (:func:`v_prepare` builds it, :func:`v_loss`
    reads it). B rows (every request's rewriting and KL rows), R requests, S
    suffix positions, d = d_model."""

    lm: object
    layer: int
    B: int
    dev: torch.device
    vd: torch.dtype                     # the deltas' dtype
    # the residual stream after the edit layer from each row's lookup position
    h_suf: torch.Tensor                 # [B, S, d]
    onehot: torch.Tensor                # [B, S, 1]: 1 at the row's lookup position
    suf_mask: torch.Tensor              # [B, S]: real suffix tokens
    cache: object                       # KVCache of the tokens before the lookup, layers > layer; or None
    post: object                        # the post-MLP norm (BLOCK_SANDWICH, mlp_out) or None
    m_look: torch.Tensor | None         # [B, 1, d] MLP output at the lookup (with post)
    post_m: torch.Tensor | None         # post(m_look)
    # scored positions: every target token of every rewriting row, then every KL row's lookup
    n_scored: int
    sel_r: torch.Tensor                 # row of each scored position
    sel_c: torch.Tensor                 # its column in the suffix
    labels: torch.Tensor                # target token of each of the first n_scored
    w_nll: torch.Tensor                 # 1 / (target length) per target token
    req_t: torch.Tensor                 # [B] request of each row
    kl_req: torch.Tensor                # request of each KL row
    n_rw_t: torch.Tensor                # [R] rewriting rows per request
    n_kl_t: torch.Tensor                # [R] KL rows per request (at least 1)
    rw_req: torch.Tensor                # request of each rewriting row
    rw_rows: torch.Tensor               # row index of each rewriting row
    inits: torch.Tensor                 # [R, d] the value at the edit site before the edit
    init_norm: torch.Tensor             # [R] ||inits||: the clamp's and the weight decay's scale
    kl_init: torch.Tensor | None = None  # the KL rows' initial log-probabilities (v_loss's first call)

    @property
    def R(self) -> int:
        """The number of requests."""
        return len(self.n_rw_t)

    @property
    def row_of(self) -> torch.Tensor:
        """The row of each of the first n_scored (target-token) positions."""
        return self.sel_r[:self.n_scored]


def v_prepare(lm, layer: int, rows_list: list, init_site: str = "mlp_out") -> _VState:
    """The base pass of :func:`optimise_deltas` over every request's rows, with
    the cache of the tokens before each lookup position at the layers above
    ``layer``. Positions come from the rows (Python lists), so it runs on the
    meta device too."""
    ad = lm.adapter
    dev = lm.device
    N = ad.n_layers
    ids, lookup, req_of, n_rw, off = [], [], [], [], []
    for j, r in enumerate(rows_list):
        off.append(len(ids))
        ids += r.ids
        lookup += r.lookup
        req_of += [j] * len(r.ids)
        n_rw.append(r.n_rewrite)
    b = lm.batch_ids(ids)
    B, T = b.input_ids.shape
    look = torch.tensor(lookup, device=dev)
    with torch.no_grad():
        pre = lm.run(b.input_ids, attention_mask=b.attention_mask, return_kv=layer + 1 < N, logits=None,
                     capture=[("resid_post", layer), (init_site, layer)])
    inits = pre[(init_site, layer)][torch.tensor(off, device=dev), look[off]].detach()
    resid = pre[("resid_post", layer)]
    # Keys/values of the tokens before each row's lookup position, layers > L.
    P = max(lookup)
    cache = None
    if P > 0 and layer + 1 < N:
        keep = lambda ts: [None if (l <= layer or t is None) else t[:, :, :P] for l, t in enumerate(ts)]
        cache = KVCache(keep(pre.kv.k), keep(pre.kv.v),
                        torch.arange(P, device=dev)[None] < look[:, None])
    # nothing to reuse: recompute from the first token
    look_eff = [0] * B if cache is None else lookup
    look_eff_t = torch.tensor(look_eff, device=dev)
    S = max(len(x) - e for x, e in zip(ids, look_eff))
    col = look_eff_t[:, None] + torch.arange(S, device=dev)[None]
    suf_mask = col < b.lengths[:, None]
    h_suf = resid.gather(1, col.clamp(max=T - 1)[..., None].expand(-1, -1, resid.shape[-1]))
    onehot = torch.zeros(B, S, 1, dtype=resid.dtype, device=dev)
    onehot[torch.arange(B, device=dev), look - look_eff_t] = 1
    # ROME's delta is added to the MLP output (the down-projection's, whose
    # weight it edits). Where a norm follows the MLP (BLOCK_SANDWICH) the
    # residual stream changes by post(m + delta) - post(m) at the lookup token.
    # (MEMIT's z is the layer's output: its delta enters the residual as it is.)
    post = ad.post_mlp_norm if ad.block_style == BLOCK_SANDWICH and init_site == "mlp_out" else None
    m_look = post_m = None
    if post is not None:
        m_look = pre[("mlp_out", layer)][torch.arange(B, device=dev), look][:, None]  # [B, 1, d]
        post_m = post(layer, m_look)
    del pre, resid

    # Scored positions: each target token of each rewriting row, then each KL row's lookup.
    sel_r, sel_c, labels, w_nll, kl_r = [], [], [], [], []
    for j, r in enumerate(rows_list):
        nt = len(r.target)
        for i in range(r.n_rewrite):
            g = off[j] + i
            for t in range(nt):
                sel_r.append(g)
                sel_c.append(r.prompt_len[i] - 1 + t - look_eff[g])
                labels.append(r.target[t])
                w_nll.append(1.0 / nt)
    n_scored = len(sel_r)
    for j, r in enumerate(rows_list):
        for i in range(r.n_rewrite, len(r.ids)):
            g = off[j] + i
            sel_r.append(g)
            sel_c.append(lookup[g] - look_eff[g])
            kl_r.append(g)
    vd = _vec_dtype(lm)
    sel_r = torch.tensor(sel_r, device=dev)
    req_t = torch.tensor(req_of, device=dev)
    inits = inits.to(vd)
    return _VState(
        lm=lm, layer=layer, B=B, dev=dev, vd=vd, post=post, m_look=m_look, post_m=post_m,
        h_suf=h_suf, onehot=onehot, cache=cache, suf_mask=suf_mask, n_scored=n_scored, req_t=req_t,
        sel_r=sel_r, sel_c=torch.tensor(sel_c, device=dev), labels=torch.tensor(labels, device=dev),
        w_nll=torch.tensor(w_nll, dtype=vd, device=dev),
        kl_req=req_t[torch.tensor(kl_r, dtype=torch.long, device=dev)],
        n_rw_t=torch.tensor(n_rw, dtype=vd, device=dev),
        n_kl_t=torch.tensor([max(1, len(r.ids) - r.n_rewrite) for r in rows_list], dtype=vd, device=dev),
        rw_req=torch.tensor([j for j, r in enumerate(rows_list) for _ in range(r.n_rewrite)], device=dev),
        rw_rows=torch.tensor([off[j] + i for j, r in enumerate(rows_list) for i in range(r.n_rewrite)],
                             device=dev),
        inits=inits, init_norm=inits.norm(dim=1))


def v_loss(st: _VState, D: torch.Tensor, hparams: ROMEHparams) -> tuple[torch.Tensor, torch.Tensor]:
    """One evaluation of the v*/z* loss for the deltas ``D`` [R, d_model]: the
    layers above the edit over the cached suffix, the head at the scored
    positions. Returns (loss [R], mean target probability per request [R]);
    the first call fixes the KL prompts' initial distribution."""
    lm, layer, R, dev, vd = st.lm, st.layer, st.R, st.dev, st.vd
    ad = lm.adapter
    N = ad.n_layers
    start = layer + 1
    Dr = D[st.req_t][:, None, :]
    if st.post is None:
        h_in = st.h_suf + st.onehot * Dr.to(st.h_suf.dtype)
    else:
        h_in = st.h_suf + st.onehot * (st.post(layer, st.m_look + Dr.to(st.m_look.dtype)) - st.post_m)
    if st.cache is None:
        o = lm.run(hidden=h_in, start_layer=start, attention_mask=st.suf_mask, logits=None) if start < N else None
    else:
        o = lm.run(hidden=h_in, start_layer=start, past=st.cache, attention_mask=st.suf_mask, logits=None)
    h = h_in if o is None else o.hidden
    logp = ad.final(h[st.sel_r, st.sel_c]).to(vd).log_softmax(-1)
    n_scored = st.n_scored
    tok_lp = logp[:n_scored].gather(1, st.labels[:, None])[:, 0]
    nll_row = -torch.zeros(st.B, dtype=vd, device=dev).index_add(0, st.row_of, tok_lp * st.w_nll)
    nll_each = nll_row[st.rw_rows]  # per rewriting row, in request order
    nll = torch.zeros(R, dtype=vd, device=dev).index_add(0, st.rw_req, nll_each) / st.n_rw_t
    kl_lp = logp[n_scored:]
    if st.kl_init is None:
        st.kl_init = kl_lp.detach().clone()
    # F.kl_div(init, new, log_target=True, reduction="batchmean") per request.
    kl_row = (kl_lp.exp() * (kl_lp - st.kl_init)).sum(-1)
    kl = hparams.kl_factor * torch.zeros(R, dtype=vd, device=dev).index_add(0, st.kl_req, kl_row) / st.n_kl_t
    wd = hparams.v_weight_decay * (D.norm(dim=1) / st.init_norm ** 2)
    p_req = (torch.zeros(R, dtype=vd, device=dev).index_add(0, st.rw_req, torch.exp(-nll_each.detach()))
             / st.n_rw_t)
    return nll + kl + wd, p_req


def v_loop(forward, v_init: torch.Tensor, hparams: ROMEHparams):
    """ROME's ``compute_v`` optimisation of delta [d] (v* = v_init + delta).

    ``forward(delta) -> (nll_each [rewrite rows], kl_logp [KL rows, V])``:
    each rewriting row's mean target NLL and the KL rows' log-probabilities.
    The loss is mean(nll_each) + kl_factor KL(initial || current) +
    v_weight_decay ||delta|| / ||v_init||^2; Adam steps, the norm clamped to
    clamp_norm_factor ||v_init||, stopping at early_stop_loss. Returns
    (delta, losses, p_target: the mean target probability at the last step).
    The one-request loop over a caller's own forward (kncore.t5.rome_edit's
    decoder loss); decoder-only models run the batched :func:`optimise_deltas`."""
    delta = torch.zeros_like(v_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    kl_init = None
    losses = []
    p_target = float("nan")
    max_norm = hparams.clamp_norm_factor * v_init.norm()
    for it in range(hparams.v_num_grad_steps):
        nll_each, kl_lp = forward(delta)
        nll = nll_each.mean()
        if kl_init is None:
            kl_init = kl_lp.detach().clone()
        kl = hparams.kl_factor * F.kl_div(kl_init, kl_lp, log_target=True, reduction="batchmean")
        wd = hparams.v_weight_decay * (delta.norm() / v_init.norm() ** 2)
        loss = nll + kl + wd
        loss_val = float(loss.detach())
        losses.append(loss_val)
        p_target = float(torch.exp(-nll_each.detach()).mean())
        log.debug("ROME step %d: loss %.4f = %.4f + %.4f + %.4f, p(target) %.4f", it, loss_val,
                  float(nll.detach()), float(kl.detach()), float(wd.detach()), p_target)
        if loss_val < hparams.early_stop_loss or it == hparams.v_num_grad_steps - 1:
            break
        (grad,) = torch.autograd.grad(loss, [delta])
        delta.grad = grad
        opt.step()
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return delta.detach(), losses, p_target


# -- applying and undoing ----------------------------------------------------------------

def _rank1(W, a, b):
    """W += a b^T through the rank-one op; returns its undo record."""
    from ..ops.rank1_update import rank1_update_
    return rank1_update_(W, a, b)


def _rank1_undo(W, rec):
    from ..ops.rank1_update import rank1_undo_
    rank1_undo_(W, rec)


def _orient(lm, layer: int, left: torch.Tensor, right: torch.Tensor):
    """(W, a, b) such that W += a b^T is ROME's update left right^T in W's layout."""
    W = lm.adapter.down_module(layer).weight
    view = lm.adapter.down_weight(layer)  # [d_ff, d_model], a view of W
    same = view.data_ptr() == W.data_ptr() and view.shape == W.shape and view.stride() == W.stride()
    return (W, left, right) if same else (W, right, left)


@dataclass
class EditStep:
    """One rank-one update: what ROME computed, and how to take it back."""

    request: Request
    layer: int
    left: torch.Tensor        # u / ||u||  [d_ff]
    right: torch.Tensor       # (v* - v) / (k . left)  [d_model]
    k_star: torch.Tensor      # key averaged over the context templates [d_ff]
    key: torch.Tensor         # key of the bare prompt (ROME's cur_input) [d_ff]
    value: torch.Tensor       # MLP output of the bare prompt (ROME's cur_output) [d_model]
    v_star: torch.Tensor      # the optimised target value [d_model]
    losses: list = field(default_factory=list)
    p_target: float = float("nan")
    weight: torch.Tensor | None = field(default=None, repr=False)
    record: object = field(default=None, repr=False)

    def describe(self) -> str:
        return f"{self.request.text()!r} -> {self.request.target!r} @L{self.layer}"


class Edit:
    """Applied ROME edits. ``undo()`` restores every weight bit for bit (in
    reverse order); used as a context manager, the edits are undone on exit."""

    def __init__(self, lm, hparams: ROMEHparams):
        self.lm = lm
        self.hparams = hparams
        self.steps: list[EditStep] = []
        self.active = True

    def __repr__(self):
        reqs = ", ".join(s.describe() for s in self.steps)
        return f"Edit([{reqs}], active={self.active})"

    @property
    def requests(self) -> list:
        """Every request applied, in order (once each)."""
        out, seen = [], set()
        for s in self.steps:
            for r in getattr(s, "requests", None) or [s.request]:
                if id(r) not in seen:
                    seen.add(id(r))
                    out.append(r)
        return out

    def undo(self) -> None:
        """Take every update back, last first. Raises if already undone, or if a
        weight was changed in between (the op's checksum)."""
        if not self.active:
            raise InputError("this edit was already undone")
        with torch.no_grad():
            for s in reversed(self.steps):
                if not s.record.used:  # a retry after a refused undo skips what is done
                    _rank1_undo(s.weight, s.record)
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.active:
            self.undo()
        return False


def _resolve_stats(lm, hparams: ROMEHparams, stats, cache_dir) -> dict:
    if not hparams.mom2_adjustment:
        return {}
    layers = hparams.layers
    if stats is None:
        return layer_stats(lm, layers, hparams.mom2_dataset, n_samples=hparams.mom2_n_samples,
                           dtype=hparams.mom2_dtype, cache_dir=cache_dir)
    if isinstance(stats, (LayerStats, torch.Tensor, str)) or hasattr(stats, "__fspath__"):
        if len(layers) != 1:
            raise InputError(f"one statistics object given for layers {layers}; pass a dict {{layer: stats}}")
        stats = {layers[0]: stats}
    if not isinstance(stats, dict):
        raise InputError(f"stats must be LayerStats, a tensor, a path or a dict of them, not {type(stats).__name__}")
    out = {}
    for L in layers:
        if L not in stats:
            raise InputError(f"no statistics given for layer {L} (have {sorted(stats)})")
        s = stats[L]
        if isinstance(s, torch.Tensor):
            s = LayerStats.from_tensor(L, s)
        elif not isinstance(s, LayerStats):
            s = load_stats(s, lm, L)
        fp = s.meta.get("fingerprint")
        if fp is not None and fp != lm.fingerprint():
            raise StatsCacheMismatch(f"the statistics for layer {L} were computed on model {s.meta.get('model')!r} "
                                     f"(fingerprint {fp}), not on {lm.name!r} ({lm.fingerprint()}): leave stats= "
                                     f"out to compute or reuse this model's, or compute them (kncore stats --layers {L})")
        if s.meta.get("layer", L) != L:
            raise StatsCacheMismatch(f"statistics for layer {s.meta.get('layer')} given for layer {L}: give "
                                     f"layer {L}'s, or leave stats= out to compute or reuse them")
        out[L] = s
    return out


def check_editable(lm, method: str = "ROME") -> None:
    """Refuse models the MLP-rewriting editors cannot edit."""
    if lm.is_mlm:
        raise InputError(f"{method} edits causal LMs; this is a masked LM")
    if getattr(lm.adapter, "encoder_decoder", False):
        raise InputError(f"{method} on T5 (encoder-decoder) edits the encoder: use kncore.t5.rome_edit "
                         "with kncore.t5.layer_stats (docs/architectures.md)")
    if lm.adapter.block_style not in (BLOCK_SEQUENTIAL, BLOCK_PARALLEL, BLOCK_SANDWICH):
        raise InputError(f"{method} needs a residual MLP output; block style {lm.adapter.block_style!r} "
                         "is not supported")


def edit(lm, request, hparams=None, *, stats=None, cache_dir=None) -> Edit:
    """Apply ROME edit(s) to ``lm`` in place and return the :class:`Edit`.

    ``request``: ``{"prompt", "subject", "target_new"}`` (``target_new`` a
    string or CounterFact's ``{"str": ...}``), or a list of them, applied one
    after the other (each computed on the model the previous ones left).
    ``hparams``: :class:`ROMEHparams`, a shipped name, a YAML/JSON path, a dict,
    or None for the model's shipped file. ``stats``: the second moments C for
    ``mom2_adjustment`` (LayerStats, a tensor, a statistics file, or a dict by
    layer); None computes or loads them with :func:`layer_stats` from
    ``hparams.mom2_dataset`` (cached under ``cache_dir``).
    """
    check_editable(lm)
    hp = hparams_for(lm) if hparams is None else load_hparams(hparams)
    hp.validate()
    hp.check_model(lm)
    reqs = [parse_request(r) for r in (request if isinstance(request, (list, tuple)) else [request])]
    if not reqs:
        raise InputError("no edit requests given")
    for r in reqs:  # fail before changing anything
        lm.target_ids(r.text(), r.target)
        locate(lm, r.prompt, r.subject, hp.fact_token)
    all_stats = _resolve_stats(lm, hp, stats, cache_dir)
    templates = context_templates(lm, hp)
    result = Edit(lm, hp)
    try:
        for r in reqs:
            for L in sorted(hp.layers):
                result.steps.append(_edit_one(lm, r, L, hp, templates, all_stats.get(L)))
    except BaseException:
        if result.steps:
            result.undo()
        raise
    return result


def _edit_one(lm, req: Request, layer: int, hp: ROMEHparams, templates: list[str], stats) -> EditStep:
    rows = build_rows(lm, req, templates, hp.fact_token, hp.kl_prompts)
    vd = _vec_dtype(lm)
    acts, outs = compute_keys(lm, layer, rows.key_rows(hp.fact_token))
    acts, outs = acts.to(vd), outs.to(vd)
    k_star = acts.mean(0)
    left = left_vector(lm, layer, k_star, hp, stats)
    delta, v_init, losses, p_target = optimise_delta(lm, layer, rows, hp)
    v_star = v_init + delta
    if hp.enable_random_prefix_keys:  # EasyEdit's r-ROME: key and old value averaged over templates
        key, value = k_star, outs.mean(0)
    else:
        key, value = acts[0], outs[0]
    right = (v_star - value) / torch.dot(key, left)
    W, a, b = _orient(lm, layer, left, right)
    # The update goes through a `.data` alias with its own version counter: the
    # op's undo refuses a tensor whose version moved since its update, which a
    # later edit of the same weight (undone first, LIFO) would otherwise cause.
    # The op's checksum of W's bits still catches any change in between.
    W = W.data
    with torch.no_grad():
        rec = _rank1(W, a, b)
    log.info("ROME: %r -> %r at layer %d, p(target) %.3f after %d evaluations", req.text(), req.target,
             layer, p_target, len(losses))
    return EditStep(req, layer, left, right, k_star, key, value, v_star, losses, p_target, W, rec)
