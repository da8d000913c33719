"""Scoring against plain Hugging Face computations, minimal-pair accuracy,
probability-change statistics and edit evaluation."""
from __future__ import annotations

import contextlib
import json
import math
import random

import pytest
import torch

import kncore
import kncore.data as D
from kncore import Patch
from kncore import evaluation as E
from kncore.testing import WORDS, tiny_lm


def _sentence(k):
    return " ".join(random.choice(WORDS) for _ in range(k))


def _hf_target_logprobs(lm, prompt, target):
    """Plain HF: log P(target tokens | prompt), teacher-forced, one forward."""
    tids = lm.target_ids(prompt, target)
    ids = lm.tokenize(prompt)
    with torch.no_grad():
        if lm.is_mlm:
            m = ids.index(lm.tokenizer.mask_token_id)
            seq = ids[:m] + [lm.tokenizer.mask_token_id] * len(tids) + ids[m + 1:]
            lp = lm.model(torch.tensor([seq])).logits[0].log_softmax(-1)
            return [lp[m + i, t].item() for i, t in enumerate(tids)], [int(lp[m + i].argmax()) for i in range(len(tids))]
        seq = ids + tids
        lp = lm.model(torch.tensor([seq])).logits[0].log_softmax(-1)
        n = len(ids)
        return ([lp[n - 1 + i, t].item() for i, t in enumerate(tids)],
                [int(lp[n - 1 + i].argmax()) for i in range(len(tids))])


def test_score_targets_matches_hf(tiny):
    prompts, targets = [], []
    for _ in range(7):
        p = _sentence(random.randint(1, 9))
        if tiny.is_mlm:
            p = p + " [MASK] " + _sentence(random.randint(0, 3))
            t = random.choice(WORDS)
        else:
            t = _sentence(random.randint(1, 3))
        prompts.append(p)
        targets.append(t)
    prompts.append(prompts[0])  # two candidate answers to one prompt share a row
    targets.append(random.choice(WORDS))
    got = E.score_targets(tiny, prompts, targets, batch_size=3)
    for p, t, g in zip(prompts, targets, got):
        lps, am = _hf_target_logprobs(tiny, p, t)
        assert g.ids == tiny.target_ids(p, t)
        assert g.logprobs == pytest.approx(lps, abs=2e-5)
        assert g.argmax == am
        assert g.prob == pytest.approx(math.exp(sum(lps)), rel=1e-4)
        assert g.acc == sum(int(a == b) for a, b in zip(am, g.ids)) / len(g.ids)


def _hf_sentence_logprob(lm, s):
    ids = lm.tokenize(s)
    pre = lm.tokenizer.bos_token_id if lm.tokenizer.bos_token_id is not None else lm.tokenizer.eos_token_id
    if ids[0] != pre:
        ids = [pre] + ids
    with torch.no_grad():
        lp = lm.model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(lp[i, ids[i + 1]].item() for i in range(len(ids) - 1))


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_sentence_logprobs_match_hf(arch):
    lm = tiny_lm(arch, seed=random.randint(0, 9999))
    sents = [_sentence(random.randint(1, 12)) for _ in range(9)]
    got = E.sentence_logprobs(lm, sents, batch_size=4)
    for s, g in zip(sents, got):
        assert g == pytest.approx(_hf_sentence_logprob(lm, s), abs=1e-4)
    with pytest.raises(kncore.InputError, match="decoder"):
        E.sentence_logprobs(tiny_lm("bert"), sents)


@pytest.mark.slow
def test_minimal_pair_accuracy_smollm_matches_hf(smollm, data_dir):
    pairs = random.sample(D.load_blimp("determiner_noun_agreement_1", data_dir), 12)
    prompts = D.build_blimp_prompts(smollm, pairs)
    assert len(prompts) >= 6
    rows = E.minimal_pair_scores(smollm, prompts)
    for x, r in zip(prompts, rows):
        g, b = _hf_sentence_logprob(smollm, x.sentence_good), _hf_sentence_logprob(smollm, x.sentence_bad)
        assert r["score_good"] == pytest.approx(g, abs=1e-3) and r["score_bad"] == pytest.approx(b, abs=1e-3)
        assert r["correct"] == (g > b)
    acc = E.minimal_pair_accuracy(smollm, prompts)
    assert acc["accuracy"] == sum(r["correct"] for r in rows) / len(rows)
    assert acc["n"] == len(prompts) and set(acc["by_class"]) <= {"singular", "plural"}
    assert acc["accuracy"] > 0.5  # a real model prefers "this sketch" to "this sketches"


