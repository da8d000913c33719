"""The paper's experiments: each one's numbers equal the building blocks run by
hand on the same inputs, runs resume after a crash with the same tables, and
they run end to end on SmolLM2 (slow)."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import kncore
from kncore import InputError
from kncore import experiments as X
from kncore.attribution import attribute
from kncore.evaluation import minimal_pair_accuracy, score_targets, token_probabilities
from kncore.localisation import r1_squared
from kncore.rundir import RunDir, RunDirMismatch
from kncore.selection import refine, select_coarse
from kncore.testing import tiny_lm

PARADIGM = "determiner_noun_agreement_2"
BLIMP = f"blimp:{PARADIGM}"
CAPITALS = [("canada", "ottawa"), ("france", "paris"), ("italy", "rome"), ("germany", "berlin"),
            ("japan", "tokyo")]


def _seed() -> int:
    return int(torch.randint(0, 10_000, ()).item())


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.fixture
def data(tmp_path):
    """A BLiMP paradigm and PARAREL relations in the tiny models' vocabulary."""
    root = tmp_path / "data"
    g = torch.Generator().manual_seed(_seed())
    subj = ["the dog", "a cat", "the cats", "the dogs", "she", "he", "they", "we"]
    verbs = ["has", "had", "like"]
    sg, pl = ["sketch", "committee", "apple", "dog", "cat"], ["sketches", "apples", "dogs", "cats"]
    rows = []
    combos = list(itertools.product(subj, verbs))
    for k in torch.randperm(len(combos), generator=g)[:10].tolist():
        s, v = combos[k]
        for good, bad, nouns in (("this", "these", sg), ("that", "those", sg), ("these", "this", pl),
                                 ("those", "that", pl)):
            noun = nouns[int(torch.randint(0, len(nouns), (), generator=g))]
            rows.append({"sentence_good": f"{s} {v} {good} {noun} .", "sentence_bad": f"{s} {v} {bad} {noun} .",
                         "two_prefix_prefix_good": f"{s} {v} {good}", "two_prefix_prefix_bad": f"{s} {v} {bad}",
                         "two_prefix_word": noun, "field": "morphology",
                         "linguistics_term": "determiner_noun_agreement", "UID": PARADIGM,
                         "simple_LM_method": True, "one_prefix_method": False, "two_prefix_method": True,
                         "lexically_identical": True, "pairID": str(len(rows))})
    _jsonl(root / "blimp" / f"{PARADIGM}.jsonl", rows)
    pats = ["The capital of [X] is [Y] .", "the capital city of [X] is [Y] .", "[X] , the capital is [Y] .",
            "[Y] is the capital of [X] ."]
    _jsonl(root / "pararel/patterns/P36.jsonl", [{"pattern": p, "lemma": "capital"} for p in pats])
    _jsonl(root / "pararel/facts/P36.jsonl", [{"sub_label": s, "obj_label": o, "uuid": f"u{k}"}
                                              for k, (s, o) in enumerate(CAPITALS)])
    _jsonl(root / "pararel/patterns/P1376.jsonl", [{"pattern": p, "lemma": "capital"}
                                                   for p in ("[X] is the capital of [Y] .",)])
    _jsonl(root / "pararel/facts/P1376.jsonl", [{"sub_label": o, "obj_label": s, "uuid": f"v{k}"}
                                                for k, (s, o) in enumerate(CAPITALS)])
    return root


def _commits(path):
    return sorted(p.name for p in (path / "commits").iterdir())


