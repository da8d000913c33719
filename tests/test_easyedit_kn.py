"""kncore.compat.easyedit.apply_kn_to_model and KNHyperParams: EasyEdit's KN
file read as written, the edit against EasyEdit's update written out line by
line, one step = the gradient at the zero baseline times the activation,
bit-exact unpatch, copy=True, and bad input leaving the model unchanged."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import kncore
from kncore.compat import KnowledgeNeurons
from kncore.compat import easyedit as ee
from kncore.testing import tiny_model, tiny_tokenizer
from test_rome import _one_thread  # noqa: F401  (autouse: tiny models on one thread)

FIXTURE = Path(__file__).parent / "fixtures" / "easyedit_kn_llama.yaml"
FACTS = [("the capital of france is", "paris", "rome"), ("the capital of japan is", "tokyo", "berlin"),
         ("the capital of italy is", "rome", "ottawa"), ("the language of germany is", "german", "french")]


def _model(arch, seed):
    model, tok = tiny_model(arch, seed=seed), tiny_tokenizer()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def _bits(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _same(model, snap):
    return all(torch.equal(p.view(torch.int32), snap[n].view(torch.int32))
               for n, p in model.state_dict().items() if p.is_floating_point())


def test_hparams_read_easyedit_kn_file(tmp_path):
    hp = ee.KNHyperParams.from_hparams(FIXTURE)
    assert (hp.steps, hp.batch_size, hp.adaptive_threshold, hp.p, hp.refine, hp.lr_scale, hp.n_toks) == \
        (1, 1, 0.2, 0.4, False, 1.0, 10)
    assert hp.model_name == "./hugging_cache/llama-2-7b" and hp.layers is None
    assert ee.KNHyperParams.from_hparams(str(FIXTURE)[: -len(".yaml")]).steps == 1  # EasyEdit adds .yaml
    (tmp_path / "rome.yaml").write_text("alg_name: ROME\nlayers: [1]\n")
    with pytest.raises(kncore.InputError, match="ROME hyper-parameters .* not KN's"):
        ee.KNHyperParams.from_hparams(tmp_path / "rome.yaml")
    with pytest.raises(kncore.InputError, match="KN hyper-parameters .* not ROME's"):
        ee.ROMEHyperParams.from_hparams(FIXTURE)
    with pytest.raises(kncore.InputError, match="not MEMIT's"):
        ee.MEMITHyperParams.from_hparams(FIXTURE)
    (tmp_path / "bad.yaml").write_text("alg_name: KN\np: 1.5\n")
    with pytest.raises(kncore.InputError, match=r"p must be in \[0, 1\)"):
        ee.KNHyperParams.from_hparams(tmp_path / "bad.yaml")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_apply_kn_matches_easyedit_update(arch):
    seed = random.randrange(1000)
    model, tok = _model(arch, seed)
    hp = ee.KNHyperParams(steps=3, batch_size=1, adaptive_threshold=0.3, lr_scale=1.0)
    reqs = [{"prompt": p, "ground_truth": gt, "target_new": new} for p, gt, new in random.sample(FACTS, 2)]
    snap = _bits(model)

    # EasyEdit's update written out: neurons from the knowledge-neurons drop-in
    # (kncore.compat, checked against the package elsewhere), then for each
    # neuron W[:, i] -= 2 E[prediction]; W[:, i] += 2 E[target], request by request.
    ref, _ = _model(arch, seed)
    kn = KnowledgeNeurons(ref, tok, model_type="llama" if arch == "llama" else "gpt")
    emb = kn.lm.adapter.embedding_module().weight
    touched = set()
    with torch.no_grad():
        for r in reqs:
            neurons = kn.get_refined_neurons([r["prompt"]], r["ground_truth"], p=0.0, steps=3, batch_size=1,
                                             coarse_adaptive_threshold=0.3, quiet=True)
            pred = kn._generate(r["prompt"], r["target_new"])[3]
            tgt = tok.encode(r["target_new"])
            assert len(pred) == len(tgt) == 1
            for L, i in neurons:
                col = kn.lm.adapter.down_weight(L)[i]  # neuron i's value vector (a view)
                col -= emb[pred[0]] * 2
                col += emb[tgt[0]] * 2
                touched.add((L, i))
    assert touched

    edited, unpatch = ee.apply_kn_to_model(model, tok, reqs, hp)
    assert edited is model and callable(unpatch)
    got, want = model.state_dict(), ref.state_dict()
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)
    changed = {n for n in got if not torch.equal(got[n], snap[n])}
    down = {n for n in got if n.endswith(("c_proj.weight", "down_proj.weight")) and "attn" not in n}
    assert changed and changed <= down
    unpatch()
    assert _same(model, snap)


def test_one_step_is_the_gradient_at_zero_times_the_activation():
    """steps: 1 (EasyEdit's LLaMA file) puts its one point at alpha = linspace(0, 1, 1) = 0."""
    seed = random.randrange(1000)
    model, tok = _model("gpt2", seed)
    prompt, gt = "the capital of france is", "paris"
    kn = KnowledgeNeurons(model, tok, model_type="gpt")
    scores = kn.get_scores(prompt, gt, steps=1, batch_size=1, pbar=False)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    L = random.randrange(model.config.n_layer)
    fc = model.transformer.h[L].mlp.c_fc
    acts = {}
    x = torch.zeros(model.config.n_inner or 4 * model.config.n_embd, requires_grad=True)

    def hook(mod, inp, out):
        acts["a"] = out[0, -1].detach().clone()
        out = out.clone()
        out[0, -1] = x
        return out

    h = fc.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            prob = model(ids).logits[0, -1].softmax(-1)[tok.encode(gt)[0]]
            (g,) = torch.autograd.grad(prob, x)
    finally:
        h.remove()
    torch.testing.assert_close(scores[L].float(), (g * acts["a"]).float(), rtol=1e-4, atol=1e-7)


def test_copy_and_bad_input_leave_the_model_unchanged(monkeypatch):
    seed = random.randrange(1000)
    model, tok = _model("gpt2", seed)
    snap = _bits(model)
    hp = ee.KNHyperParams.from_hparams(FIXTURE)
    reqs = [{"prompt": p, "ground_truth": gt, "target_new": new} for p, gt, new in FACTS[:2]]
    edited, unpatch = ee.apply_kn_to_model(model, tok, reqs, hp, copy=True)
    assert edited is not model and _same(model, snap)
    assert not _same(edited, snap)
    for bad, msg in (([{"prompt": "the capital of france is", "target_new": "rome"}], "ground_truth"),
                     ([], "no KN edit requests"),
                     (reqs, "layer 9 is outside")):
        h = hp if msg != "layer 9 is outside" else ee.KNHyperParams(steps=1, batch_size=1, layers=[0, 9])
        with pytest.raises(kncore.InputError, match=msg) as ei:
            ee.apply_kn_to_model(model, tok, bad, h)
        assert "\n" not in str(ei.value)
        assert _same(model, snap)
    # a failure on the second request takes the first one's update back
    real = ee.kn_update
    calls = []

    def failing(*a):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*a)

    monkeypatch.setattr(ee, "kn_update", failing)
    with pytest.raises(RuntimeError, match="boom"):
        ee.apply_kn_to_model(model, tok, reqs, hp)
    assert len(calls) == 2 and _same(model, snap)