def test_minimal_pair_target_method_tiny_bert(data_dir):
    lm = tiny_lm("bert", seed=random.randint(0, 9999))
    prompts = D.blimp_prompts(lm, "determiner_noun_agreement_2", data_dir)[:20]
    rows = E.minimal_pair_scores(lm, prompts)
    for x, r in zip(prompts, rows):
        ids = lm.tokenize(x.prompt_good)
        m = ids.index(lm.tokenizer.mask_token_id)
        with torch.no_grad():
            pr = lm.model(torch.tensor([ids])).logits[0, m].softmax(-1)
        assert r["method"] == "target"
        assert r["score_good"] == pytest.approx(pr[x.target_good_id].item(), rel=1e-4)
        assert r["score_bad"] == pytest.approx(pr[x.target_bad_id].item(), rel=1e-4)
    s = E.summarise_pairs(rows)
    assert s["n_by_class"]["singular"] + s["n_by_class"]["plural"] == 20


# -- probability change ---------------------------------------------------------------
def test_relative_change_and_ttest():
    from scipy import stats

    before = torch.rand(30, 4, dtype=torch.float64) * 0.5 + 0.01
    after = before * torch.exp(torch.randn(30, 4, dtype=torch.float64) * 0.3 + torch.tensor([0.5, 0, -0.4, 0]))
    ch = E.relative_change(before, after)
    ref = (after - before) / torch.minimum(before, after)
    assert torch.equal(ch, ref)
    # symmetric: halving is -1, doubling is +1
    assert E.relative_change([0.2, 0.1], [0.1, 0.2]).tolist() == [-1.0, 1.0]
    toks = ["this", "that", "these", "those"]
    rows = E.probability_change_stats(before, after, toks)
    for j, r in enumerate(rows):
        t, p = stats.ttest_1samp(ref[:, j].numpy(), 0.0)
        assert r["token"] == toks[j] and r["n"] == 30
        assert r["mean_change"] == pytest.approx(ref[:, j].mean().item())
        assert r["t"] == pytest.approx(t) and r["p_value"] == pytest.approx(p)
        assert r["significant"] == (p < 0.05)
    rel = E.probability_change_stats(before, after, toks, test="rel")
    assert rel[0]["p_value"] == pytest.approx(stats.ttest_rel(after[:, 0].numpy(), before[:, 0].numpy())[1])
    with pytest.raises(kncore.InputError):
        E.relative_change([0.0], [0.1])