# -- tasks --------------------------------------------------------------------------------------
def test_tasks_parse_and_refuse():
    assert X.parse_task("P101") == ("pararel", "P101")
    assert X.task_name("pararel:P36") == "pararel:P36"
    assert X.task_name(BLIMP) == BLIMP
    for bad in ("", "P", "wiki:P36", "blimp:", "determiner_noun_agreement_2", 3):
        with pytest.raises(InputError):
            X.parse_task(bad)
    with pytest.raises(InputError, match="unknown experiment"):
        X.run("nope", None, "P36", "x")


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_task_facts(arch, data):
    lm = tiny_lm(arch, seed=_seed())
    facts, info = X.task_facts(lm, BLIMP, limit=7, data_dir=data)
    assert [f.label for f in facts] == ["plural", "singular"]
    assert info["kept"] == info["total"] == 40
    for f in facts:
        assert len(f.prompts) == 7 and f.kind == "syntactic"
        want = {"singular": {"this", "that"}, "plural": {"these", "those"}}[f.label]
        assert {t.strip() for t in f.targets} <= want
        for q in f.prompts:  # the paper's prompt: the sentence before the determiner (or it masked)
            assert (q.count("[MASK]") == 1) if lm.is_mlm else q.split()[-1] in {"has", "had", "like"}
    by_target, _ = X.task_facts(lm, BLIMP, group_by="target", data_dir=data)
    assert sorted(f.label for f in by_target) == ["that", "these", "this", "those"]
    bl, _ = X.task_facts(lm, BLIMP, prompt_style="blimp", data_dir=data)
    if not lm.is_mlm:  # BLiMP's two-prefix prompts end in the determiner; the target is the noun
        assert all(q.split()[-1] in {"this", "that", "these", "those"} for f in bl for q in f.prompts)
    pf, pinfo = X.task_facts(lm, "P36", limit=3, data_dir=data)
    assert [f.label for f in pf] == ["canada", "france", "italy"]
    # decoders drop the template whose [Y] is not last; masked LMs keep it
    assert all(len(f.prompts) == (4 if lm.is_mlm else 3) for f in pf)
    with pytest.raises(InputError, match="limit"):
        X.task_facts(lm, BLIMP, limit=0, data_dir=data)


# -- localise ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_localise_equals_building_blocks(arch, data, tmp_path):
    lm = tiny_lm(arch, seed=_seed())
    steps = int(torch.randint(3, 6, ()).item())
    out = tmp_path / "loc"
    res = X.localise(lm, [BLIMP, "pararel:P36"], out, steps=steps, limit={BLIMP: 5, "P36": 4}, batch_size=1,
                     data_dir=data, progress=False, chunk=3)
    facts = X.task_facts(lm, BLIMP, limit=5, data_dir=data)[0] + X.task_facts(lm, "P36", limit=4, data_dir=data)[0]
    frows = {r["key"]: r for r in res["bags"]}
    assert set(frows) == {f.key for f in facts}
    kns = X.read_kns(out)
    n_total = 0
    for f in facts:
        # the same fact by hand: IG of its prompts, coarse at 0.2 x max, adaptive p for this fact
        a = attribute(lm, f.prompts, f.targets, steps=steps, batch_size=1, progress=False)
        ref = refine([select_coarse(a, adaptive_threshold=0.2)], "adaptive")
        assert sorted(kns[f.key]) == sorted(ref.sets[0].neurons), f.key
        assert frows[f.key]["p"] == pytest.approx(ref.p)
        assert frows[f.key]["n_kn"] == len(ref.sets[0])
        assert frows[f.key]["r1_sq"] == pytest.approx(r1_squared(a.scores), rel=1e-6, abs=1e-9)
        n_total += len(ref.sets[0])
    for row in res["localisation"]:
        fr = [r for r in res["bags"] if r["relation"] == row["task"]]
        assert row["kn"] == pytest.approx(sum(r["n_kn"] for r in fr) / len(fr))
        assert row["tau"] == pytest.approx(sum(r["p"] for r in fr) / len(fr))
        assert sum(row["layer_counts"]) == sum(r["n_kn"] for r in fr)
    assert sum(len(v) for v in kns.values()) == n_total
    assert (out / "results" / "localisation.md").read_text().count("\n") >= 4
    assert (out / "plots" / "layer_distribution.png").stat().st_size > 1000
    # run again: nothing recomputed, same tables
    before = _commits(out)
    again = X.localise(lm, [BLIMP, "pararel:P36"], out, steps=steps, limit={BLIMP: 5, "P36": 4}, batch_size=1,
                       data_dir=data, progress=False, chunk=3)
    assert _commits(out) == before
    assert again["localisation"] == res["localisation"]
    with pytest.raises(RunDirMismatch, match="steps"):
        X.localise(lm, [BLIMP, "pararel:P36"], out, steps=steps + 1, limit={BLIMP: 5, "P36": 4},
                   data_dir=data, progress=False)


