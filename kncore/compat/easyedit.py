"""EasyEdit's entry points on kncore: swap one import.

    # from easyeditor.models.rome import apply_rome_to_model, ROMEHyperParams
    from kncore.compat.easyedit import apply_rome_to_model, ROMEHyperParams
    hparams = ROMEHyperParams.from_hparams("hparams/ROME/llama-7b.yaml")
    model, orig = apply_rome_to_model(model, tok, requests, hparams, return_orig_weights=True)

``apply_rome_to_model``, ``apply_memit_to_model`` and ``apply_emmet_to_model``
take EasyEdit's arguments ``(model, tok, requests, hparams, copy=False,
return_orig_weights=False, ...)`` and return ``(model, weights_copy)``:
the edited model (a deep copy of it with ``copy=True``) and, with
``return_orig_weights=True``, ``{parameter name: original weight}`` for every
weight changed (else ``{}``). Requests are EasyEdit's dicts (``prompt`` with
the subject written out or ``{}``, ``subject``, ``target_new``). The
hyper-parameter classes read EasyEdit's YAML files (``from_hparams``) and
refuse a file of another method.

Extra keyword arguments: ``stats`` (the second moments, see
:func:`kncore.rome.edit`) and ``cache_dir``; EasyEdit's ``cache_template``
and ``keep_original_weight`` are accepted. The :class:`kncore.rome.Edit` of
the last call is kept on the returned model as ``model._kncore_edit``, so
``model._kncore_edit.undo()`` restores it bit for bit.

``apply_kn_to_model`` (knowledge neurons, Dai et al. 2022, as EasyEdit runs
them) returns EasyEdit's ``(model, unpatch_fn)``: calling ``unpatch_fn()``
takes the edit back, bit for bit here. :class:`KNHyperParams` reads
EasyEdit's ``hparams/KN/*.yaml``. Per request: the neurons whose attribution
for the *old* answer (``ground_truth``) at the prompt's last token is above
``adaptive_threshold`` x the maximum (integrated gradients over ``steps``
points, ``linspace(0, 1, steps)``, at the pre-activation site: GPT-2's
``c_fc``, GPT-J's ``fc_in``, LLaMA's ``gate_proj`` outputs, kept in more than
``p`` of the prompts when ``refine``), then each one's value vector (its row
of the down-projection) gets ``lr_scale`` x (E[target] - E[prediction]) x 2
for a one-token target, or the sum over the target's tokens of E[target_j] -
E[prediction_j] (E: the input embeddings; prediction: the greedy tokens).

Where the numbers differ from EasyEdit's on purpose (docs/memit.md, "EasyEdit
compatibility", says how to get EasyEdit's behaviour exactly):

* context templates are sampled with a fixed seed (EasyEdit's are random);
* the statistics come from ``layer_stats`` on ``mom2_dataset`` (EasyEdit
  downloads Wikipedia); pass ``stats=`` to use your own;
* C^-1 k and MEMIT's systems are float64 Cholesky solves;
* KN: every request is edited (EasyEdit's ``apply_kn_to_model`` edits
  ``requests[0]`` only; its editor passes one request at a time, where the two
  agree); a multi-token ``ground_truth`` is attributed token by token on the
  prompt followed by the model's greedy tokens for every model (EasyEdit's
  GPT-2 type keeps the bare prompt for every token); the update of a value
  vector is one addition of the difference (EasyEdit adds and subtracts the
  embeddings one by one: rounding); ``lr_scale`` multiplies the update
  (EasyEdit reads it and never uses it; its files all set 1.0);
  ``layers`` (kncore only, default all) keeps the neurons of those layers.
"""
from __future__ import annotations

import copy as _copy
import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..lm import LM, InputError
from ..rome import edit as _rome_edit
from ..rome.hparams import ROMEHparams, load_hparams
from ..rome.memit import EMMETHparams, MEMITHparams, batch_edit

__all__ = ["apply_rome_to_model", "apply_memit_to_model", "apply_emmet_to_model", "apply_kn_to_model",
           "ROMEHyperParams", "MEMITHyperParams", "EMMETHyperParams", "KNHyperParams"]

log = logging.getLogger("kncore")


