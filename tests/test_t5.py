"""T5 (encoder-decoder): runtime parity with the Hugging Face forward, the
decoder's key/value cache, KN attribution against plain references, KN edits,
causal tracing against hooks on the HF model, and the bad-input errors."""
from __future__ import annotations

import json

import pytest
import torch

import kncore
from kncore import InputError, t5
from kncore.runtime import Patch
from kncore.runtime_t5 import decode, encode, shift_right
from kncore.testing import ENC_DEC_ARCHS, tiny_lm

PROMPT = "the capital of canada is"
TARGET = "ottawa , canada"


@pytest.fixture(scope="module", params=ENC_DEC_ARCHS)
def t5lm(request):
    return tiny_lm(request.param)


def _hf_logits(model, enc, emask, dec, dmask):
    return model(input_ids=enc, attention_mask=emask, decoder_input_ids=dec,
                 decoder_attention_mask=dmask).logits


def _batch(V, lens, seed):
    g = torch.Generator().manual_seed(seed)
    T = max(lens)
    ids = torch.randint(7, V, (len(lens), T), generator=g)
    mask = torch.arange(T)[None] < torch.tensor(lens)[:, None]
    return ids.masked_fill(~mask, 0), mask


@pytest.mark.parametrize("arch", ENC_DEC_ARCHS)
def test_logits_match_hf_fp32_and_cache(arch):
    lm = tiny_lm(arch)
    ad = lm.adapter
    assert (ad.n_layers, ad.encoder.n_layers) == (2, 3)  # the stacks are not mixed up
    assert ad.gated == (arch == "t5_v11") and ad.rescale == (arch == "t5")
    V = ad.vocab_size
    enc, emask = _batch(V, [17, 1, 9], 1)
    dec, dmask = _batch(V, [1, 17, 5], 2)
    with torch.no_grad():
        ref = _hf_logits(lm.model, enc, emask.long(), dec, dmask.long())
        e = encode(ad, enc, attention_mask=emask)
        out = decode(ad, dec, enc=e, attention_mask=dmask, return_kv=True)
    scale = ref[dmask].abs().max()
    assert (out.logits[dmask] - ref[dmask]).abs().max() <= 1e-4 * scale
    # the cache: the first 6 positions, then the rest over their keys/values
    with torch.no_grad():
        d2 = dec[1:2]
        first = decode(ad, d2[:, :6], enc=e, enc_rows=torch.tensor([1]), return_kv=True)
        rest = decode(ad, d2[:, 6:], enc=e, enc_rows=torch.tensor([1]), past=first.kv)
        rest1 = decode(ad, d2[:, 6:7], enc=e, enc_rows=torch.tensor([1]), past=first.kv)
    assert (rest.logits[0] - ref[1, 6:]).abs().max() <= 1e-4 * scale
    assert (rest1.logits[0, 0] - ref[1, 6]).abs().max() <= 1e-4 * scale


@pytest.mark.parametrize("arch", ENC_DEC_ARCHS)
def test_logits_bf16_within_twice_hf_bf16(arch):
    lm32 = tiny_lm(arch)
    lm16 = tiny_lm(arch, dtype=torch.bfloat16)
    V = lm32.adapter.vocab_size
    enc, emask = _batch(V, [17, 4], 3)
    dec, dmask = _batch(V, [17, 1], 4)
    with torch.no_grad():
        ref = _hf_logits(lm32.model, enc, emask.long(), dec, dmask.long())
        hf16 = _hf_logits(lm16.model, enc, emask.long(), dec, dmask.long()).float()
        e = encode(lm16.adapter, enc, attention_mask=emask)
        ours = decode(lm16.adapter, dec, enc=e, attention_mask=dmask).logits.float()
    err_hf = (hf16[dmask] - ref[dmask]).abs().max()
    err = (ours[dmask] - ref[dmask]).abs().max()
    assert err_hf > 0 and err <= 2 * err_hf, (float(err), float(err_hf))