def test_localise_task_scope_is_one_search(data, tmp_path):
    lm = tiny_lm("gpt2", seed=_seed())
    res = X.localise(lm, "P36", tmp_path / "t", steps=3, adaptive_scope="task", batch_size=1, data_dir=data,
                     progress=False)
    facts, _ = X.task_facts(lm, "P36", data_dir=data)
    a = [attribute(lm, f.prompts, f.targets, steps=3, batch_size=1, progress=False) for f in facts]
    ref = refine([select_coarse(x) for x in a], "adaptive")
    assert {r["p"] for r in res["bags"]} == {ref.p}
    kns = X.read_kns(tmp_path / "t")
    assert [sorted(kns[f.key]) for f in facts] == [sorted(s.neurons) for s in ref.sets]


def test_localise_resumes_after_crash(data, tmp_path, monkeypatch):
    lm = tiny_lm("llama", seed=_seed())
    kw = dict(steps=3, limit=4, batch_size=1, data_dir=data, progress=False, chunk=2)
    whole = X.localise(lm, [BLIMP, "P36"], tmp_path / "whole", **kw)
    import kncore.attribution as A
    real, calls = A.attribute, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(A, "attribute", flaky)
    with pytest.raises(KeyboardInterrupt):
        X.localise(lm, [BLIMP, "P36"], tmp_path / "cut", **kw)
    # committed blocks survive (the first item alone, then blocks of at most `chunk`)
    assert 0 < len(RunDir.load(tmp_path / "cut").done_keys("prompts")) < len(whole["prompts"])
    monkeypatch.setattr(A, "attribute", real)
    resumed = X.localise(lm, [BLIMP, "P36"], tmp_path / "cut", **kw)
    for t in ("localisation", "bags", "kn"):
        assert resumed[t] == whole[t], t
    assert len(resumed["prompts"]) == len(whole["prompts"]) == sum(r["n_prompts"] for r in whole["bags"])


def test_localise_refuses_bad_options(data, tmp_path):
    lm = tiny_lm("gpt2", seed=_seed())
    for kw, msg in ((dict(steps=0), "steps"), (dict(adaptive_threshold=1.5), "adaptive_threshold"),
                    (dict(p=1.2), "p must"), (dict(adaptive_scope="all"), "adaptive_scope"),
                    (dict(limit={"P101": 3}), "not run"), (dict(layers=[7]), "out of range"),
                    (dict(prompt_style="x"), "prompt style"), (dict(group_by="x"), "group_by")):
        with pytest.raises((InputError, ValueError), match=msg):
            X.localise(lm, BLIMP, tmp_path / "x", data_dir=data, progress=False, **kw)