class _FromHparams:
    @classmethod
    def from_hparams(cls, path):
        """Read an EasyEdit (or ROME/MEMIT) YAML/JSON file of this method."""
        return load_hparams(path, cls)


class ROMEHyperParams(_FromHparams, ROMEHparams):
    """EasyEdit's ``ROMEHyperParams`` (fields as :class:`kncore.rome.ROMEHparams`)."""


class MEMITHyperParams(_FromHparams, MEMITHparams):
    """EasyEdit's ``MEMITHyperParams`` (fields as :class:`kncore.rome.MEMITHparams`)."""


class EMMETHyperParams(_FromHparams, EMMETHparams):
    """EMMET's hyper-parameters (fields as :class:`kncore.rome.EMMETHparams`)."""


def _lm(model, tok, hparams) -> LM:
    if isinstance(model, LM):
        return model
    return LM(model, tok, name=hparams.ignored.get("model_name") or None)


def _param_name(lm, W) -> str:
    for n, p in lm.model.named_parameters():
        if p is W or p.data_ptr() == W.data_ptr():
            return n
    raise InputError("the edited weight is not a parameter of the model")


def _apply(run, model, tok, requests, hparams, copy, return_orig_weights, stats, cache_dir):
    if copy:
        model = _copy.deepcopy(model)
    lm = _lm(model, tok, hparams)
    if isinstance(requests, dict):
        requests = [requests]
    layers = sorted(hparams.layers)
    orig = {}
    if return_orig_weights:
        for L in layers:
            W = lm.adapter.down_module(L).weight
            orig[_param_name(lm, W)] = W.detach().clone()
    e = run(lm, list(requests), hparams, stats=stats, cache_dir=cache_dir)
    target = lm.model
    target._kncore_edit = e
    return (lm if isinstance(model, LM) else target), orig


def apply_rome_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False, cache_template=None,
                        keep_original_weight=False, *, stats=None, cache_dir=None, **kwargs):
    """EasyEdit's ``apply_rome_to_model``: the requests one after the other."""
    hp = load_hparams(hparams, ROMEHparams)
    return _apply(_rome_edit, model, tok, requests, hp, copy, return_orig_weights, stats, cache_dir)


def apply_memit_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False, cache_template=None,
                         keep_original_weight=False, *, stats=None, cache_dir=None, **kwargs):
    """EasyEdit's ``apply_memit_to_model``: the requests as one batch."""
    hp = load_hparams(hparams, MEMITHparams)
    run = lambda lm, r, h, **kw: batch_edit(lm, r, h, method="MEMIT", **kw)  # noqa: E731
    return _apply(run, model, tok, requests, hp, copy, return_orig_weights, stats, cache_dir)


def apply_emmet_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False, cache_template=None,
                         keep_original_weight=False, *, stats=None, cache_dir=None, **kwargs):
    """EMMET's ``apply_emmet_to_model``: the requests as one batch."""
    hp = load_hparams(hparams, EMMETHparams)
    run = lambda lm, r, h, **kw: batch_edit(lm, r, h, method="EMMET", **kw)  # noqa: E731
    return _apply(run, model, tok, requests, hp, copy, return_orig_weights, stats, cache_dir)


