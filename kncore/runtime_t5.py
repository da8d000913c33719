"""The encoder-decoder runtime (T5): an encoder pass, then a decoder layer loop.

What is new beside :mod:`kncore.runtime` (whose patches, captures, key/value
cache, masks and MLP path this module reuses):

* :func:`encode` runs the encoder stack (bidirectional self-attention with the
  encoder's relative position bias) and projects the final encoder states into
  every decoder layer's cross-attention keys and values once (:class:`Encoded`);
* :func:`decode` runs decoder blocks: causal self-attention with the decoder's
  relative position bias over a :class:`~kncore.runtime.KVCache` of earlier
  positions, then cross-attention over the cached encoder keys/values, then the
  MLP. Like :func:`kncore.runtime.run` it starts at any layer from given hidden
  states, takes :class:`~kncore.runtime.Patch` es, captures sites and returns
  the new keys/values, so a later pass computes only the positions it is given.

Sites are those of :mod:`kncore.runtime`, per stack. In the decoder
``attn_out`` is the sum of both attention sublayers' outputs (self-attention
plus cross-attention), which is what the block adds to the residual stream
before the MLP: h + attn_out is the MLP's residual input, as in a pre-LN
decoder-only block. Attention scores are not scaled (T5); scores, bias and
softmax are computed in fp32 (fp64 for fp64 models).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from .models.t5 import T5Adapter, T5StackAdapter
from .runtime import (KVCache, Patch, RunOutput, _allowed, _mlp, _norm_patches, check_run_inputs, parse_site,
                      patch_setup, site_fn)


@dataclass
class Encoded:
    """Encoder output of B prompts: ``hidden`` [B, S, d] (after the final norm),
    ``mask`` [B, S] bool, the cross-attention keys/values of every decoder layer
    (``k[L]``, ``v[L]`` [B, H, S, Dh]) and any captured encoder sites."""
    hidden: torch.Tensor
    mask: torch.Tensor
    k: list
    v: list
    captured: dict = field(default_factory=dict)

    def __getitem__(self, key):
        return self.captured[parse_site(key)]


def _attend(q, k, v, bias, allowed):
    """softmax(q k^T + bias) v without scaling; [B, H, n, Dh] -> [B, n, H*Dh]."""
    up = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(up), k.to(up).transpose(-1, -2))
    if bias is not None:
        s = s + bias.to(up)
    s = s.masked_fill(~allowed[:, None], torch.finfo(up).min)
    o = torch.matmul(s.softmax(-1).to(v.dtype), v)
    B, H, n, Dh = o.shape
    return o.transpose(1, 2).reshape(B, n, H * Dh)


def encode(ad: T5Adapter, input_ids: torch.Tensor | None = None, *, hidden: torch.Tensor | None = None,
           attention_mask: torch.Tensor | None = None, start_layer: int = 0, stop_layer: int | None = None,
           patches: Iterable[Patch] = (), capture: Iterable = (), capture_grad: bool = False,
           cross: bool = True) -> Encoded:
    """Run encoder blocks ``start_layer .. stop_layer-1`` on input_ids [B, S]
    (or ``hidden`` [B, S, d], the input of block ``start_layer``). With the
    whole stack run, ``hidden`` of the result is the final-normed output and
    (``cross``) the decoder's cross-attention keys/values are computed once."""
    enc: T5StackAdapter = ad.encoder
    N = enc.n_layers
    stop, ref = check_run_inputs(N, start_layer, stop_layer, input_ids, hidden)
    B, S = ref.shape[:2]
    dev = ref.device
    mask = (torch.ones(B, S, dtype=torch.bool, device=dev) if attention_mask is None
            else attention_mask.to(device=dev, dtype=torch.bool))
    pos = torch.arange(S, device=dev).expand(B, S)
    # no persistent patches here: kncore.patch_neurons' layers are the decoder's
    table = _norm_patches(patches)
    wanted = {parse_site(c) for c in capture}
    captured: dict = {}
    site = site_fn(table, wanted, captured, None, capture_grad, pos)
    allowed = mask[:, None, :].expand(B, S, S)
    bias = enc.position_bias(pos[:1], pos[:1])  # [1, H, S, S], shared by every block
    h = enc.embed(input_ids) if input_ids is not None else hidden
    for L in range(start_layer, stop):
        h = site("resid_pre", L, h)
        q, k, v = enc.qkv(L, enc.ln1(L, h))
        a = site("attn_out", L, enc.attn_proj(L, _attend(q, k, v, bias, allowed)))
        h = h + a
        m = _mlp(enc, L, enc.ln2(L, h), site, table, pos, keep_pre=("pre_act", L) in wanted)
        h = site("resid_post", L, h + m)
    ks, vs = [None] * ad.n_layers, [None] * ad.n_layers
    if stop == N:
        h = enc.final_norm(h)
        if cross:
            for L in range(ad.n_layers):
                ks[L], vs[L] = ad.cross_kv(L, h)
    return Encoded(h, mask, ks, vs, captured)


