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

Where the numbers differ from EasyEdit's on purpose (docs/memit.md, "EasyEdit
compatibility", says how to get EasyEdit's behaviour exactly):

* context templates are sampled with a fixed seed (EasyEdit's are random);
* the statistics come from ``layer_stats`` on ``mom2_dataset`` (EasyEdit
  downloads Wikipedia); pass ``stats=`` to use your own;
* C^-1 k and MEMIT's systems are float64 Cholesky solves.
"""
from __future__ import annotations

import copy as _copy

from ..lm import LM, InputError
from ..rome import edit as _rome_edit
from ..rome.hparams import ROMEHparams, load_hparams
from ..rome.memit import EMMETHparams, MEMITHparams, batch_edit

__all__ = ["apply_rome_to_model", "apply_memit_to_model", "apply_emmet_to_model", "ROMEHyperParams",
           "MEMITHyperParams", "EMMETHyperParams"]


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
