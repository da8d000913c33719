"""The one model runtime: a plain layer loop over the Hugging Face weights.

Every method in kncore (integrated gradients, causal tracing, ROME statistics
and edits, KN interventions) drives :func:`run`. It can

* start at any layer from given hidden states and stop early;
* capture any site at every layer in one forward, at chosen positions;
* apply a batch of different interventions in one forward (each :class:`Patch`
  names its own rows, layer, positions and replacement or scaling);
* reuse a key/value cache, so a later pass computes only the positions it is
  given (those >= p) from layer L up. With causal attention nothing at layers
  < L or positions < p can change, which is what makes IG and tracing fast.

Sites (TransformerLens hook names in brackets):

``embed``      token embeddings, layer 0 (``hook_embed``): the token-embedding
               module's output, before position embeddings, scaling or norm
               (:meth:`kncore.models.base.Adapter.embed_rest`); causal tracing
               adds its noise here
``resid_pre``  input of block L          (``blocks.{L}.hook_resid_pre``)
``attn_out``   attention output          (``blocks.{L}.hook_attn_out``)
``pre_act``    MLP pre-activation        (``blocks.{L}.mlp.hook_pre``; LLaMA: the gate projection)
``act``        input of down-projection  (``blocks.{L}.mlp.hook_post``; the neurons)
``mlp_out``    MLP output                (``blocks.{L}.hook_mlp_out``)
``resid_post`` output of block L         (``blocks.{L}.hook_resid_post``)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .models.base import Adapter, BLOCK_PARALLEL, BLOCK_SANDWICH, BLOCK_SEQUENTIAL

SITES = ("resid_pre", "attn_out", "pre_act", "act", "mlp_out", "resid_post")
EMBED_SITE = "embed"  # one per model: its layer is 0
NEURON_SITES = ("pre_act", "act")
_TL = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "attn_out": "blocks.{L}.hook_attn_out",
    "pre_act": "blocks.{L}.mlp.hook_pre",
    "act": "blocks.{L}.mlp.hook_post",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "resid_post": "blocks.{L}.hook_resid_post",
}
_TL_RE = {re.compile("^" + re.escape(v).replace(r"\{L\}", r"(\d+)") + "$"): k for k, v in _TL.items()}


def hook_name(site: str, layer: int) -> str:
    """TransformerLens-style name of a site, e.g. ``blocks.3.mlp.hook_post``."""
    return "hook_embed" if site == EMBED_SITE else _TL[site].format(L=layer)


def parse_site(key) -> tuple[str, int]:
    """Accept ``(site, layer)`` or a TransformerLens hook name."""
    if isinstance(key, str):
        if key == "hook_embed":
            return EMBED_SITE, 0
        for rx, site in _TL_RE.items():
            m = rx.match(key)
            if m:
                return site, int(m.group(1))
        raise ValueError(f"unknown hook name {key!r}; expected e.g. 'blocks.3.mlp.hook_post'")
    site, layer = key
    if site == EMBED_SITE:
        if int(layer) != 0:
            raise ValueError(f"the {EMBED_SITE!r} site has layer 0 only, got {layer}")
        return site, 0
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {(EMBED_SITE, *SITES)}")
    return site, int(layer)


@dataclass
class Patch:
    """One intervention at (site, layer) on some rows and positions.

    ``positions`` are absolute token positions (an int, a sequence, or None
    for every computed position). ``rows`` are batch rows (None: every row).
    The selected entries are taken in row-major order (rows ascending, then
    positions ascending); ``value`` replaces them and must broadcast to
    ``[k, width]`` for k selected entries (or to ``[k, len(neurons)]``).
    ``scale`` multiplies them (a float, ``[width]`` or ``[k, width]``).
    ``neurons`` restricts a neuron-site patch to some neuron indices.
    ``fn(x_sel) -> x_sel`` is the escape hatch for anything else.
    """

    site: str
    layer: int
    positions: int | Sequence[int] | None = None
    rows: Sequence[int] | torch.Tensor | None = None
    value: torch.Tensor | None = None
    scale: torch.Tensor | float | None = None
    neurons: Sequence[int] | torch.Tensor | None = None
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        self.site, self.layer = parse_site((self.site, self.layer))
        given = sum(x is not None for x in (self.value, self.scale, self.fn))
        if given != 1:
            raise ValueError("a Patch needs exactly one of value=, scale= or fn=")
        if self.neurons is not None and self.site not in NEURON_SITES:
            raise ValueError(f"neurons= only applies to neuron sites {NEURON_SITES}, not {self.site!r}")


@dataclass
class KVCache:
    """Keys and values of already-computed positions, per layer.

    ``k[l]`` and ``v[l]`` are ``[Bp, H_kv, P, Dh]`` (rotary applied);
    ``mask`` is ``[Bp, P]`` with True for real tokens (None: all real).
    Rows of a later pass map onto cache rows through ``past_rows``.
    """

    k: list
    v: list
    mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        for t in self.k:
            if t is not None:
                return t.shape[2]
        return 0

    def lengths(self) -> torch.Tensor:
        """Number of real tokens in each cache row."""
        ref = next(t for t in self.k if t is not None)
        if self.mask is None:
            return torch.full((ref.shape[0],), ref.shape[2], dtype=torch.long, device=ref.device)
        return self.mask.sum(-1)

    def truncate(self, P: int) -> "KVCache":
        """The first P positions (for example the prefix before the last token)."""
        cut = lambda ts: [None if t is None else t[:, :, :P] for t in ts]
        return KVCache(cut(self.k), cut(self.v), None if self.mask is None else self.mask[:, :P])

    def rows(self, idx: torch.Tensor) -> "KVCache":
        pick = lambda ts: [None if t is None else t[idx] for t in ts]
        return KVCache(pick(self.k), pick(self.v), None if self.mask is None else self.mask[idx])


@dataclass
class RunOutput:
    logits: torch.Tensor | None
    hidden: torch.Tensor  # output of the last computed block (before the final norm)
    captured: dict = field(default_factory=dict)  # (site, layer) -> tensor
    kv: KVCache | None = None  # keys/values of the computed positions (return_kv=True)
    position_ids: torch.Tensor | None = None

    def __getitem__(self, key):
        return self.captured[parse_site(key)]


def _norm_patches(patches: Iterable[Patch]) -> dict:
    table: dict = {}
    for p in patches:
        table.setdefault((p.site, p.layer), []).append(p)
    return table


def selection_mask(p: Patch, pos_ids: torch.Tensor) -> torch.Tensor:
    """[B, n] bool: the entries a patch selects in a run over ``pos_ids`` [B, n]."""
    B = pos_ids.shape[0]
    if p.positions is None:
        colmask = torch.ones_like(pos_ids, dtype=torch.bool)
    else:
        want = torch.as_tensor(p.positions, device=pos_ids.device).reshape(-1)
        colmask = (pos_ids[..., None] == want).any(-1)
    if p.rows is not None:
        rows = torch.as_tensor(p.rows, device=pos_ids.device, dtype=torch.long).reshape(-1)
        if rows.numel() and (rows.min() < 0 or rows.max() >= B):
            raise IndexError(f"patch rows out of range for batch of {B}")
        rowmask = torch.zeros(B, dtype=torch.bool, device=pos_ids.device)
        rowmask[rows] = True
        colmask = colmask & rowmask[:, None]
    return colmask


def _apply_patches(x, plist, pos_ids):
    """Apply the patches of one (site, layer) to x [B, n, w]."""
    for p in plist:
        if p.positions is None and p.rows is None:
            # Every entry, in row-major order: no index to build (also what
            # lets kncore.planner run patched calls on the meta device).
            sel = x.reshape(-1, x.shape[-1])
            if p.neurons is not None:
                nidx = torch.as_tensor(p.neurons, device=x.device, dtype=torch.long).reshape(-1)
                sel = sel.index_copy(1, nidx, _edit(sel[:, nidx], p).to(sel.dtype))
            else:
                sel = _edit(sel, p)
            x = sel.to(x.dtype).reshape(x.shape)
            continue
        ri, ci = selection_mask(p, pos_ids).nonzero(as_tuple=True)
        if ri.numel() == 0:
            continue
        sel = x[ri, ci]  # [k, w]
        if p.neurons is not None:
            nidx = torch.as_tensor(p.neurons, device=x.device, dtype=torch.long).reshape(-1)
            part = sel[:, nidx]
            part = _edit(part, p)
            sel = sel.index_copy(1, nidx, part.to(sel.dtype))
        else:
            sel = _edit(sel, p)
        x = x.index_put((ri, ci), sel.to(x.dtype))
    return x


def _edit(sel, p: Patch):
    if p.fn is not None:
        return p.fn(sel)
    if p.scale is not None:
        s = p.scale
        return sel * (torch.as_tensor(s, dtype=sel.dtype, device=sel.device) if not torch.is_tensor(s) else s.to(sel.dtype))
    v = p.value.to(device=sel.device, dtype=sel.dtype)
    try:
        return torch.broadcast_to(v, sel.shape)
    except RuntimeError:
        raise ValueError(f"patch value of shape {tuple(v.shape)} does not broadcast to the "
                         f"{tuple(sel.shape)} entries selected at {p.site} layer {p.layer}") from None


def _capture(store, key, x, cap_idx, keep_grad):
    """Store x at the capture positions: cap_idx None (all) or [B, k] columns."""
    if cap_idx is not None:
        x = torch.gather(x, 1, cap_idx[..., None].expand(-1, -1, x.shape[-1]))
    store[key] = x if keep_grad else x.detach()


def _shared_slots(past_rows: torch.Tensor, Bp: int):
    """When many rows read the same cache rows (IG's step rows, tracing's
    patched copies), attention can read each cache row once instead of copying
    it for every row: row b gets slot ``slot[b]`` among the rows of its cache
    row. Returns (slot, most rows per cache row), or None when rows do not
    share (or are so unbalanced that the padded slots would double the work)."""
    B = len(past_rows)
    if B <= Bp:
        return None
    counts = torch.bincount(past_rows, minlength=Bp)
    c_max = int(counts.max())
    if Bp * c_max > 2 * B:
        return None
    order = torch.argsort(past_rows, stable=True)
    starts = counts.cumsum(0) - counts
    slot = torch.empty_like(past_rows)
    slot[order] = torch.arange(B, device=past_rows.device) - starts[past_rows[order]]
    return slot, c_max


def _attention_shared(ad: Adapter, L: int, q, k, v, allowed, past_k, past_v, past_rows, slot, c_max):
    """Attention of new tokens q/k/v [B, H(_kv), n, Dh] over an un-copied cache
    past_k/past_v [Bp, H_kv, P, Dh] (row b reads cache row past_rows[b]).

    The rows' queries are scattered into [Bp, H_kv, c_max * rep * n] slots so
    each cache row is one batched matmul operand; scores and softmax in fp32
    (fp64 for fp64 models). Same result as gathering the cache per row; on
    GPT-2-small IG step rows (720 rows, 11 cached positions) the per-row copies
    and their gradients were 8% of the run (bench/bench_ig.py)."""
    B, H, n, Dh = q.shape
    Bp, Hkv, P, _ = past_k.shape
    rep = H // Hkv
    cd = torch.promote_types(q.dtype, torch.float32)
    scale = ad.attn_scale(L)

    def to_slots(t):  # [B, Hkv, rep*n, X] -> [Bp, Hkv, c_max*rep*n, X]
        z = t.new_zeros(Bp, Hkv, c_max, *t.shape[2:])
        z[past_rows, :, slot] = t
        return z.reshape(Bp, Hkv, c_max * t.shape[2], t.shape[3])

    def from_slots(t):  # [Bp, Hkv, c_max*rep*n, X] -> [B, Hkv, rep*n, X]
        return t.reshape(Bp, Hkv, c_max, rep * n, t.shape[-1])[past_rows, :, slot]

    qf = q.to(cd)
    s_past = from_slots(torch.matmul(to_slots(qf.reshape(B, Hkv, rep * n, Dh)), past_k.to(cd).transpose(-1, -2)))
    s_past = s_past.reshape(B, H, n, P)
    k_rep = k.repeat_interleave(rep, dim=1) if rep > 1 else k
    v_rep = v.repeat_interleave(rep, dim=1) if rep > 1 else v
    s_new = torch.matmul(qf, k_rep.to(cd).transpose(-1, -2))
    s = _softcap(ad, L, torch.cat([s_past, s_new], dim=-1) * scale)
    w = s.masked_fill(~allowed[:, None], torch.finfo(cd).min).softmax(-1)
    o_past = from_slots(torch.matmul(to_slots(w[..., :P].reshape(B, Hkv, rep * n, P)), past_v.to(cd)))
    o = o_past.reshape(B, H, n, Dh) + torch.matmul(w[..., P:], v_rep.to(cd))
    return o.to(v.dtype)


def _softcap(ad: Adapter, L: int, s):
    c = ad.attn_softcap(L)
    return s if c is None else torch.tanh(s / c) * c


def _allowed(ad: Adapter, L: int, key_valid, pos_ids, P: int, n: int):
    """[B, n, P + n] bool: which keys each new token attends to. Cached keys
    sit at positions 0..P-1 of their row (the cache is right-padded), new ones
    at ``pos_ids``; a sliding window keeps query_pos - key_pos < W."""
    B = key_valid.shape[0]
    allowed = key_valid[:, None, :].expand(B, n, P + n)
    if ad.causal:
        i = torch.arange(n, device=key_valid.device)[:, None]
        j = torch.arange(P + n, device=key_valid.device)[None, :]
        allowed = allowed & ((j < P) | (j - P <= i))[None]
    W = ad.attn_window(L)
    if W is not None:
        kpos = torch.cat([torch.arange(P, device=pos_ids.device).expand(B, P), pos_ids], dim=1)
        allowed = allowed & ((pos_ids[:, :, None] - kpos[:, None, :]) < W)
    return allowed


def keys_values(ad: Adapter, L: int, hidden: torch.Tensor, position_ids: torch.Tensor):
    """The keys and values [B, H_kv, n, Dh] that block L's attention makes
    from its input ``hidden`` [B, n, d] (as :func:`run` computes them, without
    the rest of the block): all that a later position needs of these ones."""
    _, k, v = ad.qkv(L, ad.ln1(L, hidden), position_ids)
    return k, v


def attention(ad: Adapter, L: int, x, pos_ids, key_valid, past_k, past_v, shared=None):
    """Self-attention of block L for the new tokens x [B, n, d].

    past_k/past_v: [B, H_kv, P, Dh] or None; with ``shared`` = (past_rows,
    slot, c_max) they are the un-copied cache [Bp, H_kv, P, Dh] (see
    :func:`_shared_slots`). key_valid: [B, P + n] bool.
    Returns (attn_out [B, n, d], k_new, v_new).
    """
    q, k, v = ad.qkv(L, x, pos_ids)
    if shared is not None:
        B, H, n, Dh = q.shape
        P = past_k.shape[2]
        allowed = _allowed(ad, L, key_valid, pos_ids, P, n)
        o = _attention_shared(ad, L, q, k, v, allowed, past_k, past_v, *shared)
        return ad.attn_proj(L, o.transpose(1, 2).reshape(B, n, H * Dh)), k, v
    if past_k is not None:
        k_all = torch.cat([past_k.to(k.dtype), k], dim=2)
        v_all = torch.cat([past_v.to(v.dtype), v], dim=2)
    else:
        k_all, v_all = k, v
    B, H, n, Dh = q.shape
    P = k_all.shape[2] - n
    allowed = _allowed(ad, L, key_valid, pos_ids, P, n)
    rep = ad.n_heads // ad.n_kv_heads
    if rep > 1:
        k_rep, v_rep = k_all.repeat_interleave(rep, dim=1), v_all.repeat_interleave(rep, dim=1)
    else:
        k_rep, v_rep = k_all, v_all
    scale = ad.attn_scale(L)
    if ad.attn_upcast() or q.dtype != torch.float32 or ad.attn_softcap(L) is not None:
        # Scores and softmax in fp32 (as HF does for GPT-J, and as every HF
        # eager path does for the softmax); probabilities cast back to v's dtype.
        # SDPA has no soft-capping: capped scores take this path too.
        up = torch.promote_types(q.dtype, torch.float32)  # fp64 stays fp64
        s = _softcap(ad, L, torch.matmul(q.to(up), k_rep.to(up).transpose(-1, -2)) * scale)
        s = s.masked_fill(~allowed[:, None], torch.finfo(s.dtype).min)
        o = torch.matmul(s.softmax(-1).to(v_rep.dtype), v_rep)
    else:
        o = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=allowed[:, None], scale=scale)
    o = o.transpose(1, 2).reshape(B, n, H * Dh)
    return ad.attn_proj(L, o), k, v


def site_fn(table, wanted, captured, cap_idx, keep_grad, pos_ids):
    """``site(name, L, x) -> x``: applies the patches of (name, L) to x and
    captures it where wanted (the one hook point of every layer loop)."""
    def site(name, L, x, done=()):
        ps = table.get((name, L))
        if ps and done:  # applied already (by the fused MLP kernel)
            ps = [p for p in ps if not any(p is d for d in done)]
        if ps:
            x = _apply_patches(x, ps, pos_ids)
        if (name, L) in wanted:
            _capture(captured, (name, L), x, cap_idx, keep_grad)
        return x
    return site


def check_run_inputs(N: int, start_layer: int, stop_layer: int | None, input_ids, hidden):
    """(stop layer, the given input) of a run over blocks start..stop-1 of N;
    a one-line error for a bad layer range or not exactly one input."""
    stop = N if stop_layer is None else stop_layer
    if not (0 <= start_layer <= stop <= N):
        raise ValueError(f"layers must satisfy 0 <= start ({start_layer}) <= stop ({stop}) <= {N}")
    if (input_ids is None) == (hidden is None):
        raise ValueError("give exactly one of input_ids= or hidden=")
    if input_ids is not None and start_layer != 0:
        raise ValueError("input_ids start at layer 0; give hidden= to start at a later layer")
    return stop, (input_ids if input_ids is not None else hidden)


def check_decoder_only(ad) -> None:
    """Refuse an encoder-decoder model (T5), which has its own loop."""
    if getattr(ad, "encoder_decoder", False):
        raise ValueError(f"{ad.arch!r} is an encoder-decoder model: use kncore.t5 (target_probs, attribute, "
                         "trace, edit_neurons) or kncore.runtime_t5, not the decoder-only runtime")


def patch_setup(ad, patches, capture, capture_positions, input_ids, attention_mask, position_ids):
    """(patch table by (site, layer), wanted captures, each row's last real
    column, capture columns or None) of one run over position_ids [B, n]."""
    # Patches held on the adapter (kncore.patch_neurons) apply to every run,
    # after the call's own: a Patch, or a callable that builds Patches for
    # this call's (input_ids, attention_mask, position_ids).
    held = []
    for hp in ad.persistent_patches:
        held.extend([hp] if isinstance(hp, Patch) else hp(input_ids, attention_mask, position_ids))
    table = _norm_patches([*patches, *held])
    wanted = {parse_site(c) for c in capture}
    last_col = attention_mask.long().cumsum(1).argmax(1)  # each row's last real token
    if capture_positions is None:
        cap_idx = None
    elif isinstance(capture_positions, str):
        if capture_positions != "last":
            raise ValueError("capture_positions must be None, 'last' or a tensor of positions")
        cap_idx = last_col[:, None]
    else:
        cp = torch.as_tensor(capture_positions, device=position_ids.device).long()
        cp = cp[:, None] if cp.dim() == 1 else cp
        cap_idx = cp - position_ids[:, :1]  # absolute -> column
        if cap_idx.device.type != "meta" and ((cap_idx < 0).any() or (cap_idx >= position_ids.shape[1]).any()):
            raise ValueError("capture_positions outside the computed positions")
    return table, wanted, last_col, cap_idx


def run(
    ad: Adapter,
    input_ids: torch.Tensor | None = None,
    *,
    hidden: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    start_layer: int = 0,
    stop_layer: int | None = None,
    past: KVCache | None = None,
    past_rows: torch.Tensor | None = None,
    patches: Iterable[Patch] = (),
    capture: Iterable = (),
    capture_positions: torch.Tensor | str | None = None,
    capture_grad: bool = False,
    return_kv: bool = False,
    logits: str | torch.Tensor | None = "all",
) -> RunOutput:
    """Run blocks ``start_layer .. stop_layer-1`` on the given tokens.

    Either ``input_ids`` [B, n] (embedded first; requires start_layer == 0)
    or ``hidden`` [B, n, d] (the input of block ``start_layer``).
    ``attention_mask`` [B, n]: 1 for real tokens (right padding).
    ``past`` holds keys/values of earlier positions for every layer that is
    run; ``past_rows`` [B] maps each row to a cache row (default: row i to
    row i, or every row to row 0 when the cache has one row).
    ``capture_positions``: None (every computed position), ``"last"`` (each
    row's last real token) or absolute positions [B] / [B, k].
    ``logits``: ``"all"``, ``"last"``, None (no head), or absolute positions [B].
    ``ad.persistent_patches`` are applied too.
    """
    check_decoder_only(ad)
    N = ad.n_layers
    stop, ref = check_run_inputs(N, start_layer, stop_layer, input_ids, hidden)
    B, n = ref.shape[0], ref.shape[1]
    if n == 0:
        raise ValueError("nothing to compute: zero positions")
    dev = ref.device
    if attention_mask is None:
        attention_mask = torch.ones(B, n, dtype=torch.bool, device=dev)
    attention_mask = attention_mask.to(device=dev, dtype=torch.bool)
    if attention_mask.shape != (B, n):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != {(B, n)}")

    if past is not None:
        if past_rows is None:
            Bp = next(t for t in past.k if t is not None).shape[0]
            past_rows = torch.zeros(B, dtype=torch.long, device=dev) if Bp == 1 and B != 1 else torch.arange(B, device=dev)
        # The row sharing is decided where past_rows lives: kncore.planner runs this
        # on the meta device with past_rows on the CPU, so that the plan takes
        # the same branch as the real run.
        shared = _shared_slots(past_rows, next(t for t in past.k if t is not None).shape[0])
        if shared is not None:
            shared = (shared[0].to(dev), shared[1])
        past_rows = past_rows.to(dev)
        past_valid = (torch.ones(len(past_rows), past.length, dtype=torch.bool, device=dev)
                      if past.mask is None else past.mask[past_rows].to(dev))
        key_valid = torch.cat([past_valid, attention_mask], dim=1)
        start_pos = past_valid.sum(-1)
    else:
        key_valid = attention_mask
        start_pos = torch.zeros(B, dtype=torch.long, device=dev)
    if position_ids is None:
        position_ids = start_pos[:, None] + torch.arange(n, device=dev)[None]
    position_ids = position_ids.to(dev)

    table, wanted, last_col, cap_idx = patch_setup(ad, patches, capture, capture_positions, input_ids,
                                                   attention_mask, position_ids)
    captured: dict = {}
    kv_k = [None] * N
    kv_v = [None] * N

    site = site_fn(table, wanted, captured, cap_idx, capture_grad, position_ids)

    if input_ids is not None:
        h = ad.embed_rest(site(EMBED_SITE, 0, ad.embedding_module()(input_ids)), position_ids)
    else:
        h = hidden
    for L in range(start_layer, stop):
        h = site("resid_pre", L, h)
        pk = pv = sh = None
        if past is not None:
            if shared is None:
                pk, pv = past.k[L][past_rows], past.v[L][past_rows]
            else:
                pk, pv, sh = past.k[L], past.v[L], (past_rows, *shared)
        x = ad.ln1(L, h)
        a, k, v = attention(ad, L, x, position_ids, key_valid, pk, pv, sh)
        if return_kv:
            kv_k[L], kv_v[L] = k, v
        a = site("attn_out", L, a)
        if ad.block_style == BLOCK_SEQUENTIAL:
            h = h + a
            mlp_in = ad.ln2(L, h)
        elif ad.block_style == BLOCK_PARALLEL:
            mlp_in = x if ad.mlp_norm_shared else ad.ln2(L, h)
        elif ad.block_style == BLOCK_SANDWICH:
            h = h + ad.post_attn_norm(L, a)
            mlp_in = ad.ln2(L, h)
        else:  # post-LN
            h = ad.post_attn_norm(L, h + a)
            mlp_in = h
        m = _mlp(ad, L, mlp_in, site, table, position_ids, keep_pre=("pre_act", L) in wanted)
        if ad.block_style == BLOCK_SEQUENTIAL:
            h = h + m
        elif ad.block_style == BLOCK_PARALLEL:
            h = h + a + m
        elif ad.block_style == BLOCK_SANDWICH:
            h = h + ad.post_mlp_norm(L, m)
        else:
            h = ad.post_mlp_norm(L, h + m)
        h = site("resid_post", L, h)

    out_logits = None
    if logits is not None and stop == N:
        if isinstance(logits, str):
            if logits == "all":
                out_logits = ad.final(h)
            elif logits == "last":
                out_logits = ad.final(h[torch.arange(B, device=dev), last_col])
            else:
                raise ValueError("logits must be 'all', 'last', None or a tensor of positions")
        else:
            col = torch.as_tensor(logits, device=dev).long() - position_ids[:, 0]
            out_logits = ad.final(h[torch.arange(B, device=dev), col])
    kv = None
    if return_kv:
        kv = KVCache(kv_k, kv_v, attention_mask)
    return RunOutput(out_logits, h, captured, kv, position_ids)


def _mlp(ad: Adapter, L: int, x, site, table, position_ids, keep_pre: bool = False):
    # A full replacement of mlp_out (every row, every position, a value) makes
    # the MLP itself dead work: IG's step rows use this.
    full = table.get(("mlp_out", L))
    if full and len(full) == 1 and full[0].value is not None and full[0].rows is None \
            and full[0].positions is None and full[0].neurons is None:
        return site("mlp_out", L, x[..., :0].new_empty(x.shape))
    # On CUDA one Triton pass computes the up-projection(s), the activation and
    # the pre-activation (kncore.ops.mlp_capture); it returns None, after logging
    # why, where it does not apply. The CPU keeps the plain path below
    # (KNCORE_KERNELS=force sends CPU tensors through the Triton interpreter: tests).
    from .ops.dispatch import wants_kernels

    fused, done = None, ()
    if wants_kernels(x.device):
        from .ops.mlp_capture import fused_pre_act
        fused = fused_pre_act(ad, L, x, table, position_ids)
    if fused is not None:
        # done: the act patches the kernel's epilogue applied (kncore.patch_neurons' scales)
        pre, act, done = fused
        site("pre_act", L, pre)  # capture only: a pre_act patch sends the layer to the plain path
    else:
        pre, aux = ad.mlp_pre(L, x)
        pre = site("pre_act", L, pre)
        # The activation may overwrite the pre-activation (one [tokens, d_ff]
        # tensor less to allocate: -4% on a GPT-2-medium trace on the CPU) unless
        # a capture holds it or autograd needs it.
        inplace = not keep_pre and not (torch.is_grad_enabled() and pre.requires_grad)
        act = ad.mlp_act(L, pre, aux, inplace=inplace)
    act = site("act", L, act, done)
    return site("mlp_out", L, ad.mlp_down(L, act))