# -- KN edit effects -------------------------------------------------------------------------------------
def _random_kns(lm, facts, g, k=3):
    out = {}
    for f in facts:
        idx = torch.randperm(lm.n_layers * lm.d_ff, generator=g)[:k].tolist()
        out[f.key] = [(i // lm.d_ff, i % lm.d_ff) for i in idx]
    return out


@pytest.mark.parametrize("arch", ["gptj", "bert"])
def test_kn_edit_effects_blimp_equals_by_hand(arch, data, tmp_path):
    lm = tiny_lm(arch, seed=_seed())
    g = torch.Generator().manual_seed(_seed())
    facts, _ = X.task_facts(lm, BLIMP, limit=6, data_dir=data)
    kns = _random_kns(lm, facts, g)
    res = X.kn_edit_effects(lm, BLIMP, tmp_path / "eff", kns=kns, limit=6, eval_limit=30, factor=2.0,
                            data_dir=data, progress=False)
    method = "target" if lm.is_mlm else "sentence"
    pos = "target" if lm.is_mlm else "all"
    pairs = list(X.blimp_pair_prompts(lm, PARADIGM, data_dir=data))[:30]
    base = minimal_pair_accuracy(lm, pairs, method=method)
    tokens = list(X.DETERMINERS)
    for f in facts:
        for mode in ("suppress", "enhance"):
            with kncore.patch_neurons(lm, kns[f.key], mode=mode, factor=2.0, positions=pos):
                after = minimal_pair_accuracy(lm, pairs, method=method)
            row = next(r for r in res["accuracy"] if r["class_edited"] == f.label and r["mode"] == mode
                       and r["pairs_of"] == "all")
            assert row["accuracy_before"] == pytest.approx(base["accuracy"])
            assert row["accuracy_after"] == pytest.approx(after["accuracy"])
            b = token_probabilities(lm, f.prompts, tokens)
            with kncore.patch_neurons(lm, kns[f.key], mode=mode, factor=2.0):
                a = token_probabilities(lm, f.prompts, tokens)
            assert not torch.equal(a, b)  # the neurons were patched
            for j, t in enumerate(tokens):
                r = next(r for r in res["prob_change"] if r["class_edited"] == f.label and r["mode"] == mode
                         and r["token"] == t)
                mb, ma = b[:, j].mean().item(), a[:, j].mean().item()
                assert r["paper_change"] == pytest.approx((ma - mb) / min(mb, ma), rel=1e-5)
                rel = ((a[:, j] - b[:, j]) / torch.minimum(a[:, j], b[:, j])).mean().item()
                assert r["mean_rel_change"] == pytest.approx(rel, rel=1e-5, abs=1e-9)
    out = tmp_path / "eff"
    assert {p.name for p in (out / "plots").iterdir()} == {"prob_change_plural.png", "prob_change_singular.png"}
    assert (out / "results" / "accuracy.md").exists() and (out / "results" / "prob_change.csv").exists()


def test_kn_edit_effects_localises_then_pararel(data, tmp_path):
    lm = tiny_lm("gpt2", seed=_seed())
    res = X.kn_edit_effects(lm, "P36", tmp_path / "eff", limit=3, steps=3, batch_size=1, data_dir=data,
                            progress=False)
    kns = X.read_kns(tmp_path / "eff" / "localise")
    assert len(kns) == 3
    facts, _ = X.task_facts(lm, "P36", limit=3, data_dir=data)
    rows = RunDir.load(tmp_path / "eff").read("effect").to_pylist()
    f = next(f for f in facts if kns[f.key])
    ids = torch.tensor([lm.target_ids(q, t)[0] for q, t in zip(f.prompts, f.targets)])
    with kncore.patch_neurons(lm, kns[f.key], mode="suppress"):
        want = lm.next_token_probs(f.prompts).gather(1, ids[:, None])[:, 0]
    got = [r["p_after"] for r in rows if r["key"] == f.key and r["intervention"] == "suppress"]
    assert got == pytest.approx(want.tolist(), rel=1e-5)
    assert [r["mode"] for r in res["effects"]] == ["suppress", "enhance"]
    # the KNs come from a localise run: a run made with other options is refused
    with pytest.raises(InputError, match="other options"):
        X.kn_edit_effects(lm, "P36", tmp_path / "eff2", kns=tmp_path / "eff" / "localise", limit=5,
                          data_dir=data, progress=False)
    with pytest.raises(InputError, match="modes"):
        X.kn_edit_effects(lm, "P36", tmp_path / "eff3", kns={}, modes=["erase"], data_dir=data, progress=False)


# -- edits ----------------------------------------------------------------------------------------------
def test_kn_weight_edit_exact_and_undone():
    lm = tiny_lm("llama", seed=_seed())
    g = torch.Generator().manual_seed(_seed())
    neurons = _random_kns(lm, [X.Fact("t", "k", "k", "factual", [], [])], g, k=5)["k"]
    V = lm.adapter.embedding_module().weight.shape[0]
    old, new = torch.randperm(V, generator=g)[:2].tolist()
    snap = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    emb = lm.adapter.embedding_module().weight
    rows = {(l, i): lm.adapter.down_weight(l)[i].clone() for l, i in neurons}
    with X.KNWeightEdit(lm, neurons, old, new, scale=2.0):
        for (l, i), row in rows.items():
            assert torch.allclose(lm.adapter.down_weight(l)[i], row + 2.0 * (emb[new] - emb[old]), atol=1e-6)
        assert any(not torch.equal(p, snap[n]) for n, p in lm.model.named_parameters())
    assert all(torch.equal(p, snap[n]) for n, p in lm.model.named_parameters())
    with pytest.raises(RuntimeError, match="boom"):
        with X.KNWeightEdit(lm, neurons, old, new):
            raise RuntimeError("boom")
    assert all(torch.equal(p, snap[n]) for n, p in lm.model.named_parameters())
    with pytest.raises(InputError, match="outside"):
        X.KNWeightEdit(lm, [(lm.n_layers, 0)], old, new)


def _cases(path):
    cases = [{"case_id": k, "subject": s, "prompt": f"the capital of {s} is", "target_new": CAPITALS[(k + 1) % 5][1],
              "target_true": o, "relation": "P36",
              "probes": [{"kind": "generality", "prompt": f"the capital city of {s} is",
                          "target": CAPITALS[(k + 1) % 5][1], "foil": o},
                         {"kind": "locality", "prompt": f"the capital of {CAPITALS[(k + 2) % 5][0]} is",
                          "target": CAPITALS[(k + 2) % 5][1], "foil": CAPITALS[(k + 1) % 5][1]}]}
             for k, (s, o) in enumerate(CAPITALS[:3])]
    path.write_text(json.dumps(cases))
    return path


@pytest.mark.parametrize("editor", ["kn", "rome", "rome-mom2"])
def test_edit_eval_tiny(editor, tmp_path):
    lm = tiny_lm("gpt2", seed=_seed())
    ds = _cases(tmp_path / "cases.json")
    kw = dict(editor=editor.split("-")[0], progress=False, chunk=2)
    if editor.startswith("rome"):
        mom2 = editor == "rome-mom2"
        kw["hparams"] = kncore.rome.ROMEHparams(layers=[1], mom2_adjustment=mom2, v_num_grad_steps=3,
                                                context_template_length_params=[[3, 2]])
        if mom2:  # ROME's C^-1 from statistics over a small corpus, cached in the test's folder
            g = torch.Generator().manual_seed(_seed())
            words = "the capital of canada is ottawa france paris city country one two".split()
            texts = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g).tolist())
                     for _ in range(40)]
            kw.update(stats_corpus=texts, stats_samples=40, stats_cache=tmp_path / "stats")
    else:
        kw.update(kn_steps=3)
    snap = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    res = X.edit_eval(lm, str(ds), tmp_path / "ev", **kw)
    assert all(torch.equal(p, snap[n]) for n, p in lm.model.named_parameters())  # every edit undone
    assert res["summary"]["n_cases"] == 3 and len(res["edits"]) == 3
    cases = X.edit_cases(lm, str(ds))
    for (key, c), r in zip(cases, res["edits"]):
        assert r["key"] == key
        pre = score_targets(lm, [c.prompt], [c.target_new])[0].prob
        assert r["reliability_prob_pre"] == pytest.approx(pre, rel=1e-5)
        for k in ("ES", "PS", "NS"):
            assert 0.0 <= r[k] <= 1.0
        if editor == "kn":
            assert r["n_kn"] >= 0 and 0 <= r["kn_p"] < 1
    kinds = {r["kind"]: r for r in res["kinds"]}
    assert set(kinds) == {"reliability", "generality", "locality"} and kinds["locality"]["cases"] == 3
    assert (tmp_path / "ev" / "results" / "summary.md").read_text().startswith("## ")
    before = _commits(tmp_path / "ev")
    X.edit_eval(lm, str(ds), tmp_path / "ev", **kw)
    assert _commits(tmp_path / "ev") == before


