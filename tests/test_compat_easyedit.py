"""kncore.compat.easyedit: EasyEdit's call shapes and return values on a tiny model."""
from __future__ import annotations

import pytest
import torch

import kncore
from kncore import rome
from kncore.compat import easyedit as ee
from kncore.testing import tiny_model, tiny_tokenizer
from test_memit import EASYEDIT_MEMIT_GPT2XL, EASYEDIT_ROME_YAML, _requests, _texts
from test_rome import _one_thread  # noqa: F401  (autouse: tiny models on one thread)


def _stats(model, tok, layers):
    lm = kncore.LM(model, tok)
    return rome.layer_stats(lm, layers, _texts(60, 1), n_samples=None, dtype="float32", progress=False,
                            use_cache=False)


@pytest.mark.parametrize("method", ["rome", "memit", "emmet"])
def test_apply_to_model(method, tmp_path):
    model, tok = tiny_model("gpt2", seed=3), tiny_tokenizer()
    for p in model.parameters():
        p.requires_grad_(False)
    cls = {"rome": ee.ROMEHyperParams, "memit": ee.MEMITHyperParams, "emmet": ee.EMMETHyperParams}[method]
    hp = cls(layers=[0, 1], v_num_grad_steps=2, context_template_length_params=[[5, 5]])
    if method == "rome":
        hp = cls(layers=[1], v_num_grad_steps=2, context_template_length_params=[[5, 5]])
    st = _stats(model, tok, hp.layers)
    apply = getattr(ee, f"apply_{method}_to_model")
    reqs = _requests(2, 5)
    for r in reqs:  # EasyEdit's prompts hold the subject itself
        r["prompt"] = r["prompt"].replace("{}", r["subject"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # copy=True edits a copy and leaves the model as it was.
    edited, orig = apply(model, tok, reqs, hp, copy=True, stats=st)
    assert edited is not model and orig == {}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    changed = [n for n, p in edited.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [f"transformer.h.{L}.mlp.c_proj.weight" for L in hp.layers]
    # In place, with the original weights returned, as EasyEdit does.
    edited, orig = apply(model, tok, reqs, hp, return_orig_weights=True, stats=st)
    assert edited is model and sorted(orig) == changed
    assert all(torch.equal(orig[n], before[n]) for n in changed)
    model._kncore_edit.undo()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_hparams_from_easyedit_files(tmp_path):
    (tmp_path / "memit.yaml").write_text(EASYEDIT_MEMIT_GPT2XL)
    (tmp_path / "rome.yaml").write_text(EASYEDIT_ROME_YAML)
    hp = ee.MEMITHyperParams.from_hparams(tmp_path / "memit.yaml")
    assert isinstance(hp, ee.MEMITHyperParams) and hp.layers == [13, 14, 15, 16, 17]
    assert hp.mom2_update_weight == 20000 and hp.ignored["model_name"] == "./hugging_cache/gpt2-xl"
    assert ee.ROMEHyperParams.from_hparams(tmp_path / "rome.yaml").layers == [1]
    with pytest.raises(kncore.InputError, match="ROME hyper-parameters .* not MEMIT's"):
        ee.MEMITHyperParams.from_hparams(tmp_path / "rome.yaml")
    model, tok = tiny_model("gpt2", seed=0), tiny_tokenizer()
    with pytest.raises(kncore.InputError, match="needed"):
        ee.apply_memit_to_model(model, tok, [], ee.EMMETHyperParams(layers=[0]))