def decode(ad: T5Adapter, input_ids: torch.Tensor | None = None, *, enc: Encoded,
           hidden: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
           start_layer: int = 0, stop_layer: int | None = None, past: KVCache | None = None,
           past_rows: torch.Tensor | None = None, enc_rows: torch.Tensor | None = None,
           patches: Iterable[Patch] = (), capture: Iterable = (),
           capture_positions: torch.Tensor | str | None = None, capture_grad: bool = False,
           return_kv: bool = False, logits: str | torch.Tensor | None = "all") -> RunOutput:
    """Run decoder blocks ``start_layer .. stop_layer-1`` on decoder tokens
    input_ids [B, n] (or ``hidden`` [B, n, d]) over the encoder output ``enc``.

    ``past``/``past_rows``, ``attention_mask`` (right padding), ``capture*``,
    ``return_kv`` and ``logits`` are as in :func:`kncore.runtime.run`.
    ``enc_rows`` [B] maps each row to a row of ``enc`` (default: ``past_rows``
    when given, else row i to row i, or every row to row 0 when ``enc`` has one
    row). ``ad.persistent_patches`` (kncore.patch_neurons) apply too.
    """
    N = ad.n_layers
    stop, ref = check_run_inputs(N, start_layer, stop_layer, input_ids, hidden)
    B, n = ref.shape[:2]
    if n == 0:
        raise ValueError("nothing to compute: zero positions")
    dev = ref.device
    mask = (torch.ones(B, n, dtype=torch.bool, device=dev) if attention_mask is None
            else attention_mask.to(device=dev, dtype=torch.bool))
    if mask.shape != (B, n):
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != {(B, n)}")
    Be = enc.hidden.shape[0]
    if past is not None:
        Bp = next(t for t in past.k if t is not None).shape[0]
        if past_rows is None:
            past_rows = torch.zeros(B, dtype=torch.long, device=dev) if Bp == 1 and B != 1 \
                else torch.arange(B, device=dev)
        past_rows = past_rows.to(dev)
        past_valid = (torch.ones(B, past.length, dtype=torch.bool, device=dev)
                      if past.mask is None else past.mask[past_rows].to(dev))
        key_valid = torch.cat([past_valid, mask], dim=1)
        start_pos = past_valid.sum(-1)
    else:
        key_valid, start_pos = mask, torch.zeros(B, dtype=torch.long, device=dev)
    if enc_rows is None:
        enc_rows = past_rows if past_rows is not None else (
            torch.zeros(B, dtype=torch.long, device=dev) if Be == 1 and B != 1 else torch.arange(B, device=dev))
    enc_rows = enc_rows.to(dev)
    if len(enc_rows) != B or (len(enc_rows) and int(enc_rows.max()) >= Be):
        raise ValueError(f"enc_rows must map each of {B} rows to one of the encoder's {Be} rows")
    pos = start_pos[:, None] + torch.arange(n, device=dev)[None]
    P = key_valid.shape[1] - n
    kpos = torch.cat([torch.arange(P, device=dev).expand(B, P), pos], dim=1)
    self_bias = ad.position_bias(pos, kpos)  # [B, H, n, P + n], shared by every block
    allowed = _allowed(ad, 0, key_valid, pos, P, n)
    cross_allowed = enc.mask[enc_rows][:, None, :].expand(B, n, enc.mask.shape[1])

    table, wanted, last_col, cap_idx = patch_setup(ad, patches, capture, capture_positions, input_ids, mask, pos)
    captured: dict = {}
    site = site_fn(table, wanted, captured, cap_idx, capture_grad, pos)
    kv_k, kv_v = [None] * N, [None] * N

    h = ad.embed(input_ids) if input_ids is not None else hidden
    for L in range(start_layer, stop):
        h = site("resid_pre", L, h)
        q, k, v = ad.qkv(L, ad.ln1(L, h))
        if return_kv:
            kv_k[L], kv_v[L] = k, v
        if past is not None:
            k = torch.cat([past.k[L][past_rows].to(k.dtype), k], dim=2)
            v = torch.cat([past.v[L][past_rows].to(v.dtype), v], dim=2)
        sa = ad.attn_proj(L, _attend(q, k, v, self_bias, allowed))
        ca = ad.cross_proj(L, _attend(ad.cross_q(L, ad.ln_cross(L, h + sa)), enc.k[L][enc_rows],
                                      enc.v[L][enc_rows], None, cross_allowed))
        h = h + site("attn_out", L, sa + ca)
        m = _mlp(ad, L, ad.ln2(L, h), site, table, pos, keep_pre=("pre_act", L) in wanted)
        h = site("resid_post", L, h + m)

    out_logits = None
    if logits is not None and stop == N:
        rows = torch.arange(B, device=dev)
        if isinstance(logits, str):
            if logits == "all":
                out_logits = ad.final(h)
            elif logits == "last":
                out_logits = ad.final(h[rows, last_col])
            else:
                raise ValueError("logits must be 'all', 'last', None or a tensor of positions")
        else:
            out_logits = ad.final(h[rows, torch.as_tensor(logits, device=dev).long() - pos[:, 0]])
    kv = KVCache(kv_k, kv_v, mask) if return_kv else None
    return RunOutput(out_logits, h, captured, kv, pos)


def shift_right(ad: T5Adapter, target_ids: torch.Tensor) -> torch.Tensor:
    """Decoder inputs for teacher forcing: [start, t_0, .., t_{n-2}], so decoder
    position q predicts target[q] (HF's ``_shift_right``)."""
    out = target_ids.new_full(target_ids.shape, ad.start_id)
    out[..., 1:] = target_ids[..., :-1]
    return out