def test_capture_sites_match_hf_hooks(t5lm):
    """act (input of wo) and mlp_out (output of wo) of both stacks, and the
    encoder's attn_out, against forward hooks on the HF modules."""
    ad = t5lm.adapter
    enc_ids, tgt, dec_in = t5._pair(t5lm, PROMPT, TARGET)
    got = {}
    hooks = []
    for name, sa in (("enc", ad.encoder), ("dec", ad)):
        for L in range(sa.n_layers):
            wo = sa.down_module(L)
            hooks.append(wo.register_forward_hook(
                lambda m, a, o, k=(name, L): got.__setitem__(k, (a[0].detach(), o.detach()))))
            att = sa.blocks[L].layer[0].SelfAttention
            hooks.append(att.register_forward_hook(
                lambda m, a, o, k=(name, L): got.__setitem__(k + ("attn",), o[0].detach())))
    try:
        with torch.no_grad():
            t5lm.model(input_ids=enc_ids, decoder_input_ids=dec_in)
    finally:
        for h in hooks:
            h.remove()
    caps = [(s, L) for s in ("act", "mlp_out", "attn_out") for L in range(ad.encoder.n_layers)]
    with torch.no_grad():
        e = encode(ad, enc_ids, capture=caps)
        d = decode(ad, dec_in, enc=e, capture=[(s, L) for s in ("act", "mlp_out") for L in range(ad.n_layers)])
    for L in range(ad.encoder.n_layers):
        torch.testing.assert_close(e[("act", L)], got[("enc", L)][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(e[("mlp_out", L)], got[("enc", L)][1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(e[("attn_out", L)], got[("enc", L, "attn")], rtol=1e-4, atol=1e-5)
    for L in range(ad.n_layers):
        torch.testing.assert_close(d[("act", L)], got[("dec", L)][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(d[("mlp_out", L)], got[("dec", L)][1], rtol=1e-4, atol=1e-5)


def test_layout_and_model_errors():
    import transformers as tf
    cfg = tf.T5Config(d_model=16, d_kv=4, d_ff=20, num_layers=1, num_heads=4, vocab_size=50,
                      feed_forward_proj="gated-silu", decoder_start_token_id=0)
    with pytest.raises(ValueError, match="unsupported T5 layout feed_forward_proj='gated-silu'"):
        kncore.from_hf(tf.T5ForConditionalGeneration(cfg), None)
    cfg = tf.T5Config(d_model=16, d_kv=4, d_ff=20, num_layers=1, num_heads=4, vocab_size=50)
    with pytest.raises(ValueError, match="T5ForConditionalGeneration"):
        kncore.from_hf(tf.T5EncoderModel(cfg), None)
    with pytest.raises(InputError, match="needs a T5 model"):
        t5.target_probs(tiny_lm("gpt2"), PROMPT, TARGET)


def test_shift_right_and_target_errors(t5lm):
    ad = t5lm.adapter
    tgt = torch.tensor([[11, 12, 13]])
    assert shift_right(ad, tgt).tolist() == [[ad.start_id, 11, 12]]
    with pytest.raises(InputError, match="longer than the decoder context of 64"):
        t5.target_probs(t5lm, PROMPT, " ".join(["paris"] * 65))
    with pytest.raises(InputError, match="empty target"):
        t5.target_probs(t5lm, PROMPT, "  ")


# -- KN attribution ------------------------------------------------------------------------
def test_target_probs_use_the_shifted_decoder_input(t5lm):
    """P(target[q] | prompt, target[:q]) equals HF's labels= path (which shifts itself)."""
    enc_ids, tgt, _ = t5._pair(t5lm, PROMPT, TARGET)
    with torch.no_grad():
        ref = t5lm.model(input_ids=enc_ids, labels=tgt).logits[0].softmax(-1)
    ref = ref.gather(1, tgt[0][:, None])[:, 0]
    torch.testing.assert_close(t5.target_probs(t5lm, PROMPT, TARGET), ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("stack,site,scheme", [("decoder", "act", "gauss"), ("decoder", "pre_act", "midpoint"),
                                               ("encoder", "act", "riemann-left"), ("encoder", "pre_act", "gauss")])
def test_attribute_matches_full_recompute_reference(t5lm, stack, site, scheme):
    """The suffix-cached engine (decoder) and the encoder path against IG through
    hooks on the HF forward, every step a full forward."""
    att = t5.attribute(t5lm, [PROMPT, "the capital of france is"], [TARGET, "paris"], stack=stack, site=site,
                       steps=5, scheme=scheme)
    N = t5lm.adapter.stack_adapter(stack).n_layers
    assert att.scores.shape == (2, N, t5lm.adapter.d_ff) and att.meta["stack"] == stack
    for i, (p, t) in enumerate([(PROMPT, TARGET), ("the capital of france is", "paris")]):
        for L in range(N):
            ref = t5.attribute_ref(t5lm, p, t, L, stack=stack, site=site, steps=5, scheme=scheme)
            scale = ref.abs().max()
            assert scale > 0
            assert (att.scores[i, L] - ref).abs().max() <= 1e-4 * scale, (i, L)


def test_attribute_knowledge_neurons_algorithm_with_the_shift(t5lm):
    """knowledge-neurons' IG (linspace points, summed gradients / m, the down-projection
    input patched at the predicting position), with the decoder input shifted right."""
    att = t5.attribute(t5lm, PROMPT, "ottawa", layers=[1], steps=20, scheme="linspace")
    ref = t5.attribute_ref(t5lm, PROMPT, "ottawa", 1, steps=20, scheme="linspace")
    assert (att.scores[0, 0] - ref).abs().max() <= 1e-4 * ref.abs().max()
    # completeness improves with the steps of a proper rule (ReLU kinks in the
    # layers above slow Gauss-Legendre down: 12 steps measured 6.4e-3 at most)
    att = t5.attribute(t5lm, PROMPT, TARGET, steps=12, scheme="gauss")
    coarse = t5.attribute(t5lm, PROMPT, TARGET, steps=2, scheme="gauss")
    assert float(att.completeness_gap.max()) < 2e-2
    assert float(att.completeness_gap.max()) < float(coarse.completeness_gap.max())
    assert att.base_probs[0] == pytest.approx(float(torch.tensor(att.token_probs[0]).prod()), rel=1e-6)


def test_attribute_errors(t5lm):
    with pytest.raises(ValueError, match="the decoder has 2 layers"):
        t5.attribute(t5lm, PROMPT, TARGET, layers=[2])
    with pytest.raises(ValueError, match="stack must be 'decoder' or 'encoder'"):
        t5.attribute(t5lm, PROMPT, TARGET, stack="both")
    with pytest.raises(InputError, match="prompt 0 .*longer than the decoder context"):
        t5.attribute(t5lm, PROMPT, " ".join(["rome"] * 70))


# -- KN edits ----------------------------------------------------------------------------------
def _active_neurons(lm, prompt):
    """Three decoder neurons active at position 0 (ReLU zeroes many): two of layer 1, one of layer 0."""
    ad = lm.adapter
    enc_ids, _, _ = t5._pair(lm, prompt, "ottawa")
    with torch.no_grad():
        d = decode(ad, torch.tensor([[ad.start_id]]), enc=encode(ad, enc_ids), capture=[("act", 0), ("act", 1)])
    top0 = d[("act", 0)][0, 0].abs().topk(1).indices.tolist()
    top1 = sorted(d[("act", 1)][0, 0].abs().topk(2).indices.tolist())
    return [(0, top0[0]), (1, top1[0]), (1, top1[1])]


def _hf_probs(lm, prompt, target):
    enc_ids, tgt, dec_in = t5._pair(lm, prompt, target)
    with torch.no_grad():
        p = lm.model(input_ids=enc_ids, decoder_input_ids=dec_in).logits[0].softmax(-1)
    return p.gather(1, tgt[0][:, None])[:, 0]


@pytest.mark.parametrize("mode,site", [("suppress", "act"), ("enhance", "act"), ("enhance", "pre_act")])
def test_patch_neurons_on_the_decoder(t5lm, mode, site):
    """patch_neurons acts at the predicting decoder position: in the runtime and in
    the HF forward alike, and as an explicit runtime Patch there."""
    KNS = _active_neurons(t5lm, PROMPT)
    before = t5.target_probs(t5lm, PROMPT, "ottawa")
    idx = {0: [KNS[0][1]], 1: [KNS[1][1], KNS[2][1]]}
    kw = {"value": torch.zeros(())} if mode == "suppress" else {"scale": 2.0}
    manual = t5.target_probs(t5lm, PROMPT, "ottawa",
                             patches=[Patch(site, L, positions=[0], neurons=ix, **kw) for L, ix in idx.items()])
    with kncore.patch_neurons(t5lm, KNS, mode=mode, site=site):
        ours = t5.target_probs(t5lm, PROMPT, "ottawa")
        hf = _hf_probs(t5lm, PROMPT, "ottawa")
    assert not torch.allclose(ours, before)
    torch.testing.assert_close(ours, manual, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours, hf, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(t5.target_probs(t5lm, PROMPT, "ottawa"), before, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["erase", "edit"])
def test_erase_and_dai_edit_undo_exactly(t5lm, mode):
    ad = t5lm.adapter
    KNS = _active_neurons(t5lm, PROMPT)
    before = {k: v.clone() for k, v in t5lm.model.state_dict().items()}
    p0 = t5.target_probs(t5lm, PROMPT, "paris")
    pred = t5._top1(t5lm, PROMPT)
    emb = ad.embedding_module().weight
    new = t5.target_ids(t5lm, "paris")[0]
    with t5.edit_neurons(t5lm, KNS, mode=mode, prompt=PROMPT, target="paris"):
        for l, i in KNS:
            want = torch.zeros(ad.d_model) if mode == "erase" else before[f"decoder.block.{l}.layer.2.DenseReluDense.wo.weight"][:, i] + 2 * (emb[new] - emb[pred])
            torch.testing.assert_close(ad.down_weight(l)[i], want)
        ours = t5.target_probs(t5lm, PROMPT, "paris")
        torch.testing.assert_close(ours, _hf_probs(t5lm, PROMPT, "paris"), rtol=1e-4, atol=1e-7)
        assert not torch.allclose(ours, p0)
    after = t5lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    with pytest.raises(InputError, match=r"neuron \(5, 0\) outside the decoder's 2 layers"):
        t5.edit_neurons(t5lm, [(0, 1), (5, 0)], mode="erase")
    with pytest.raises(InputError, match=r"neuron \(5, 0\) outside 2 layers"):
        t5.edit_neurons(t5lm, [(0, 1), (5, 0)], mode="edit", prompt=PROMPT, target="paris")
    with pytest.raises(InputError, match="needs a prompt and a target"):
        t5.edit_neurons(t5lm, KNS, mode="edit")
    with t5.edit_neurons(t5lm, [(2, 5)], mode="erase", stack="encoder"):  # the encoder's neurons
        assert not t5lm.adapter.encoder.down_weight(2)[5].any()
        torch.testing.assert_close(t5.target_probs(t5lm, PROMPT, "paris"), _hf_probs(t5lm, PROMPT, "paris"),
                                   rtol=1e-4, atol=1e-7)
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- the KN-edit table on T5: scoring and edit_eval -----------------------------------------
SCORED = [(PROMPT, TARGET), ("the capital of france is", "paris"), (PROMPT, "ottawa"),
          ("she speaks", "french and english , not german")]


def test_score_targets_teacher_force_the_shifted_target(t5lm):
    """kncore.evaluation.score_targets on T5, batched over targets of several
    lengths (right padding in both stacks), equals HF's labels= path (which
    shifts the decoder input itself) token by token, and differs from feeding
    the target unshifted; patches apply to the decoder."""
    from kncore.evaluation import score_targets
    from kncore.family import family
    assert family(t5lm).encoder_decoder and not family(tiny_lm("gpt2")).encoder_decoder
    got = score_targets(t5lm, [p for p, _ in SCORED], [t for _, t in SCORED], batch_size=3)
    gaps = []
    for (p, t), sc in zip(SCORED, got):
        enc_ids, tgt, _ = t5._pair(t5lm, p, t)
        with torch.no_grad():
            lp = t5lm.model(input_ids=enc_ids, labels=tgt).logits[0].float().log_softmax(-1)
            unshifted = t5lm.model(input_ids=enc_ids, decoder_input_ids=tgt).logits[0].float().log_softmax(-1)
        assert sc.ids == tgt[0].tolist()
        torch.testing.assert_close(torch.tensor(sc.logprobs), lp.gather(1, tgt[0][:, None])[:, 0],
                                   rtol=1e-4, atol=1e-5)
        assert sc.argmax == lp.argmax(-1).tolist()
        gaps.append((torch.tensor(sc.logprobs) - unshifted.gather(1, tgt[0][:, None])[:, 0]).abs().max())
    assert max(gaps) > 0.1  # feeding the target unshifted would score something else
    patch = [Patch("act", 1, neurons=[n for l, n in _active_neurons(t5lm, PROMPT) if l == 1], value=torch.zeros(()))]
    sc = score_targets(t5lm, [PROMPT], [TARGET], patches=patch)[0]
    torch.testing.assert_close(torch.tensor(sc.logprobs).exp(), t5.target_probs(t5lm, PROMPT, TARGET, patches=patch),
                               rtol=1e-4, atol=1e-7)
    with pytest.raises(InputError, match="minimal-pair scores run on decoders and masked LMs"):
        kncore.evaluation.minimal_pair_scores(t5lm, [None])


CAPITALS = [("canada", "ottawa"), ("france", "paris"), ("italy", "rome"), ("germany", "berlin"), ("japan", "tokyo")]


def _zsre_shaped(folder):
    """A zsRE file (MEND's layout) in data_dir/zsre: questions, a rephrasing, an NQ-style locality question."""
    recs = [{"subject": s, "src": f"what is the capital of {s} ?", "pred": o,
             "rephrase": f"what city is the capital of {s} ?", "alt": CAPITALS[(k + 1) % 5][1], "answers": [o],
             "loc": f"nq question: what language is spoken in {CAPITALS[(k + 2) % 5][0]}", "loc_ans": "french"}
            for k, (s, o) in enumerate(CAPITALS[:3])]
    (folder / "zsre").mkdir(parents=True)
    (folder / "zsre" / "zsre_mend_eval_first5_sample.json").write_text(json.dumps(recs))
    return "zsre"


def _counterfact_shaped(folder):
    """A CounterFact file in ROME's layout: the rewrite, paraphrases, neighbourhood prompts."""
    recs = [{"case_id": k, "requested_rewrite": {"prompt": "the capital of {} is", "relation_id": "P36",
                                                 "subject": s, "target_new": {"str": CAPITALS[(k + 1) % 5][1]},
                                                 "target_true": {"str": o}},
             "paraphrase_prompts": [f"the capital city of {s} is", f"{s} has its capital in"],
             "neighborhood_prompts": [f"the capital of {CAPITALS[(k + 2) % 5][0]} is"]}
            for k, (s, o) in enumerate(CAPITALS[:3])]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cf.json").write_text(json.dumps(recs))
    return str(folder / "cf.json")


@pytest.mark.parametrize("shape", ["zsre", "counterfact"])
def test_edit_eval_kn_on_t5(t5lm, shape, tmp_path):
    """The paper's KN-edit table on T5: edit_eval(editor="kn") localises decoder
    neurons with t5.attribute, applies Dai's edit, scores reliability,
    generality and locality teacher-forced with the shifted decoder input, and
    writes rows with the decoder-only rows' columns; every edit is undone."""
    from kncore import experiments as X
    ds = (_zsre_shaped if shape == "zsre" else _counterfact_shaped)(tmp_path / "data")
    kw = dict(editor="kn", kn_steps=3, extra_probes=False, data_dir=tmp_path / "data", progress=False, chunk=2)
    before = {k: v.clone() for k, v in t5lm.model.state_dict().items()}
    res = X.edit_eval(t5lm, ds, tmp_path / "t5", **kw)
    after = t5lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {r["kind"] for r in res["kinds"]} == {"reliability", "generality", "locality"}
    assert res["summary"]["n_cases"] == 3
    edited = 0
    for (key, c), r in zip(X.edit_cases(t5lm, ds, extra_probes=False, data_dir=tmp_path / "data"), res["edits"]):
        assert r["key"] == key and r["n_reliability"] == 1 and r["n_locality"] == 1
        # the pre-edit score is the teacher-forced one of kncore.t5
        assert r["reliability_prob_pre"] == pytest.approx(float(t5.target_probs(t5lm, c.prompt, c.target_new).prod()),
                                                          rel=1e-4)
        assert set(r["kn_layers"]) <= {0, 1}  # the decoder's layers
        # the post-edit score is that of the same KN edit applied by hand
        with X.kn_fact_edit(t5lm, c, steps=3) as e:
            assert len(e.neurons) == r["n_kn"]
            post = float(t5.target_probs(t5lm, c.prompt, c.target_new).prod())
        assert r["reliability_prob_post"] == pytest.approx(post, rel=1e-4)
        if r["n_kn"]:
            edited += 1
            assert r["reliability_prob_post"] != r["reliability_prob_pre"]
            if t5lm.adapter.rescale:
                # v1.0 ties the head to the embeddings, so Dai's edit (value
                # vectors += 2 (E[new] - E[old])) raises the new answer. v1.1
                # unties them: the input embedding is not the output direction
                # (on this random model it can lower P(new)).
                assert r["reliability_prob_post"] > r["reliability_prob_pre"]
                assert r["generality_prob_post"] > r["generality_prob_pre"]
    assert edited >= 2
    # the same table from a decoder-only model has the same columns
    gpt2 = X.edit_eval(tiny_lm("gpt2"), ds, tmp_path / "gpt2", **kw)
    assert set(gpt2["edits"][0]) == set(res["edits"][0]) and set(gpt2["kinds"][0]) == set(res["kinds"][0])


@pytest.mark.parametrize("mode", ["suppress", "enhance"])
def test_kn_patch_edits_move_the_target_on_t5(t5lm, mode):
    """patch_neurons on the decoder neurons that t5.attribute ranks highest for a
    target, evaluated by kncore.evaluation.evaluate_edit: suppress lowers the
    target's probability, enhance raises it, in the scorer and in t5.target_probs alike."""
    from kncore.evaluation import EditCase, Probe, evaluate_edit
    att = t5.attribute(t5lm, PROMPT, "ottawa", steps=6)
    top = att.scores[0].flatten().topk(4).indices.tolist()
    kns = [(att.layers[i // t5lm.d_ff], i % t5lm.d_ff) for i in top]
    case = EditCase(0, "canada", PROMPT, "ottawa", "paris", None,
                    [Probe("reliability", PROMPT, "ottawa", "paris")])
    row = evaluate_edit(t5lm, case, lambda: kncore.patch_neurons(t5lm, kns, mode=mode))
    with kncore.patch_neurons(t5lm, kns, mode=mode):
        want = float(t5.target_probs(t5lm, PROMPT, "ottawa").prod())
    assert row["reliability_prob_post"] == pytest.approx(want, rel=1e-4)
    moved = row["reliability_prob_post"] - row["reliability_prob_pre"]
    assert (moved < 0) if mode == "suppress" else (moved > 0), row


def test_edit_eval_rome_on_t5_refused(t5lm, tmp_path):
    from kncore import experiments as X
    with pytest.raises(InputError, match=r"edit_eval\(editor='rome'\) does not run on T5 .*kncore.t5.rome_edit") as e:
        X.edit_eval(t5lm, "counterfact", tmp_path / "x", editor="rome")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()  # refused before anything is written


# -- causal tracing --------------------------------------------------------------------------------
def _rome_loop_hf(lm, prompt, subject, target, kind, stack, t, l, samples, noise_t, window):
    """ROME's loop for one cell on the HF model: row 0 clean, rows 1.. corrupted
    (noise added to the subject's embeddings at the input of encoder block 0),
    forward hooks copying row 0's state into the others at the restored cell."""
    from kncore.tracing.core import window_layers
    ad = lm.adapter
    enc_ids, tgt, dec_in = t5._pair(lm, prompt, target)
    b, e = lm.subject_span(prompt, subject)
    sa = ad.stack_adapter(stack)
    hooks = []

    def corrupt(m, args):
        h = args[0].clone()
        h[1:, b:e] += noise_t
        return (h, *args[1:])

    def restore(m, a, o):
        first = o[0] if isinstance(o, tuple) else o
        first = first.clone()
        first[1:, t] = first[0, t]
        return (first, *o[1:]) if isinstance(o, tuple) else first
    hooks.append(ad.encoder.blocks[0].register_forward_pre_hook(corrupt))
    mods = []
    if kind == "hidden":
        mods = [sa.blocks[l]]
    else:
        for L in window_layers(l, window, sa.n_layers):
            blk = sa.blocks[L]
            mods += ([blk.layer[-1].DenseReluDense] if kind == "mlp" else
                     [blk.layer[0].SelfAttention] + ([blk.layer[1].EncDecAttention] if stack == "decoder" else []))
    hooks += [m.register_forward_hook(restore) for m in mods]
    try:
        with torch.no_grad():
            R = samples + 1
            logits = lm.model(input_ids=enc_ids.expand(R, -1), decoder_input_ids=dec_in.expand(R, -1)).logits
    finally:
        for h in hooks:
            h.remove()
    p = logits.softmax(-1).gather(2, tgt.expand(R, -1)[..., None])[..., 0].prod(-1)
    return float(p[1:].mean())


def test_trace_matches_rome_loop_on_hf(t5lm):
    from kncore.tracing.core import noise_array, resolve_noise
    prompt, subject = "the capital of canada is", "canada"
    tr = t5.trace(t5lm, prompt, subject, target="ottawa ,", samples=3, window=3, seed=2, max_rows=20)
    noise_t = resolve_noise(t5lm, "3sd") * torch.from_numpy(noise_array(2, 3, 1, t5lm.d_model))
    assert tr.encoder.scores["mlp"].shape == (5, 3) and tr.decoder.scores["attn"].shape == (2, 2)
    assert tr.encoder.subject_range == (3, 4) and tr.encoder.low < tr.encoder.high
    for stack, res in (("encoder", tr.encoder), ("decoder", tr.decoder)):
        for kind in ("hidden", "mlp", "attn"):
            for t in range(res.scores[kind].shape[0]):
                for l in range(res.scores[kind].shape[1]):
                    ref = _rome_loop_hf(t5lm, prompt, subject, "ottawa ,", kind, stack, t, l, 3, noise_t, 3)
                    assert res.scores[kind][t, l] == pytest.approx(ref, rel=1e-4, abs=1e-9), (stack, kind, t, l)
    # one target token: restoring the last decoder block's output at position 0 gives the clean run back
    one = t5.trace(t5lm, prompt, subject, target="ottawa", kinds=["hidden"], samples=2)
    assert one.decoder.scores["hidden"][0, -1] == pytest.approx(one.decoder.high, rel=1e-5)
    assert one.decoder.answer == "ottawa"


def test_trace_bad_input(t5lm):
    with pytest.raises(InputError, match="subject 'paris' is not in the prompt"):
        t5.trace(t5lm, PROMPT, "paris")
    with pytest.raises(InputError, match="unknown kind"):
        t5.trace(t5lm, PROMPT, "canada", kinds=["resid"])


def test_local_folder_loads_through_load(t5lm, tmp_path):
    """A saved Hugging Face T5 folder loads through kncore.load (AutoModelForSeq2SeqLM)."""
    t5lm.model.save_pretrained(tmp_path)
    t5lm.tokenizer.save_pretrained(tmp_path)
    got = kncore.load(str(tmp_path))
    assert type(got.adapter) is type(t5lm.adapter) and got.adapter.gated == t5lm.adapter.gated
    torch.testing.assert_close(t5.target_probs(got, PROMPT, TARGET), t5.target_probs(t5lm, PROMPT, TARGET),
                               rtol=0, atol=0)


def test_decoder_only_methods_refuse_t5(t5lm):
    """The decoder-only entry points name the T5 path instead of running a decoder without cross-attention."""
    with pytest.raises(ValueError, match="encoder-decoder model: use kncore.t5"):
        t5lm.top_k(PROMPT)
    with pytest.raises(ValueError, match="encoder-decoder model: use kncore.t5"):
        kncore.attribute(t5lm, PROMPT, "ottawa")
    with pytest.raises(ValueError, match="encoder-decoder model: use kncore.t5"):
        kncore.trace(t5lm, PROMPT, "canada")
    with pytest.raises(InputError, match="ROME on T5 .* kncore.t5.rome_edit"):
        kncore.rome.edit(t5lm, {"prompt": "the capital of {} is", "subject": "canada", "target_new": "rome"},
                         kncore.rome.ROMEHparams(layers=[0]))


# -- ROME on the encoder ------------------------------------------------------------------------
STATS_TEXTS = [" ".join(w) for w in (
    "the capital of france is paris and the capital of italy is rome".split(),
    "dogs and cats were born in tokyo".split(), "she speaks french and english".split(),
    "a small red apple was on the big blue sketch".split(), "he works in physics and music".split())] * 4


def test_layer_stats_match_hf_hooks(t5lm):
    st = t5.layer_stats(t5lm, 1, STATS_TEXTS[:5], batch=2)
    ks = []
    h = t5lm.adapter.encoder.down_module(1).register_forward_pre_hook(lambda m, a: ks.append(a[0][0].double()))
    try:
        with torch.no_grad():
            for s in STATS_TEXTS[:5]:
                ids = torch.tensor([t5lm.tokenize(s)])
                t5lm.model(input_ids=ids, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))
    finally:
        h.remove()
    k = torch.cat(ks)
    assert st.n_tokens == k.shape[0]
    ref = k.T @ k / k.shape[0]  # fp32 keys from two code paths: 1e-5 of the matrix's scale
    assert (st.second_moment - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_rome_on_the_encoder(t5lm):
    from kncore.rome import ROMEHparams
    req = {"prompt": "the capital of {} is", "subject": "canada", "target_new": "rome"}
    stats = t5.layer_stats(t5lm, 1, STATS_TEXTS)
    # a looser clamp and decay than ROME's defaults: one encoder token moves these
    # random tiny decoders little (measured: v1.0 p 0.0097 -> 0.020, v1.1 -> 0.48)
    hp = ROMEHparams(layers=[1], mom2_reg=1e-2, v_num_grad_steps=30, clamp_norm_factor=50, v_weight_decay=0.01,
                     v_lr=1.0)
    before = {k: v.clone() for k, v in t5lm.model.state_dict().items()}
    p0 = float(t5.target_probs(t5lm, "the capital of canada is", "rome")[0])
    with t5.rome_edit(t5lm, req, 1, hparams=hp, stats=stats) as ed:
        s = ed.steps[0]
        ad = t5lm.adapter
        # ROME's identity: the edited wo maps k* to v*; only that weight moved
        torch.testing.assert_close(s.key @ ad.encoder.down_weight(1), s.v_star, rtol=1e-4, atol=1e-5)
        changed = [k for k, v in t5lm.model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed == ["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
        p1 = float(t5.target_probs(t5lm, "the capital of canada is", "rome")[0])
        assert p1 > 1.5 * p0 and p1 == pytest.approx(s.p_target, rel=0.2)
        assert t5.top_k(t5lm, "the capital of canada is", 1)[0][0] == "rome"
        with torch.no_grad():  # the HF forward sees the same edit
            hf = _hf_probs(t5lm, "the capital of canada is", "rome")
        assert float(hf[0]) == pytest.approx(p1, rel=1e-4)
    after = t5lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(InputError, match="subject 'paris' is not in the prompt"):
        t5.rome_edit(t5lm, {"prompt": "the capital of canada is", "subject": "paris", "target_new": "rome"}, 1,
                     hparams=hp, stats=stats)
    with pytest.raises(InputError, match="needs stats="):
        t5.rome_edit(t5lm, req, 1, hparams=hp)


def _rome_ref_hf(lm, req, layer, hp, C):
    """Plain ROME on T5 through hooks on an fp64 copy of the HF model: one
    forward per row, the delta added to encoder wo's output at the subject's
    last token, ROME's loss and Adam loop, then W += (v* - v) / (k . u) u^T."""
    import copy
    import torch.nn.functional as F
    model = copy.deepcopy(lm.model).double()
    wo = model.encoder.block[layer].layer[-1].DenseReluDense.wo
    text = req["prompt"].replace("{}", req["subject"])
    texts = [text] + [t.replace("{}", req["subject"]) for t in hp.kl_prompts]
    ids = [torch.tensor([lm.tokenize(t)]) for t in texts]
    look = [lm.subject_span(t, req["subject"])[1] - 1 for t in texts]
    tgt = torch.tensor([t5.target_ids(lm, req["target_new"])])
    dec = shift_right(lm.adapter, tgt)
    start = torch.tensor([[lm.adapter.start_id]])
    state = {}

    def hook(m, a, o):
        state["k"], state["v"] = a[0][0, state["pos"]].detach(), o[0, state["pos"]].detach()
        if "delta" in state:
            o = o.clone()
            o[0, state["pos"]] += state["delta"]
        return o
    h = wo.register_forward_hook(hook)
    try:
        state["pos"] = look[0]
        with torch.no_grad():
            model(input_ids=ids[0], decoder_input_ids=dec)
        k, v = state["k"], state["v"]
        Cr = C + hp.mom2_reg * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
        u = torch.linalg.solve(Cr, k)
        u = u / u.norm()
        delta = torch.zeros_like(v, requires_grad=True)
        state["delta"] = delta
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        kl0 = None
        for it in range(hp.v_num_grad_steps):
            state["pos"] = look[0]
            lp = model(input_ids=ids[0], decoder_input_ids=dec).logits[0].log_softmax(-1)
            nll = -lp.gather(1, tgt[0][:, None]).mean()
            kls = []
            for r in range(1, len(texts)):
                state["pos"] = look[r]
                kls.append(model(input_ids=ids[r], decoder_input_ids=start).logits[0, 0].log_softmax(-1))
            kl_lp = torch.stack(kls)
            if kl0 is None:
                kl0 = kl_lp.detach()
            loss = (nll + hp.kl_factor * F.kl_div(kl0, kl_lp, log_target=True, reduction="batchmean")
                    + hp.v_weight_decay * delta.norm() / v.norm() ** 2)
            if float(loss.detach()) < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                if delta.norm() > hp.clamp_norm_factor * v.norm():
                    delta.mul_(hp.clamp_norm_factor * v.norm() / delta.norm())
    finally:
        h.remove()
    right = delta.detach() / torch.dot(k, u)
    return u, right, wo.weight.detach() + torch.outer(right, u)


def test_rome_on_the_encoder_matches_plain_rome_on_hf(t5lm):
    from kncore.rome import ROMEHparams
    req = {"prompt": "the capital of {} is", "subject": "canada", "target_new": "rome ,"}
    stats = t5.layer_stats(t5lm, 0, STATS_TEXTS)
    hp = ROMEHparams(layers=[0], mom2_reg=1e-2, v_num_grad_steps=6)
    u_ref, right_ref, W_ref = _rome_ref_hf(t5lm, req, 0, hp, stats.second_moment)
    with t5.rome_edit(t5lm, req, 0, hparams=hp, stats=stats) as ed:
        s = ed.steps[0]
        W = t5lm.adapter.encoder.down_module(0).weight
        assert len(s.losses) == 6
        torch.testing.assert_close(s.left.double(), u_ref, rtol=1e-4, atol=1e-6)
        assert (s.right.double() - right_ref).abs().max() <= 1e-3 * right_ref.abs().max()
        assert (W.double() - W_ref).abs().max() <= 1e-4 * W_ref.abs().max()


def test_lazy_submodule(monkeypatch):
    # without the attribute an earlier import set, kncore.t5 must come from kncore.__getattr__
    monkeypatch.delattr(kncore, "t5")
    monkeypatch.delattr(kncore, "runtime_t5")
    assert kncore.t5.attribute is t5.attribute and kncore.runtime_t5.decode is decode


@pytest.mark.parametrize("stack,layer", [("decoder", 1), ("encoder", 0)])
def test_attribute_bf16_within_twice_plain_bf16(stack, layer):
    """bf16 IG against the fp32 reference: at most 2x the error of the plain
    reference (hooks on the HF forward) run in bf16 (measured 0.5-1.4x)."""
    for arch in ENC_DEC_ARCHS:
        lm32, lm16 = tiny_lm(arch), tiny_lm(arch, dtype=torch.bfloat16)
        kw = dict(stack=stack, steps=6, scheme="gauss")
        ref = t5.attribute_ref(lm32, PROMPT, TARGET, layer, **kw)
        plain = t5.attribute_ref(lm16, PROMPT, TARGET, layer, **kw)
        ours = t5.attribute(lm16, PROMPT, TARGET, layers=[layer], **kw).scores[0, 0]
        err_plain = (plain - ref).abs().max()
        assert err_plain > 0 and (ours - ref).abs().max() <= 2 * err_plain, arch