# -- knowledge neurons (EasyEdit's KN) ------------------------------------------------------------------
@dataclass
class KNHyperParams:
    """EasyEdit's ``KNHyperParams`` (defaults: its ``hparams/KN/gpt2-xl.yaml``).

    ``steps`` integrated-gradient points (``linspace(0, 1, steps)``; 1 is the
    gradient at the zero baseline times the activation, not integrated
    gradients), ``batch_size`` (speed only; kncore batches by memory),
    ``adaptive_threshold`` (coarse neurons: score > t x max), ``p`` and
    ``refine`` (keep neurons in more than ``p`` of the prompts), ``lr_scale``
    (multiplies the update). ``n_toks``, ``device``, ``model_name``,
    ``max_length`` and ``model_parallel`` are read and not used, as in
    EasyEdit. ``layers`` (kncore only): edit neurons of these layers (None: all).
    """

    alg_name: str = "KN"
    model_name: str = ""
    device: object = 0
    lr_scale: float = 1.0
    n_toks: int = 10
    refine: bool = False
    batch_size: int = 20
    steps: int = 20
    adaptive_threshold: float = 0.2
    p: float = 0.4
    max_length: int = 40
    model_parallel: bool = False
    layers: list | None = None

    def validate(self) -> "KNHyperParams":
        if str(self.alg_name).upper() != "KN":
            raise InputError(f"these are {self.alg_name} hyper-parameters (alg_name), not KN's: load them with the "
                             f"{self.alg_name} editor's hparams class")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"KN hparams.{name} must be a positive integer, got {v!r}")
        if not 0 <= float(self.adaptive_threshold) <= 1:
            raise InputError(f"KN hparams.adaptive_threshold must be in [0, 1], got {self.adaptive_threshold}")
        if not 0 <= float(self.p) < 1:
            raise InputError(f"KN hparams.p must be in [0, 1), got {self.p}")
        if not math.isfinite(float(self.lr_scale)):
            raise InputError(f"KN hparams.lr_scale must be a finite number, got {self.lr_scale}")
        if self.layers is not None and (not isinstance(self.layers, (list, tuple)) or not self.layers):
            raise InputError(f"KN hparams.layers must be a non-empty list of layers or null, got {self.layers!r}")
        return self

    @classmethod
    def from_dict(cls, d: dict, source: str = "dict") -> "KNHyperParams":
        if not isinstance(d, dict):
            raise InputError(f"{source}: expected a mapping of hyper-parameters, got {type(d).__name__}")
        alg = d.get("alg_name", "KN")
        if str(alg).upper() != "KN":
            raise InputError(f"{source}: these are {alg} hyper-parameters (alg_name), not KN's: load them with the "
                             f"{alg} editor's hparams class")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"{source}: unknown KN hyper-parameters ignored: {unknown}", stacklevel=3)
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("lr_scale", "adaptive_threshold", "p"):  # YAML reads 1e-1 as a string
            if k in kw:
                try:
                    kw[k] = float(kw[k])
                except (TypeError, ValueError):
                    raise InputError(f"{source}: KN hparams.{k} must be a number, got {kw[k]!r}") from None
        return cls(**kw).validate()

    @classmethod
    def from_hparams(cls, path) -> "KNHyperParams":
        """Read an EasyEdit KN YAML file (``.yaml`` added when missing, as EasyEdit does)."""
        import yaml

        p = Path(path)
        if not p.exists() and p.suffix != ".yaml":
            p = p.with_name(p.name + ".yaml")
        if not p.exists():
            raise InputError(f"no KN hparams file {str(path)!r}")
        try:
            d = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise InputError(f"KN hparams {p}: not valid YAML: {' '.join(str(e).split())}") from None
        return cls.from_dict(d, source=str(p))


@dataclass
class KNStep:
    """The value vectors of one layer's neurons moved by one request's update:
    ``W[:, neurons] += delta`` (rank k through the rank-k op, undone bit for bit)."""

    request: dict
    layer: int
    neurons: list
    delta: torch.Tensor
    weight: torch.Tensor | None = field(default=None, repr=False)
    record: object = field(default=None, repr=False)
    requests: list = field(default_factory=list)

    def describe(self) -> str:
        return f"{len(self.neurons)} neurons @L{self.layer}"


def _text(v, what):
    if isinstance(v, dict):
        v = v.get("str")
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], str):
        v = v[0]
    if not isinstance(v, str) or not v.strip():
        raise InputError(f"KN request needs a non-empty {what}, got {v!r}")
    return v


def _kn_model_type(lm) -> str:
    if lm.is_mlm:
        return "bert"
    return "llama" if "llama" in str(lm.arch).lower() else "gpt"