def test_edit_eval_refuses(tmp_path):
    lm = tiny_lm("gpt2", seed=_seed())
    with pytest.raises(InputError, match="editor"):
        X.edit_eval(lm, "counterfact", tmp_path / "x", editor="memit")
    with pytest.raises(InputError, match="unknown edit data set"):
        X.edit_eval(lm, "nowhere.json", tmp_path / "x", editor="kn")
    with pytest.raises(InputError, match=r"ROME edits causal LMs; this is a masked LM \(use editor='kn'\)"):
        X.edit_eval(tiny_lm("bert", seed=0), "counterfact", tmp_path / "z", editor="rome")
    assert not (tmp_path / "z").exists()
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps([{"subject": "canada", "prompt": "the capital of canada is", "target_new": "rome"}]))
    with pytest.raises(InputError, match="target_true"):
        X.edit_eval(lm, str(bad), tmp_path / "y", editor="kn", kn_steps=2, progress=False)


# -- the real model --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm_localise_and_effects(smollm, data_dir, tmp_path):
    lm = smollm
    # three fixed layers where both BLiMP facts have shared KNs at 3 prompts each
    # (in some other choices, e.g. [0, 1, 2] or all 30, neither has: nothing to edit)
    layers = [10, 20, lm.n_layers - 1]
    res = X.localise(lm, [BLIMP, "pararel:P36"], tmp_path / "loc", steps=4, layers=layers,
                     limit={BLIMP: 3, "P36": 2}, progress=False)
    loc = {r["task"]: r for r in res["localisation"]}
    assert loc[BLIMP]["n_facts"] == 2 and loc[BLIMP]["n_prompts"] == 6 and loc["pararel:P36"]["n_facts"] == 2
    for r in res["localisation"]:
        assert 0 <= r["tau"] < 1 and -1e-9 <= r["r1_sq"] <= 1 + 1e-9
        assert sum(r["layer_counts"][L] for L in layers) == sum(r["layer_counts"])
    assert all(r["base_prob"] > 0 for r in res["prompts"])
    eff = X.kn_edit_effects(lm, BLIMP, tmp_path / "eff", kns=tmp_path / "loc", limit=3, eval_limit=24,
                            progress=False)
    before = {r["accuracy_before"] for r in eff["accuracy"] if r["pairs_of"] == "all"}
    assert len(before) == 1 and before.pop() > 0.6  # SmolLM2 knows determiner-noun agreement
    assert {r["token"] for r in eff["prob_change"]} == set(X.DETERMINERS)


