"""kncore.compat.KnowledgeNeurons gives the numbers of the knowledge-neurons
package (0.0.2) on the same random tiny GPT-2 and BERT models.

Shims, for the peer only and only inside these tests: the package imports
``einops`` (not installed: the Makefile installs the package with --no-deps)
for ``einops.repeat(x, "b d -> (r b) d", r=r)``, which is ``x.repeat(r, 1)``;
and it reads ``token_type_ids`` from BERT encodings, which our word-level test
tokenizer returns once it lists them in ``model_input_names``.
"""
from __future__ import annotations

import importlib
import math
import sys
import types
import warnings

import pytest
import torch

from kncore import InputError
from kncore.compat import KnowledgeNeurons
from kncore.testing import tiny_model, tiny_tokenizer

GPT_PROMPTS = ["the capital of canada is", "canada has the capital city", "the city that is the capital of canada is",
               "in canada the capital is"]
BERT_PROMPTS = ["the capital of canada is [MASK] .", "canada has the capital city [MASK] .",
                "[MASK] is the capital of canada .", "in canada the capital is [MASK] ."]


def _fake_einops():
    m = types.ModuleType("einops")

    def repeat(x, pattern, r):
        if pattern.replace(" ", "") != "bd->(rb)d":
            raise NotImplementedError(pattern)
        return x.repeat(r, 1)

    m.repeat = repeat
    return m


@pytest.fixture(scope="module")
def peer_cls():
    fake = None
    try:
        importlib.import_module("einops")
    except ImportError:
        fake = sys.modules["einops"] = _fake_einops()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kn = importlib.import_module("knowledge_neurons")
    except ImportError as e:
        pytest.skip(f"knowledge-neurons is not importable: {e}")
    finally:
        if fake is not None and sys.modules.get("einops") is fake:
            del sys.modules["einops"]  # the package keeps its own reference
    return kn.KnowledgeNeurons


def _pair(peer_cls, arch, model_type, seed=None):
    """The same random model and tokenizer, wrapped by the peer and by kncore."""
    seed = int(torch.randint(0, 10_000, ())) if seed is None else seed
    model = tiny_model(arch, seed=seed)
    tok = tiny_tokenizer(mlm=(arch == "bert"))
    if arch == "bert":
        tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    return peer_cls(model, tok, model_type=model_type, device="cpu"), \
        KnowledgeNeurons(model, tok, model_type=model_type, device="cpu")


CASES = [("gpt2", "gpt2", "ottawa"), ("gpt2", "gpt", "ottawa paris"), ("bert", "bert", "ottawa")]


def _prompts(arch):
    return BERT_PROMPTS if arch == "bert" else GPT_PROMPTS


def _close(a, b, rel=1e-4):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-30)