def test_token_probabilities_and_plot(tiny, tmp_path):
    mask = " [MASK]" if tiny.is_mlm else ""
    prompts = [_sentence(random.randint(1, 6)) + mask for _ in range(5)]
    toks = ["this", "that", "these", "those"]
    P = E.token_probabilities(tiny, prompts, toks, batch_size=2)
    assert P.shape == (5, 4) and P.dtype == torch.float64
    full = tiny.next_token_probs(prompts)
    for i, p in enumerate(prompts):
        for j, t in enumerate(toks):
            assert P[i, j].item() == pytest.approx(full[i, tiny.single_token(p, t)].item(), rel=1e-5)
    # a real edit: scale one layer's neurons at the target position
    L = random.randrange(tiny.n_layers)
    after = E.token_probabilities(tiny, prompts, toks, patches=[Patch("act", L, scale=3.0)])
    assert not torch.allclose(P, after)
    st = {"suppress": E.probability_change_stats(P, after, toks),
          "enhance": E.probability_change_stats(after, P, toks)}
    out = E.plot_probability_changes(st, tmp_path / "fig" / "change.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in out.parent.iterdir()] == ["change.png"]  # no temp file left


# -- edit evaluation ------------------------------------------------------------------
def _tiny_case(lm):
    mask = " [MASK]" if lm.is_mlm else ""
    subj = random.choice(["canada", "france", "italy", "japan"])
    new, true = random.sample(["ottawa", "paris", "rome", "tokyo", "berlin"], 2)
    probes = [E.Probe("reliability", f"the capital of {subj} is{mask}", new, true),
              E.Probe("generality", f"{subj} , the capital city is{mask}", new, true),
              E.Probe("locality", f"the capital of germany is{mask}", "berlin", new),
              E.Probe("locality", f"the language of france is{mask}", "french", new),
              E.Probe("symmetry", f"{new} is the capital of{mask}", subj, None)]
    if not lm.is_mlm:
        probes.append(E.Probe("synonymy", "the capital of it is", f"{new} city", None))  # a two-token target
    return E.EditCase(1, subj, probes[0].prompt, new, true, "P36", probes)


def test_evaluate_edit_noop_equals_baseline(tiny):
    case = _tiny_case(tiny)
    row = E.evaluate_edit(tiny, case, contextlib.nullcontext, details=True)
    for k, v in row.items():
        if k.endswith("_pre"):
            assert row[k[:-4] + "_post"] == v, k
    assert row["locality_agree"] == 1.0
    base = E.score_targets(tiny, [case.probes[0].prompt, case.probes[0].prompt],
                           [case.target_new, case.target_true])
    assert row["reliability_prob_pre"] == pytest.approx(base[0].prob, rel=1e-5)
    assert row["ES"] == float(base[0].mean_prob > base[1].mean_prob)
    assert row["EM"] == pytest.approx(base[0].mean_prob - base[1].mean_prob, rel=1e-4, abs=1e-9)
    assert row["n_locality"] == 2 and len(row["probes"]) == len(case.probes)


@contextlib.contextmanager
def _zero_rows(lm, layer, neurons):
    """A weight edit: zero some rows of the down-projection (= suppressing
    those neurons at every position), restored on exit."""
    w = lm.adapter.down_weight(layer)
    saved = w[neurons].clone()
    with torch.no_grad():
        w[neurons] = 0
    try:
        yield None
    finally:
        with torch.no_grad():
            w[neurons] = saved


def test_evaluate_edit_real_edits(tiny):
    case = _tiny_case(tiny)
    L = random.randrange(tiny.n_layers)
    neurons = sorted(random.sample(range(tiny.d_ff), 40))
    # the same edit three ways: a weight edit, a context yielding runtime
    # patches, and kncore.patch_neurons at every position
    by_weights = E.evaluate_edit(tiny, case, lambda: _zero_rows(tiny, L, neurons))

    @contextlib.contextmanager
    def by_patch():
        yield [Patch("act", L, neurons=neurons, value=torch.zeros(()))]

    by_patches = E.evaluate_edit(tiny, case, by_patch)
    by_kn = E.evaluate_edit(tiny, case, lambda: kncore.patch_neurons(tiny, [(L, i) for i in neurons],
                                                                     mode="suppress", positions="all"))
    # the expected post-edit scores, computed directly with runtime patches
    patch = [Patch("act", L, neurons=neurons, value=torch.zeros(()))]
    rel = case.probes[0]
    want = E.score_targets(tiny, [rel.prompt], [rel.target], patches=patch)[0]
    for row in (by_weights, by_patches, by_kn):
        assert row["reliability_prob_post"] == pytest.approx(want.prob, rel=1e-4)
        assert row["reliability_prob_pre"] == by_weights["reliability_prob_pre"]
        for k in row:
            if k.endswith("_post") and isinstance(row[k], float):
                assert row[k] == pytest.approx(by_weights[k], rel=1e-4, abs=1e-7), k
    assert by_weights["reliability_prob_post"] != by_weights["reliability_prob_pre"]
    assert torch.count_nonzero(tiny.adapter.down_weight(L)[neurons]) > 0  # restored


def test_summarise_edits_score():
    rows = [{"case_id": i, "ES": a, "PS": b, "NS": c, "x": float("nan")}
            for i, (a, b, c) in enumerate([(1.0, 0.5, 0.8), (0.0, 0.5, 0.6), (1.0, 1.0, 1.0)])]
    s = E.summarise_edits(rows)
    es, ps, ns = 2 / 3, 2 / 3, 0.8
    assert s["n_cases"] == 3 and s["ES"] == pytest.approx(es) and "x" not in s
    assert s["S"] == pytest.approx(3 / (1 / es + 1 / ps + 1 / ns))


def test_counterfact_and_zsre_cases(data_dir):
    know = E.edit_knowledge(data_dir)
    cf = D.load_counterfact(data_dir=data_dir)
    c = E.counterfact_case(cf[0], know)
    kinds = [p.kind for p in c.probes]
    assert kinds.count("reliability") == 1 and kinds.count("generality") == 2 and kinds.count("locality") == 10
    assert c.probes[0].prompt == cf[0].rewrite_prompt and c.probes[0].foil == cf[0].target_true
    assert all(p.target == cf[0].target_true and p.foil == cf[0].target_new for p in c.probes if p.kind == "locality")
    assert c.request()["prompt"] == cf[0].prompt

    cap = next(r for r in cf if r.relation_id == "P36")
    sym = [p for p in E.counterfact_case(cap, know).probes if p.kind == "symmetry"]
    assert sym and all(p.target == cap.subject and p.prompt.startswith(cap.target_new) for p in sym)
    assert sym[0].prompt == f"{cap.target_new} is the capital of"  # P1376's first PARAREL template
    twin = next(r for r in cf if r.relation_id == "P190")
    assert any(p.kind == "symmetry" for p in E.counterfact_case(twin, know).probes)
    fld = next(r for r in cf if r.relation_id == "P101" and r.target_new == "chemistry")
    syn = [p for p in E.counterfact_case(fld, know).probes if p.kind == "synonymy"]
    old = (E.BUILTIN_SYNONYMS[0].terms.get(fld.target_true) or [None])[0]
    assert E.Probe("synonymy", f"{fld.subject} is a famous", "chemist", old) in syn
    other = next(r for r in cf if r.relation_id == "P30")
    assert not [p for p in E.counterfact_case(other, know).probes if p.kind in ("symmetry", "synonymy")]

    z = E.zsre_case(D.load_zsre(data_dir=data_dir)[0])
    assert [p.kind for p in z.probes] == ["reliability", "generality", "locality"]
    assert z.probes[2].prompt.endswith("?") and z.target_true == "Illinois Institute of Technology"

    cases = E.pararel_cases("P1376", data_dir, know=know, limit=5)
    assert len(cases) == 5
    for case in cases:
        assert case.target_new != case.target_true
        assert any(p.kind == "symmetry" and p.prompt.startswith("The capital of " + case.target_new)
                   for p in case.probes)


def test_user_knowledge_and_cases(tmp_path):
    kj = tmp_path / "know.json"
    kj.write_text(json.dumps({"symmetric_relations": {"P26": "P26"},
                              "reverse_templates": {"P26": ["{} is married to"]},
                              "synonyms": [{"relations": ["P26"], "terms": {"ann": ["annie"]}}]}))
    k = E.EditKnowledge().add_json(kj)
    probes = k.symmetry_probes("P26", "bob", "ann") + k.synonymy_probes("P26", "bob", "bob is married to",
                                                                         "ann", "eve")
    assert E.Probe("symmetry", "ann is married to", "bob", None) in probes
    assert E.Probe("synonymy", "bob is married to", "annie", None) in probes
    kj.write_text(json.dumps({"synonyms": [{"terms": {"a": "b"}}]}))
    with pytest.raises(D.DataError, match=r"synonyms\[0\]"):
        E.EditKnowledge().add_json(kj)

    cj = tmp_path / "cases.json"
    cj.write_text(json.dumps([{"subject": "bob", "prompt": "bob is married to", "target_new": "ann",
                               "target_true": "eve", "probes": [{"kind": "symmetry", "prompt": "ann is married to",
                                                                 "target": "bob"}]}]))
    (c,) = E.load_edit_cases(cj)
    assert [p.kind for p in c.probes] == ["reliability", "symmetry"] and c.template == "{} is married to"
    cj.write_text(json.dumps([{"subject": "bob", "prompt": "x", "target_new": "ann"}]))
    with pytest.raises(D.DataError, match=r"cases\.json, record 0: .*not in the prompt"):
        E.load_edit_cases(cj)


def test_per_case_factory_and_before_after(data_dir):
    lm = tiny_lm("gpt2", seed=random.randint(0, 9999))
    cases = [_tiny_case(lm) for _ in range(3)]
    L = random.randrange(lm.n_layers)
    seen = []

    def make_edit(case):
        seen.append(case.case_id)
        return kncore.patch_neurons(lm, [(L, i) for i in range(0, lm.d_ff, 3)], mode="enhance", factor=3.0)

    for i, c in enumerate(cases):
        c.case_id = i
    rows = E.evaluate_edits(lm, cases, make_edit)
    assert seen == [0, 1, 2] and [r["case_id"] for r in rows] == [0, 1, 2]
    assert any(r["reliability_prob_post"] != r["reliability_prob_pre"] for r in rows)

    prompts = [D.BlimpPrompt("p", str(i), "all", "one_prefix", "that", "that", "apple", "apples",
                             lm.single_token("that", "apple"), lm.single_token("that", "apples"), "", "")
               for i in range(3)]
    before, after = E.before_after(lambda patches: E.minimal_pair_scores(lm, prompts, method="target",
                                                                         patches=patches),
                                   lambda: kncore.patch_neurons(lm, [(L, 5)], mode="suppress"))
    with kncore.patch_neurons(lm, [(L, 5)], mode="suppress"):
        direct = E.minimal_pair_scores(lm, prompts, method="target")
    assert after == direct
    assert before == E.minimal_pair_scores(lm, prompts, method="target")
    with pytest.raises(kncore.InputError, match="context manager"):
        E.evaluate_edit(lm, cases[0], 42)