@pytest.mark.slow
def test_smollm_edit_eval(smollm, data_dir, tmp_path):
    lm = smollm
    hp = kncore.rome.ROMEHparams(layers=[4], mom2_adjustment=False, v_num_grad_steps=6,
                                 context_template_length_params=[[5, 2]])
    res = X.edit_eval(lm, "pararel:P36", tmp_path / "rome", editor="rome", hparams=hp, limit=1, progress=False)
    r = res["edits"][0]
    assert r["reliability_prob_post"] > r["reliability_prob_pre"]
    assert r["n_symmetry"] > 0  # P36 edits carry the reverse (P1376) probes
    res = X.edit_eval(lm, "counterfact", tmp_path / "kn", editor="kn", kn_steps=3, kn_layers=[10, 11], limit=1,
                      progress=False)
    assert res["summary"]["n_cases"] == 1 and not math.isnan(res["summary"]["ES"])


def test_run_by_name_and_command_line(data, tmp_path, capsys):
    from kncore.experiments.__main__ import main

    out = tmp_path / "p36"
    res = X.run("localize", "tiny-gpt2:3", "P36", out, steps=2, limit=2, data_dir=str(data), progress=False)
    assert [r["task"] for r in res["localisation"]] == ["pararel:P36"]
    before = _commits(out)
    argv = ["localise", "P36", "--out", str(out), "--model", "tiny-gpt2:3", "--set", "steps=2", "--set", "limit=2",
            "--set", f"data_dir={data}", "--set", "progress=false"]
    assert main(argv) == 0
    assert _commits(out) == before  # the same run: resumed, nothing recomputed
    assert "tables in" in capsys.readouterr().out
    assert main(argv[:-2] + ["--set", "bogus=1"]) == 2
    assert main(["localise", "wiki:P36", "--out", str(tmp_path / "z"), "--model", "tiny-gpt2"]) == 2
    assert "error:" in capsys.readouterr().err