@pytest.mark.parametrize("arch,model_type,gt", CASES)
def test_scores_match_peer(peer_cls, arch, model_type, gt):
    peer, ours = _pair(peer_cls, arch, model_type)
    prompt = _prompts(arch)[int(torch.randint(0, 4, ()))]
    want = peer.get_scores(prompt, gt, pbar=False).detach()
    got = ours.get_scores(prompt, gt, pbar=False)
    assert got.shape == want.shape == (ours.n_layers(), ours.intermediate_size())
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    L = int(torch.randint(0, ours.n_layers(), ()))
    one = ours.get_scores_for_layer(prompt, gt, layer_idx=L, steps=10, batch_size=5)
    ref = peer.get_scores_for_layer(prompt, gt, layer_idx=L, steps=10, batch_size=5).detach()
    assert (one - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("arch,model_type,gt", CASES)
def test_coarse_and_refined_match_peer(peer_cls, arch, model_type, gt):
    peer, ours = _pair(peer_cls, arch, model_type)
    prompt = _prompts(arch)[0]
    for rule in (dict(adaptive_threshold=0.3), dict(percentile=99.5)):
        want = peer.get_coarse_neurons(prompt, gt, steps=4, batch_size=4, pbar=False, **rule)
        got = ours.get_coarse_neurons(prompt, gt, steps=4, batch_size=4, pbar=False, **rule)
        assert got == want and len(want) > 0, rule
    want = peer.get_refined_neurons(_prompts(arch)[:3], gt, p=0.5, steps=4, batch_size=4,
                                    coarse_adaptive_threshold=0.2, quiet=True)
    got = ours.get_refined_neurons(_prompts(arch)[:3], gt, p=0.5, steps=4, batch_size=4,
                                   coarse_adaptive_threshold=0.2, quiet=True)
    assert got == want  # same neurons, same order
    assert len(want) > 0


def _same_results(a, b):
    for when in ("before", "after"):
        x, y = a[when], b[when]
        assert x["argmax_completion"] == y["argmax_completion"]
        assert _close(x["gt_prob"], y["gt_prob"]) and _close(x["argmax_prob"], y["argmax_prob"])


@pytest.mark.parametrize("arch,model_type,gt", CASES)
def test_suppress_enhance_match_peer(peer_cls, arch, model_type, gt):
    peer, ours = _pair(peer_cls, arch, model_type)
    prompt = _prompts(arch)[1]
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    idx = torch.randperm(ours.n_layers() * ours.intermediate_size(), generator=g)[:12]
    neurons = [[int(i) // ours.intermediate_size(), int(i) % ours.intermediate_size()] for i in idx]
    for method in ("suppress_knowledge", "enhance_knowledge"):
        want, _ = getattr(peer, method)(prompt, gt, neurons, quiet=True)
        got, fn = getattr(ours, method)(prompt, gt, neurons, quiet=True)
        _same_results(got, want)
        assert not _close(got["before"]["gt_prob"], got["after"]["gt_prob"], rel=1e-6)
        assert fn() == ()  # undone already: the package returns a no-op


def test_undo_false_leaves_model_patched(peer_cls):
    peer, ours = _pair(peer_cls, "gpt2", "gpt2")
    prompt, gt = GPT_PROMPTS[0], "ottawa"
    neurons = [[0, 3], [1, 17], [2, 100]]
    ids = torch.tensor([ours.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        base = ours.model(ids).logits
    _, unpatch_peer = peer.enhance_knowledge(prompt, gt, neurons, undo_modification=False, quiet=True)
    with torch.no_grad():
        want = peer.model(ids).logits
    unpatch_peer()
    _, unpatch = ours.enhance_knowledge(prompt, gt, neurons, undo_modification=False, quiet=True)
    with torch.no_grad():
        got_hf = ours.model(ids).logits
        got_rt = ours.lm.run(ids).logits
    unpatch()
    with torch.no_grad():
        after = ours.model(ids).logits
    scale = want.abs().max().item()
    assert (got_hf - want).abs().max().item() <= 1e-5 * scale
    assert (got_rt - want).abs().max().item() <= 1e-4 * scale
    assert not torch.equal(want, base) and torch.equal(after, base)


@pytest.mark.parametrize("arch,model_type,erase_value", [("gpt2", "gpt2", "zero"), ("bert", "bert", "zero"),
                                                         ("bert", "bert", "unk")])
def test_erase_and_edit_match_peer(peer_cls, arch, model_type, erase_value):
    peer, ours = _pair(peer_cls, arch, model_type)
    prompt, gt = _prompts(arch)[2], "ottawa"
    neurons = [[0, 5], [1, 40], [2, 7], [2, 99]]
    state = {k: v.clone() for k, v in ours.model.state_dict().items()}
    want, _ = peer.erase_knowledge(prompt, neurons, erase_value=erase_value, target=gt, quiet=True)
    got, _ = ours.erase_knowledge(prompt, neurons, erase_value=erase_value, target=gt, quiet=True)
    _same_results(got, want)
    if arch == "bert":
        want, _ = peer.edit_knowledge(prompt, "paris", neurons, quiet=True)
        got, _ = ours.edit_knowledge(prompt, "paris", neurons, quiet=True)
        _same_results(got, want)
    for k, v in ours.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    res, _ = ours.erase_knowledge(prompt, neurons, quiet=True)  # no target: the package crashes here
    assert res["before"]["gt_prob"] is None and isinstance(res["after"]["argmax_prob"], float)


@pytest.mark.parametrize("arch,model_type", [("gpt2", "gpt2"), ("bert", "bert")])
def test_baseline_activations_and_helpers_match_peer(peer_cls, arch, model_type):
    peer, ours = _pair(peer_cls, arch, model_type)
    prompt = _prompts(arch)[3]
    enc, mask_idx, label = peer._prepare_inputs(prompt, "ottawa")
    enc2, mask_idx2, label2 = ours._prepare_inputs(prompt, "ottawa")
    assert mask_idx == mask_idx2 and label == label2
    for L in range(ours.n_layers()):
        out_p, act_p = peer.get_baseline_with_activations(enc, L, mask_idx)
        out_o, act_o = ours.get_baseline_with_activations(enc2, L, mask_idx2)
        assert act_o.shape == act_p.shape
        assert (act_o - act_p).abs().max().item() <= 1e-5 * act_p.abs().max().item()
        assert (out_o.logits - out_p.logits).abs().max().item() <= 1e-4 * out_p.logits.abs().max().item()
    a = torch.randn(1, 13)
    assert torch.equal(KnowledgeNeurons.scaled_input(a, steps=7), peer.scaled_input(a, steps=7))
    assert ours.n_layers() == peer.n_layers()
    assert ours.transformer_layers_attr == peer.transformer_layers_attr
    assert ours.input_ff_attr == peer.input_ff_attr
    assert ours._get_input_ff_layer(1) is peer._get_input_ff_layer(1)


def test_negative_examples_filter(peer_cls):
    _, ours = _pair(peer_cls, "bert", "bert")
    gt = "ottawa"
    plain = ours.get_refined_neurons(BERT_PROMPTS, gt, p=0.2, steps=10, coarse_adaptive_threshold=0.2, quiet=True)
    negs = ["the dog was [MASK] .", "red is a [MASK] ."]
    neg_coarse = [set(map(tuple, ours.get_coarse_neurons(n, gt, steps=10, adaptive_threshold=0.2, pbar=False)))
                  for n in negs]
    got = ours.get_refined_neurons(BERT_PROMPTS, gt, p=0.2, steps=10, coarse_adaptive_threshold=0.2, quiet=True,
                                   negative_examples=negs)
    assert got == [n for n in plain if not any(tuple(n) in c for c in neg_coarse)]


def test_bad_input(peer_cls):
    _, gpt2 = _pair(peer_cls, "gpt2", "gpt2")
    _, bert = _pair(peer_cls, "bert", "bert")
    with pytest.raises(InputError, match="one token"):
        gpt2.get_scores(GPT_PROMPTS[0], "ottawa paris", pbar=False)  # the package crashes in autograd
    with pytest.raises(InputError, match="one token"):
        bert.get_scores(BERT_PROMPTS[0], "ottawaparis", pbar=False)  # the package silently uses [UNK]
    with pytest.raises(InputError, match="empty prompt"):
        gpt2.get_scores("  ", "ottawa", pbar=False)
    long = " ".join(["the"] * 80)
    with pytest.raises(InputError, match="context"):
        gpt2.get_scores(long, "ottawa", pbar=False)
    with pytest.raises(InputError, match="MASK"):
        bert.get_scores("the capital of canada is ottawa .", "ottawa", pbar=False)
    with pytest.raises(InputError, match="MASK"):
        bert.suppress_knowledge("the capital of canada is ottawa .", "ottawa", [[0, 1]], quiet=True)
    with pytest.raises(InputError, match="one and only one"):
        gpt2.get_coarse_neurons(GPT_PROMPTS[0], "ottawa", adaptive_threshold=0.2, threshold=0.1, pbar=False)
    with pytest.raises(InputError, match="list"):
        gpt2.get_refined_neurons(GPT_PROMPTS[0], "ottawa", quiet=True)
    with pytest.raises(InputError, match="layer"):
        gpt2.suppress_knowledge(GPT_PROMPTS[0], "ottawa", [[9, 1]], quiet=True)
    with pytest.raises(InputError, match="model_type"):
        KnowledgeNeurons(gpt2.model, gpt2.tokenizer, model_type="bert", device="cpu")
    with pytest.raises(NotImplementedError):
        KnowledgeNeurons(gpt2.model, gpt2.tokenizer, model_type="t5", device="cpu")
    assert math.isfinite(gpt2.get_scores(GPT_PROMPTS[0], "ottawa", steps=7, batch_size=3, pbar=False).sum().item())
