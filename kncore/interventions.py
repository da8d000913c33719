"""Suppress, enhance or scale chosen MLP neurons while a block of code runs.

    with kncore.patch_neurons(lm, kns, mode="suppress"):
        p = lm.next_token_probs(prompts)      # the kncore runtime
        logits = lm.model(ids).logits         # the plain Hugging Face forward

One patch covers every way of running the model, through two mechanisms that
never both act on the same forward:

* the kncore runtime (:func:`kncore.runtime.run`, hence ``lm.run``,
  ``lm.next_token_probs``, attribution, tracing, evaluation) applies the
  adapter's ``persistent_patches``, to which the context adds one entry;
* the plain Hugging Face forward gets PyTorch hooks: a forward pre-hook on
  each patched layer's down-projection (site ``act``, its input) or a forward
  hook on the pre-activation module (site ``pre_act``). They act only while a
  forward of ``lm.model.base_model`` is running (a pre-hook and an
  always-called post-hook on it mark that), so when the runtime calls the same
  modules (it calls the pre-activation projection) nothing is applied twice.

Everything is undone on exit, also when the block raises; weights are never
touched.

Positions (``positions=``):

``"target"`` (default) where the prediction is read, as knowledge-neurons'
    ``suppress_knowledge``/``enhance_knowledge`` patch: for decoders each row's
    last real token among the positions a forward computes (with a key/value
    cache, the last new token); for BERT every ``[MASK]`` token (a forward
    started from hidden states, or a row without ``[MASK]``, is an error).
``"all"`` every position (equivalent to editing the down-projection rows).
int or list of ints: absolute token positions.
"""
from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch

from . import validation as V
from .lm import LM, InputError
from .runtime import Patch
from .selection import KNSet

MODES = ("suppress", "enhance", "scale")
SITES = ("act", "pre_act")


def _check_neurons(lm: LM, neurons) -> dict[int, list[int]]:
    kn = KNSet.of(neurons)
    for l, i in kn.neurons:
        if not 0 <= l < lm.n_layers:
            raise InputError(f"neuron ({l}, {i}): layer {l} outside 0..{lm.n_layers - 1}")
        if not 0 <= i < lm.d_ff:
            raise InputError(f"neuron ({l}, {i}): index {i} outside 0..{lm.d_ff - 1}")
    return kn.by_layer()


def _check_positions(positions):
    if isinstance(positions, str):
        if positions not in ("target", "all"):
            raise InputError(f"positions must be 'target', 'all' or absolute positions, got {positions!r}")
        return positions
    pos = [positions] if isinstance(positions, int) else list(positions)
    if not pos or any(not isinstance(p, int) or isinstance(p, bool) or p < 0 for p in pos):
        raise InputError(f"positions must be non-negative ints, got {positions!r}")
    return sorted(set(pos))