def kn_update(lm, kn, prompt: str, ground_truth: str, target: str, hp: KNHyperParams):
    """The neurons EasyEdit's KN edits for one request and the change of their
    value vectors: ``(neurons [[layer, index]], delta [d_model])``."""
    if int(hp.steps) == 1:
        log.warning("KN steps: 1 is the gradient at the zero baseline times the activation, not integrated "
                    "gradients (EasyEdit's LLaMA file); steps: 20 gives Dai et al.'s")
    neurons = kn.get_refined_neurons([prompt], ground_truth, p=float(hp.p) if hp.refine else 0.0,
                                     batch_size=int(hp.batch_size), steps=int(hp.steps),
                                     coarse_adaptive_threshold=float(hp.adaptive_threshold), quiet=True)
    if hp.layers is not None:
        keep = {int(L) for L in hp.layers}
        neurons = [n for n in neurons if int(n[0]) in keep]
    tgt = kn._target_label(target)
    tgt = tgt if isinstance(tgt, list) else [tgt]
    pred = kn._generate(prompt, target)[3]
    E = lm.adapter.embedding_module().weight.detach().to(torch.float32)
    diff = E[torch.tensor(tgt, device=E.device)].sum(0) - E[torch.tensor(pred, device=E.device)].sum(0)
    if len(tgt) == 1:
        diff = diff * 2
    return neurons, diff * float(hp.lr_scale)


def apply_kn_to_model(model, tok, requests, hparams, copy=False, return_orig_weights=False,
                      keep_original_weight=True, **kwargs):
    """EasyEdit's ``apply_kn_to_model``: returns ``(model, unpatch_fn)``.

    ``requests``: EasyEdit's dicts with ``prompt`` (the subject written out),
    ``ground_truth`` (the answer the neurons are found for) and ``target_new``;
    each is edited in order on the model the previous ones left. ``hparams``:
    :class:`KNHyperParams`, a path to EasyEdit's YAML, or a dict.
    ``unpatch_fn()`` takes every update back, bit for bit. A request that
    fails undoes the ones applied before it, so the model is left as it was.
    ``return_orig_weights`` is accepted and not used, as in EasyEdit.
    """
    from ..rome.editing import Edit, _orient, _rank1
    from . import KnowledgeNeurons

    hp = hparams if isinstance(hparams, KNHyperParams) else (
        KNHyperParams.from_dict(hparams) if isinstance(hparams, dict) else KNHyperParams.from_hparams(hparams))
    hp.validate()
    if isinstance(requests, dict):
        requests = [requests]
    requests = list(requests or [])
    if not requests:
        raise InputError("no KN edit requests given")
    if copy:
        model = _copy.deepcopy(model)
    hf = model.model if isinstance(model, LM) else model
    lm = model if isinstance(model, LM) else LM(hf, tok)
    if hp.layers is not None:
        bad = [L for L in hp.layers if not 0 <= int(L) < lm.n_layers]
        if bad:
            raise InputError(f"KN hparams.layers {hp.layers}: layer {bad[0]} is outside the model's "
                             f"{lm.n_layers} layers")
    parsed = []
    for i, r in enumerate(requests):  # every request read before any change
        if not isinstance(r, dict):
            raise InputError(f"KN request {i} must be a dict, got {type(r).__name__}")
        prompt = _text(r.get("prompt"), "prompt")
        subject = r.get("subject")
        if "{}" in prompt and isinstance(subject, str):
            prompt = prompt.replace("{}", subject, 1)
        parsed.append((r, prompt, _text(r.get("ground_truth"), "ground_truth"),
                       _text(r.get("target_new"), "target_new")))
    kn = KnowledgeNeurons(hf, tok, model_type=_kn_model_type(lm), device=lm.device)
    result = Edit(lm, hp)
    try:
        for r, prompt, gt, target in parsed:
            neurons, delta = kn_update(lm, kn, prompt, gt, target, hp)
            by_layer: dict = {}
            for L, i in neurons:
                by_layer.setdefault(int(L), []).append(int(i))
            for L, idx in sorted(by_layer.items()):
                left = torch.zeros(lm.d_ff, len(idx), dtype=torch.float32, device=lm.device)
                left[torch.tensor(idx, device=lm.device), torch.arange(len(idx), device=lm.device)] = 1.0
                right = delta.to(lm.device)[:, None].expand(-1, len(idx)).contiguous()
                W, a, b = _orient(lm, L, left, right)
                W = W.data  # one version counter per update (LIFO undo), as the ROME editors do
                with torch.no_grad():
                    rec = _rank1(W, a, b)
                result.steps.append(KNStep(r, L, idx, delta, W, rec, [r]))
            log.info("KN: %r -> %r: %d neurons", prompt, target, len(neurons))
    except BaseException:
        if result.steps:
            result.undo()
        raise
    hf._kncore_edit = result
    return (lm if isinstance(model, LM) else hf), result.undo
