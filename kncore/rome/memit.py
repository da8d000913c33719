"""Batch editors on ROME's machinery: MEMIT (Meng et al. 2023) and EMMET
(Gupta et al. 2024).

For a batch of requests and edit layers ``L_1 < ... < L_n`` (MEMIT's
``memit_main.execute_memit``, followed where it matters):

1. z_j = h + delta_j: the output of the last edit layer L_n at request j's
   subject token, optimised by ROME's v* loop (:func:`kncore.rome.editing.
   optimise_deltas`: suffix cache, every request of a chunk of
   ``batch_requests`` in one batch, each with its own delta, loss, early stop
   and clamp ``clamp_norm_factor * ||h||``).
2. For each edit layer L_i in order, on the model the previous layers' updates
   left: the keys K at L_i (down-projection input at the subject, averaged
   within each group of context templates, then across groups, as MEMIT's
   ``compute_ks``), the current output h_j of L_n on the bare prompt, the
   residual R = z - h, and its share for this layer ``R / (n - i)``.
3. The update ``Delta = (R / (n - i)) A^T`` with A from
   :mod:`kncore.rome.solver` (MEMIT: ``(lambda C + K K^T)^-1 K``; EMMET:
   ``C^-1 K (K^T C^-1 K + ridge I)^-1``), applied through the rank-k op, whose
   record undoes it bit for bit.

A list of batches (``[[r1, r2], [r3]]``) is applied one batch after the
other, each computed on the model the previous ones left; one
:class:`kncore.rome.Edit` holds every update and ``undo()`` takes them all
back. A failed batch undoes what was applied, so the model is left unchanged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..lm import InputError
from .editing import (Edit, Request, _orient, _rank1, _resolve_stats, _vec_dtype, build_rows, check_editable,
                      locate, optimise_deltas, parse_request)
from .hparams import ROMEHparams, hparams_for, load_hparams
from .solver import emmet_keys, memit_keys
from .templates import context_templates

log = logging.getLogger("kncore")

# Rows per forward when computing keys (a SmolLM2 row of ~20 tokens keeps
# about 2 MB of activations per row alive up to the last edit layer).
KEY_ROWS = 256


@dataclass
class MEMITHparams(ROMEHparams):
    """MEMIT's hyper-parameters (defaults: MEMIT's GPT-2 XL file).

    On top of :class:`ROMEHparams`: ``mom2_update_weight`` (lambda in
    ``lambda C + K K^T``), ``layer_selection`` (MEMIT's; only ``"all"``),
    and ``batch_requests`` (kncore: requests optimised together in the v*
    loop; it changes speed and memory, not the result). The context templates
    are MEMIT's: the bare prompt and 5 generated prefixes of 10 tokens
    (``[[10, 5]]``), and the keys are averaged per template group.
    """

    METHOD: ClassVar[str] = "MEMIT"
    ALG_NAMES: ClassVar[tuple] = ("MEMIT",)
    SUBDIR: ClassVar[str] = "MEMIT"

    layers: list = field(default_factory=lambda: [13, 14, 15, 16, 17])
    clamp_norm_factor: float = 0.75
    context_template_length_params: list = field(default_factory=lambda: [[10, 5]])
    mom2_update_weight: float = 20000.0
    layer_selection: str = "all"
    batch_requests: int = 16

    def validate(self):
        super().validate()
        if self.layer_selection != "all":
            raise InputError(f"hparams.layer_selection {self.layer_selection!r}: only 'all' is supported")
        if not float(self.mom2_update_weight) > 0:
            raise InputError(f"hparams.mom2_update_weight must be > 0, got {self.mom2_update_weight}")
        if int(self.batch_requests) < 1:
            raise InputError(f"hparams.batch_requests must be >= 1, got {self.batch_requests}")
        return self


@dataclass
class EMMETHparams(MEMITHparams):
    """EMMET's: MEMIT's fields plus ``emmet_lambda`` (ridge on the B x B
    system K^T C^-1 K; EMMET's default 0.1) and ``update_norm_lambda`` (added
    to lambda C's diagonal; default 0)."""

    METHOD: ClassVar[str] = "EMMET"
    ALG_NAMES: ClassVar[tuple] = ("EMMET",)
    SUBDIR: ClassVar[str] = "EMMET"

    emmet_lambda: float = 0.1
    update_norm_lambda: float = 0.0

    def validate(self):
        super().validate()
        for name in ("emmet_lambda", "update_norm_lambda"):
            if float(getattr(self, name)) < 0:
                raise InputError(f"hparams.{name} must be >= 0, got {getattr(self, name)}")
        return self


METHODS = {"MEMIT": MEMITHparams, "EMMET": EMMETHparams}


@dataclass
class BatchStep:
    """One layer's rank-B update ``W += right left^T`` (in the logical
    [d_model, d_ff] orientation) for a batch of requests."""

    requests: list
    layer: int
    left: torch.Tensor       # adjusted keys A [d_ff, B]
    right: torch.Tensor      # this layer's share of the residual [d_model, B]
    keys: torch.Tensor       # K [d_ff, B] (float64)
    residual: torch.Tensor   # z - h at the last edit layer before this update [d_model, B] (float64)
    z: torch.Tensor          # targets at the last edit layer [d_model, B]
    losses: list = field(default_factory=list, repr=False)
    p_target: list = field(default_factory=list)
    weight: torch.Tensor | None = field(default=None, repr=False)
    record: object = field(default=None, repr=False)

    def describe(self) -> str:
        return f"{len(self.requests)} requests @L{self.layer}"


def template_groups(hp: ROMEHparams, templates: list) -> list[int]:
    """Sizes of the context-template groups (bare prompt, then one per length)."""
    n = len(hp.context_prompts)
    sizes = [1] + [(c // n) * n for _, c in hp.context_template_length_params if c // n > 0]
    if sum(sizes) != len(templates):
        raise AssertionError(f"template groups {sizes} do not cover {len(templates)} templates")
    return sizes


def split_batches(requests) -> list[list]:
    """A request, a list of requests (one batch) or a list of lists (batches in order)."""
    if isinstance(requests, (dict, Request)):
        return [[requests]]
    if not isinstance(requests, (list, tuple)):
        raise InputError(f"requests must be a dict, a list of them or a list of lists, not {type(requests).__name__}")
    if not requests:
        raise InputError("no edit requests given (an empty batch)")
    if all(isinstance(r, (list, tuple)) for r in requests):
        for i, b in enumerate(requests):
            if not b:
                raise InputError(f"batch {i} of {len(requests)} is empty")
        return [list(b) for b in requests]
    if any(isinstance(r, (list, tuple)) for r in requests):
        raise InputError("requests mix single requests and batches (lists); give one list or a list of lists")
    return [list(requests)]


def _relation(raw, req: Request) -> str:
    if isinstance(raw, dict):
        rr = raw.get("requested_rewrite", raw)
        rel = rr.get("relation_id") or raw.get("relation_id")
        if rel:
            return str(rel)
    return req.prompt


def check_batch(lm, raws: list, hp: ROMEHparams) -> list[Request]:
    """Parse a batch and refuse what would make the edit ill-defined, before any change."""
    reqs = [parse_request(r) for r in raws]
    seen: dict = {}
    for i, (raw, r) in enumerate(zip(raws, reqs)):
        key = (r.subject, _relation(raw, r))
        if key in seen and reqs[seen[key]].target != r.target:
            j = seen[key]
            raise InputError(f"requests {j} and {i} rewrite the same subject {r.subject!r} and relation "
                             f"{key[1]!r} to different targets {reqs[j].target!r} and {r.target!r}")
        seen.setdefault(key, i)
        lm.target_ids(r.text(), r.target)
        locate(lm, r.prompt, r.subject, hp.fact_token)
    return reqs


def _second_moment(lm, layer: int, stats, hp: ROMEHparams):
    if stats is None:
        return None
    C = stats.second_moment
    if C.shape != (lm.d_ff, lm.d_ff):
        raise InputError(f"statistics for layer {layer} are {tuple(C.shape)}, but the model's keys have "
                         f"d_ff = {lm.d_ff}")
    C = C.to(device=lm.device, dtype=torch.float64)
    if hp.mom2_reg > 0:
        C = C + hp.mom2_reg * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    return C


@torch.no_grad()
def keys_and_outputs(lm, layer: int, z_layer: int, rows: list[tuple[list, int]]):
    """Down-projection input at ``layer`` and output of ``z_layer`` at one
    position per row: ``(act [R, d_ff], resid_post [R, d_model])``."""
    acts, outs = [], []
    for c in range(0, len(rows), KEY_ROWS):
        part = rows[c:c + KEY_ROWS]
        b = lm.batch_ids([ids for ids, _ in part])
        pos = torch.tensor([p for _, p in part], device=lm.device)
        o = lm.run(b.input_ids, attention_mask=b.attention_mask, stop_layer=z_layer + 1, logits=None,
                   capture=[("act", layer), ("resid_post", z_layer)], capture_positions=pos)
        acts.append(o[("act", layer)][:, 0])
        outs.append(o[("resid_post", z_layer)][:, 0])
    return torch.cat(acts), torch.cat(outs)


def group_mean(x: torch.Tensor, n_req: int, groups: list[int]) -> torch.Tensor:
    """[n_req * n_templates, d] -> [n_req, d]: mean within each template group, then across groups."""
    x = x.double().reshape(n_req, sum(groups), -1)
    parts = torch.split(x, groups, dim=1)
    return torch.stack([p.mean(1) for p in parts], 1).mean(1)


def compute_targets(lm, reqs: list[Request], hp: MEMITHparams, templates: list[str]):
    """z for each request at the last edit layer: ``(Z [d_model, B], rows, losses, p_target)``."""
    zL = max(hp.layers)
    rows = [build_rows(lm, r, templates, hp.fact_token, hp.kl_prompts) for r in reqs]
    zs, losses, ps = [], [], []
    bs = int(hp.batch_requests)
    for c in range(0, len(rows), bs):
        for delta, init, ls, p in optimise_deltas(lm, zL, rows[c:c + bs], hp, init_site="resid_post"):
            zs.append(init + delta)
            losses.append(ls)
            ps.append(p)
    return torch.stack(zs, 1), rows, losses, ps


def _apply_batch(lm, reqs: list[Request], hp: MEMITHparams, templates, groups, stats: dict, out: Edit,
                 targets=None):
    layers = sorted(hp.layers)
    zL = layers[-1]
    vd = _vec_dtype(lm)
    Z, rows, losses, ps = compute_targets(lm, reqs, hp, templates) if targets is None else targets
    key_rows = [kr for r in rows for kr in r.key_rows()]
    B = len(reqs)
    for i, L in enumerate(layers):
        acts, h = keys_and_outputs(lm, L, zL, key_rows)
        K = group_mean(acts, B, groups).T                         # [d_ff, B]
        cur = h.reshape(B, len(templates), -1)[:, 0].double().T   # bare prompt: template "{}"
        R = Z.double() - cur                                      # [d_model, B]
        C = _second_moment(lm, L, stats.get(L), hp)
        if hp.METHOD == "EMMET":
            A = emmet_keys(C, K, hp.mom2_update_weight, hp.emmet_lambda, hp.update_norm_lambda)
        else:
            A = memit_keys(C, K, hp.mom2_update_weight)
        share = R / (len(layers) - i)
        left, right = A.to(vd), share.to(vd)
        W, a, b = _orient(lm, L, left, right)
        W = W.data  # see editing._edit_one: one version counter per update, for LIFO undo
        with torch.no_grad():
            rec = _rank1(W, a, b)
        out.steps.append(BatchStep(reqs, L, left, right, K, R, Z, losses, ps, W, rec))
        log.info("%s: %d requests, layer %d: |residual| %.3g, |update| %.3g", hp.METHOD, B, L,
                 float(R.norm()), float(share.norm() * A.norm()))


def batch_edit(lm, requests, hparams=None, *, method: str = "MEMIT", stats=None, cache_dir=None,
               targets=None) -> Edit:
    """Apply MEMIT or EMMET to ``lm`` in place; returns the :class:`Edit` (undo
    restores every byte; a context manager undoes on exit).

    ``requests``: one request, a list (one batch) or a list of lists (batches
    applied in order). ``hparams``: MEMITHparams/EMMETHparams, a shipped name,
    a YAML/JSON path (MEMIT's or EasyEdit's files load), a dict, or None for
    the model's shipped file. ``stats``: a dict {layer: LayerStats | tensor |
    path} for every edit layer, or None to compute/load them with
    :func:`kncore.rome.layer_stats` (cached under ``cache_dir``).
    ``targets``: for one batch, what :func:`compute_targets` returned for it
    on this model and hparams (z does not depend on C, so edits that differ
    only in their statistics can share one v* optimisation).
    """
    method = str(method).upper()
    if method not in METHODS:
        raise InputError(f"unknown batch editor {method!r}; use one of {sorted(METHODS)}")
    cls = METHODS[method]
    check_editable(lm, method)
    hp = hparams_for(lm, cls) if hparams is None else load_hparams(hparams, cls)
    hp.validate()
    hp.check_model(lm)
    batches = [check_batch(lm, b, hp) for b in split_batches(requests)]
    if targets is not None and (len(batches) != 1 or targets[0].shape[1] != len(batches[0])):
        raise InputError(f"targets are for {targets[0].shape[1]} requests in one batch, but the requests make "
                         f"{len(batches)} batches of {[len(b) for b in batches]}")
    all_stats = _resolve_stats(lm, hp, stats, cache_dir)
    templates = context_templates(lm, hp)
    groups = template_groups(hp, templates)
    result = Edit(lm, hp)
    try:
        for reqs in batches:
            _apply_batch(lm, reqs, hp, templates, groups, all_stats, result, targets)
    except BaseException:
        if result.steps:
            result.undo()
        raise
    return result


def memit_edit(lm, requests, hparams=None, *, stats=None, cache_dir=None) -> Edit:
    """MEMIT (see :func:`batch_edit`)."""
    return batch_edit(lm, requests, hparams, method="MEMIT", stats=stats, cache_dir=cache_dir)


def emmet_edit(lm, requests, hparams=None, *, stats=None, cache_dir=None) -> Edit:
    """EMMET (see :func:`batch_edit`)."""
    return batch_edit(lm, requests, hparams, method="EMMET", stats=stats, cache_dir=cache_dir)