class NeuronPatch:
    """A neuron intervention on one model, applied while active.

    Use it as a context manager (``with patch_neurons(...):``) or call
    :meth:`apply` and :meth:`remove` (knowledge-neurons' ``undo_modification=False``).
    """

    def __init__(self, lm: LM, neurons, mode: str = "suppress", factor: float = 2.0,
                 positions="target", site: str = "act"):
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        if site not in SITES:
            raise InputError(f"site must be one of {SITES}, got {site!r}")
        factor = float(factor)
        if not math.isfinite(factor):
            raise InputError(f"factor must be finite, got {factor}")
        self.lm = lm
        self.mode, self.factor, self.site = mode, factor, site
        self.positions = _check_positions(positions)
        self.by_layer = _check_neurons(lm, neurons)
        self._idx = {L: torch.tensor(ix, dtype=torch.long) for L, ix in self.by_layer.items()}
        self._handles: list = []
        self._entry = None
        self._calls: list = []  # one entry per Hugging Face forward in progress

    @property
    def active(self) -> bool:
        return self._entry is not None

    # -- what one patched entry becomes -------------------------------------------
    def _edit_kw(self):
        if self.mode == "suppress":
            return {"value": torch.zeros(())}
        return {"scale": self.factor}

    def _edit(self, x):
        return torch.zeros_like(x) if self.mode == "suppress" else x * torch.as_tensor(self.factor, dtype=x.dtype)

    def _target_cols(self, input_ids, attention_mask, B, n, dev):
        """[B, n] bool: the target positions of a forward over n new tokens."""
        if self.lm.is_mlm:
            if input_ids is None:
                raise InputError("positions='target' on a masked LM needs the token ids to find "
                                 "[MASK]; give positions= explicitly for a forward from hidden states")
            sel = input_ids == self.lm.tokenizer.mask_token_id
            missing = (~sel.any(1)).nonzero().flatten().tolist()
            if missing:
                raise InputError(f"positions='target' on a masked LM: row(s) {missing} have no "
                                 f"{self.lm.tokenizer.mask_token}")
            return sel
        if attention_mask is None:
            last = torch.full((B,), n - 1, dtype=torch.long, device=dev)
        else:
            last = attention_mask.long().cumsum(1).argmax(1)
        return torch.nn.functional.one_hot(last, n).bool()

    # -- the runtime side ----------------------------------------------------------------
    def _runtime_patches(self, input_ids, attention_mask, position_ids):
        kw = self._edit_kw()
        if self.positions == "target":
            B, n = position_ids.shape
            sel = self._target_cols(input_ids, attention_mask, B, n, position_ids.device)
            rows, cols = sel.nonzero(as_tuple=True)
            groups: dict[int, list[int]] = {}
            for r, p in zip(rows.tolist(), position_ids[rows, cols].tolist()):
                groups.setdefault(p, []).append(r)
            spec = [(rs, [p]) for p, rs in groups.items()]
        else:
            spec = [(None, None if self.positions == "all" else self.positions)]
        return [Patch(self.site, L, positions=pos, rows=rs, neurons=idx, **kw)
                for L, idx in self._idx.items() for rs, pos in spec]

    def as_patches(self, rows=None, positions=None) -> list:
        """This intervention as :class:`kncore.Patch` objects for one
        ``kncore.run(..., patches=...)`` call, on batch ``rows`` (None: all)
        at absolute ``positions`` (default: this patch's own; required when
        they are ``"target"``). Lets patched and unpatched rows share a forward.
        """
        pos = self.positions if positions is None else _check_positions(positions)
        if pos == "target":
            raise InputError("as_patches needs absolute positions (or 'all') when the patch targets 'target'")
        return [Patch(self.site, L, positions=None if pos == "all" else pos, rows=rows, neurons=idx,
                      **self._edit_kw()) for L, idx in self._idx.items()]

    # -- the Hugging Face side -------------------------------------------------------------
    def _enter_forward(self, module, args, kwargs):
        try:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        ids = bound.get("input_ids")
        emb = bound.get("inputs_embeds")
        mask = bound.get("attention_mask")
        if getattr(self.lm.adapter, "encoder_decoder", False):  # T5: the patched neurons are the decoder's
            ids, emb, mask = bound.get("decoder_input_ids"), None, bound.get("decoder_attention_mask")
        n = ids.shape[1] if ids is not None else (emb.shape[1] if emb is not None else None)
        past = bound.get("past_key_values", bound.get("cache"))  # transformers >= 5.2x calls it cache
        extra = bound.get("kwargs") or {}
        if past is None and isinstance(extra, dict):
            past = extra.get("past_key_values", extra.get("cache"))
        # read the cache's length now: the layers append this call's tokens to it as they run
        past_len = int(past.get_seq_length()) if hasattr(past, "get_seq_length") else 0
        self._calls.append((ids, mask, n, past_len))

    def _leave_forward(self, module, args, output):
        if self._calls:
            self._calls.pop()

    def _hf_sel(self, x):
        """[B, n, 1] bool of entries to patch for the forward in progress, or None (all)."""
        ids, mask, n, cached = self._calls[-1]
        B, T = x.shape[0], x.shape[1]
        if self.positions == "all":
            return None
        if mask is not None and mask.dim() != 2:
            raise InputError("patch_neurons handles 2-D attention masks only")
        if mask is not None:
            mask = mask[:, -T:].bool()
        if self.positions == "target":
            return self._target_cols(ids, mask, B, T, x.device)[..., None]
        past_len = mask.shape[1] - T if mask is not None else cached
        cols = torch.arange(T, device=x.device) + past_len
        want = torch.tensor(self.positions, device=x.device)
        return (cols[:, None] == want).any(-1)[None, :, None].expand(B, T, 1)

    def _patch_tensor(self, L, x):
        nmask = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
        nmask[self._idx[L].to(x.device)] = True
        sel = self._hf_sel(x)
        sel = nmask if sel is None else sel & nmask
        return torch.where(sel, self._edit(x), x)

    def _act_hook(self, L):
        def hook(module, args):
            if not self._calls:
                return None
            return (self._patch_tensor(L, args[0]), *args[1:])
        return hook

    def _pre_act_hook(self, L):
        def hook(module, args, output):
            if not self._calls:
                return None
            return self._patch_tensor(L, output)
        return hook

    # -- life cycle ---------------------------------------------------------------------------
    def apply(self) -> "NeuronPatch":
        """Start the intervention (returns self)."""
        if self.active:
            raise RuntimeError("this NeuronPatch is already applied")
        ad = self.lm.adapter
        try:
            base = getattr(self.lm.model, "base_model", self.lm.model)
            self._handles.append(base.register_forward_pre_hook(self._enter_forward, with_kwargs=True))
            self._handles.append(base.register_forward_hook(self._leave_forward, always_call=True))
            for L in self._idx:
                if self.site == "act":
                    h = ad.down_module(L).register_forward_pre_hook(self._act_hook(L))
                else:
                    mod = ad.pre_act_module(L)
                    if mod is None:
                        raise InputError(f"site='pre_act' on the Hugging Face forward: {type(ad).__name__} "
                                         f"does not name its pre-activation module (pre_act_module)")
                    h = mod.register_forward_hook(self._pre_act_hook(L))
                self._handles.append(h)
            self._entry = self._runtime_patches
            ad.persistent_patches.append(self._entry)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Undo the intervention (safe to call twice)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._calls.clear()
        if self._entry is not None:
            held = self.lm.adapter.persistent_patches
            for k, e in enumerate(held):
                if e is self._entry:
                    del held[k]
                    break
            self._entry = None

    def __enter__(self) -> "NeuronPatch":
        return self.apply()

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def __repr__(self):
        k = sum(len(v) for v in self.by_layer.values())
        return (f"NeuronPatch({k} neurons in layers {sorted(self.by_layer)}, mode={self.mode!r}, "
                f"factor={self.factor}, positions={self.positions!r}, site={self.site!r}, "
                f"active={self.active})")


def patch_neurons(lm: LM, neurons, mode: str = "suppress", factor: float = 2.0,
                  positions: str | int | Sequence[int] = "target", site: str = "act") -> NeuronPatch:
    """Suppress (x0), enhance (x factor, default 2) or scale (x factor) neurons.

    ``neurons``: a :class:`~kncore.selection.KNSet`, ``(layer, index)`` pairs
    or a ``[k, 2]`` tensor. ``positions``: ``"target"`` (default: the last real
    token for decoders, ``[MASK]`` for BERT, where knowledge-neurons patches),
    ``"all"``, or absolute positions. ``site``: ``"act"`` (the input of the
    down-projection, default) or ``"pre_act"`` (knowledge-neurons' site for
    GPT-2; enhancing there scales the input of the activation function).

    Returns a :class:`NeuronPatch`: use it in a ``with`` block, which covers the
    kncore runtime and the plain Hugging Face forward, and restores the model
    exactly on exit (also on an exception).
    """
    V.check("factor", factor)
    return NeuronPatch(lm, neurons, mode=mode, factor=factor, positions=positions, site=site)
