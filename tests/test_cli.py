"""The command line: help with examples, one-line errors, and each command's
run directory holding what its backend computes when called directly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kncore
from kncore import InputError
from kncore import cli
from kncore.cli import main, parse_layers
from kncore.rundir import RunDir
from kncore.testing import tiny_lm

WORDS = "the capital of canada is france paris italy rome city country big small red blue dog cat".split()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine
    spinning OpenMP threads made each tiny matmul ~200x slower (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rng():
    return np.random.default_rng(int(torch.randint(0, 1 << 30, ())))


def _prompt(rng, lo=2, hi=7):
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("kncore: error"), err
    return err[0]


# -- the surface ---------------------------------------------------------------------------------
def test_help_has_worked_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "torchrun --nproc-per-node" in out
    for cmd in ("info", "localise", "attribute", "trace", "stats", "edit", "eval", "bench", "report", "demo"):
        assert f"    {cmd}" in out, cmd
    for cmd in ("localise", "attribute", "trace", "stats", "edit", "eval", "report", "bench"):
        assert main([cmd, "--help"]) == 0
        sub = capsys.readouterr().out
        assert "example" in sub and f"kncore {cmd}" in sub, cmd
    assert main(["attribute", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--data", "--out", "--device", "--dtype", "--seed"):
        assert flag in out


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["attribute", "--model", "tiny-gpt2", "--prompt", "the dog", "--out", str(tmp_path / "a")]) == 2
    assert "1 --prompt but 0 --target" in _err_line(capsys)
    assert main(["attribute", "--model", "tiny-gpt2", "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "b")]) == 2
    assert "no such file" in _err_line(capsys)
    assert main(["attribute", "--model", "tiny-opt", "--prompt", "a", "--target", "b"]) == 2
    assert "unknown tiny model" in _err_line(capsys)
    assert main(["localise", "--model", "tiny-gpt2", "--p", "1.5", "--out", str(tmp_path / "c")]) == 2
    assert "--p must be" in _err_line(capsys)
    assert main(["trace", "--model", "tiny-gpt2", "--device", "cuda:7", "--prompt", "a", "--subject", "a"]) == 2
    _err_line(capsys)
    with pytest.raises(InputError, match="--target"):  # --debug shows the exception itself
        main(["attribute", "--debug", "--model", "tiny-gpt2", "--prompt", "the dog", "--out", str(tmp_path / "d")])


def test_missing_backend_is_one_line(capsys, monkeypatch):
    with pytest.raises(cli.BackendMissing, match="needs kncore.not_there"):
        cli.backend("kncore.not_there", "thing")

    def boom(args):
        cli.backend("kncore.not_there", "report")
    monkeypatch.setattr(cli, "cmd_report", boom)
    assert main(["report", "x"]) == 1
    assert "this build does not have yet" in _err_line(capsys)


def test_interrupt_says_how_to_resume(capsys, monkeypatch):
    def stop(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_report", stop)
    assert main(["report", "x"]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err


def test_parse_layers():
    assert parse_layers("all", 12) is None and parse_layers(None, 12) is None
    assert parse_layers("3", 12) == [3]
    assert parse_layers("0-2,7,2", 12) == [0, 1, 2, 7]
    for bad in ("12", "3-1", "a", "1,,x"):
        with pytest.raises(InputError):
            parse_layers(bad, 12)


def test_bench_lists_and_rejects(capsys):
    assert main(["bench"]) == 0
    assert "benchmarks:" in capsys.readouterr().out
    assert main(["bench", "no_such_bench"]) == 2
    assert "no benchmark 'no_such_bench'" in _err_line(capsys)


def test_info_and_demo_slots(capsys):
    import importlib.util
    for cmd, mod in (("info", "kncore.info"), ("demo", "kncore.demo")):
        if importlib.util.find_spec(mod) is None:
            assert main([cmd]) == 1
            assert f"needs {mod}" in _err_line(capsys)
        elif cmd == "info":
            assert main([cmd, "--json"]) == 0
            got = json.loads(capsys.readouterr().out)
            assert got["torch"] == torch.__version__ and got["kncore"] == kncore.__version__
            if got["extension"]["built"]:  # which fp32 AVX-512 paths the C++ ops take here
                assert set(got["extension"]["avx512"]) == {"cov", "rank1"}
                assert got["extension"]["avx512"]["cov"] == torch.ops.kncore.cov_avx512()


# -- commands against their backends ---------------------------------------------------------------
def test_attribute_equals_the_api(tmp_path, rng):
    from kncore.attribution import attribute
    from kncore.selection import select_coarse

    arch = str(rng.choice(["gpt2", "llama", "gptj"]))
    seed = int(rng.integers(100))
    recs = [{"id": f"p{i}", "prompt": _prompt(rng), "target": str(rng.choice(["paris", "rome", "ottawa"]))}
            for i in range(5)]
    data = tmp_path / "p.json"
    data.write_text(json.dumps(recs))
    out = tmp_path / "run"
    args = ["attribute", "--model", f"tiny-{arch}:{seed}", "--data", str(data), "--steps", "7", "--layers", "1-2",
            "--chunk", "2", "--save-dense", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    lm = tiny_lm(arch, seed=seed)
    att = attribute(lm, [r["prompt"] for r in recs], [r["target"] for r in recs], steps=7, layers=[1, 2],
                    progress=False)
    coarse = select_coarse(att, adaptive_threshold=0.2)
    rd = RunDir.load(out)
    rows = rd.read("attribution").to_pylist()
    assert [r["key"] for r in rows] == [r["id"] for r in recs]
    for r, p in zip(rows, att.base_probs.tolist()):
        assert r["base_prob"] == pytest.approx(p, rel=1e-5)
    kn = rd.read("kn").to_pylist()
    for i, rec in enumerate(recs):
        got = {(r["layer"], r["neuron"]) for r in kn if r["key"] == rec["id"]}
        assert got == set(coarse[i].neurons)
    dense = rd.load_tensors("scores")
    for i, rec in enumerate(recs):
        torch.testing.assert_close(dense[rec["id"]], att.scores[i], rtol=1e-4, atol=1e-7)
    # re-running the same command finds everything done; another config is refused, naming the key
    assert main(args) == 0
    assert RunDir.load(out).read("attribution").num_rows == len(recs)
    assert main([*args[:-3], "--steps", "8", "--out", str(out), "--no-progress"]) == 2


def _bags(rng, n=4):
    subjects = [("canada", "ottawa"), ("france", "paris"), ("italy", "rome"), ("germany", "berlin"),
                ("japan", "tokyo")]
    templates = ["the capital of {} is", "{} has the capital", "the city of {} is", "in {} the capital is"]
    out = []
    for s, o in [subjects[i] for i in rng.permutation(len(subjects))[:n]]:
        k = int(rng.integers(2, len(templates) + 1))
        out.append({"key": s, "relation": str(rng.choice(["capital", "city"])), "subject": s, "target": o,
                    "prompts": [t.format(s) for t in rng.permutation(templates)[:k]]})
    return out


def test_localise_equals_the_api(tmp_path, rng):
    from kncore.attribution import attribute
    from kncore.interventions import patch_neurons
    from kncore.selection import refine, select_coarse

    arch = str(rng.choice(["gpt2", "llama", "bert"]))
    seed = int(rng.integers(100))
    bags = _bags(rng)
    if arch == "bert":
        for b in bags:
            b["prompts"] = [p + " [MASK] ." for p in b["prompts"]]
    data = tmp_path / "bags.jsonl"
    data.write_text("".join(json.dumps(b) + "\n" for b in bags))
    out = tmp_path / "run"
    assert main(["localise", "--model", f"tiny-{arch}:{seed}", "--data", str(data), "--steps", "5", "--chunk", "3",
                 "--p", "0.4", "--out", str(out), "--no-progress"]) == 0
    lm = tiny_lm(arch, seed=seed)
    rd = RunDir.load(out)
    kn = rd.read("kn").to_pylist()
    eff = rd.read("effect").to_pylist()
    for rel in {b["relation"] for b in bags}:
        group = [b for b in bags if b["relation"] == rel]
        sets = []
        for b in group:
            att = attribute(lm, b["prompts"], [b["target"]] * len(b["prompts"]), steps=5, progress=False)
            sets.append(select_coarse(att, adaptive_threshold=0.2))
        ref = refine(sets, 0.4)
        for b, ks in zip(group, ref.sets):
            assert {(r["layer"], r["neuron"]) for r in kn if r["key"] == b["key"]} == set(ks.neurons), b["key"]
            mine = [r for r in eff if r["key"] == b["key"]]
            if not len(ks):
                assert not mine
                continue
            tid = torch.tensor([lm.target_ids(p, b["target"])[0] for p in b["prompts"]])
            before = lm.next_token_probs(b["prompts"]).gather(1, tid[:, None])[:, 0]
            for mode in ("suppress", "enhance"):
                with patch_neurons(lm, ks, mode=mode, factor=2.0):
                    after = lm.next_token_probs(b["prompts"]).gather(1, tid[:, None])[:, 0]
                got = [r for r in mine if r["intervention"] == mode]
                assert [r["prompt"] for r in got] == b["prompts"]
                torch.testing.assert_close(torch.tensor([r["p_before"] for r in got]), before, rtol=1e-5, atol=1e-8)
                torch.testing.assert_close(torch.tensor([r["p_after"] for r in got]), after, rtol=1e-5, atol=1e-8)
    summ = rd.manifest["summary"]
    assert summ["facts"] == len(bags) and summ["prompts"] == sum(len(b["prompts"]) for b in bags)
    assert summ["mean_kn_per_fact"] == pytest.approx(len(kn) / len(bags))


def _blimp_dir(tmp_path, rng, n=8):
    d = tmp_path / "data" / "blimp"
    d.mkdir(parents=True)
    lines = []
    for i in range(n):
        sg = bool(rng.integers(2))
        det = str(rng.choice(["this", "that"] if sg else ["these", "those"]))
        noun = str(rng.choice(["dog", "cat", "apple", "sketch"]))
        plural = noun + ("es" if noun == "sketch" else "s")
        good, bad = (noun, plural) if sg else (plural, noun)
        prefix = f"{rng.choice(['she', 'he', 'they'])} {rng.choice(['has', 'had'])} {det}"
        lines.append({"sentence_good": f"{prefix} {good} .", "sentence_bad": f"{prefix} {bad} .",
                      "one_prefix_prefix": prefix, "one_prefix_word_good": good, "one_prefix_word_bad": bad,
                      "field": "morphology", "linguistics_term": "determiner_noun_agreement",
                      "UID": "determiner_noun_agreement_1", "simple_LM_method": True, "one_prefix_method": True,
                      "two_prefix_method": False, "lexically_identical": True, "pairID": str(i)})
    (d / "determiner_noun_agreement_1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return tmp_path / "data"


def test_eval_blimp_and_localise_blimp(tmp_path, rng):
    from kncore.data import blimp_prompts
    from kncore.evaluation import minimal_pair_scores

    data_dir = _blimp_dir(tmp_path, rng)
    seed = int(rng.integers(100))
    common = ["--model", f"tiny-gpt2:{seed}", "--data", "blimp", "--data-dir", str(data_dir),
              "--paradigms", "determiner_noun_agreement_1", "--no-progress"]
    assert main(["eval", *common, "--method", "target", "--out", str(tmp_path / "ev")]) == 0
    lm = tiny_lm("gpt2", seed=seed)
    prompts = list(blimp_prompts(lm, "determiner_noun_agreement_1", data_dir))
    assert prompts
    want = minimal_pair_scores(lm, prompts, method="target")
    got = RunDir.load(tmp_path / "ev").read("pairs").to_pylist()
    assert len(got) == len(want)
    by_id = {r["pair_id"]: r for r in got}
    for w in want:
        g = by_id[w["pair_id"]]
        assert g["correct"] == w["correct"] and g["score_good"] == pytest.approx(w["score_good"], rel=1e-5)
    assert RunDir.load(tmp_path / "ev").manifest["summary"]["accuracy"] == pytest.approx(
        np.mean([w["correct"] for w in want]))
    # localise over the paradigm's classes (singular / plural)
    assert main(["localise", *common, "--steps", "4", "--out", str(tmp_path / "kn")]) == 0
    rd = RunDir.load(tmp_path / "kn")
    classes = {p.cls for p in prompts}
    assert rd.done_keys("kn") == {f"determiner_noun_agreement_1/{c}" for c in classes}
    assert rd.read("prompts").num_rows == len(prompts)


def test_trace_equals_the_api(tmp_path, rng):
    from kncore.tracing import resolve_noise, trace

    seed = int(rng.integers(100))
    recs = [{"known_id": 3, "subject": "canada", "attribute": "ottawa", "prompt": "the capital of canada is"},
            {"known_id": 11, "subject": "the big dog", "attribute": "red", "prompt": "the big dog was"},
            {"known_id": 12, "subject": "red cats", "attribute": "big", "prompt": "the red cats are"}]
    data = tmp_path / "known.json"
    data.write_text(json.dumps(recs))
    out = tmp_path / "run"
    assert main(["trace", "--model", f"tiny-llama:{seed}", "--data", str(data), "--samples", "3", "--window", "2",
                 "--target-mode", "attribute", "--kinds", "hidden,mlp", "--limit", "2", "--out", str(out),
                 "--no-progress"]) == 0
    lm = tiny_lm("llama", seed=seed)
    # as ROME: the noise is measured over every subject of the data set, --limit or not
    scale = resolve_noise(lm, "3sd", [r["subject"] for r in recs])
    rd = RunDir.load(out)
    rows = rd.read("trace").to_pylist()
    assert [r["key"] for r in rows] == ["000003", "000003", "000011", "000011"]
    for rec in recs[:2]:
        res = trace(lm, rec["prompt"], rec["subject"], target=rec["attribute"], kinds=("hidden", "mlp"), samples=3,
                    noise=scale, window=2, seed=1)
        for r in (x for x in rows if x["prompt"] == rec["prompt"]):
            torch.testing.assert_close(torch.tensor(r["scores"]), res.scores[r["kind"]], rtol=1e-5, atol=1e-7)
            assert r["subject_start"] == res.subject_range[0] and r["tokens"] == list(res.tokens)
    assert {r["status"] for r in rd.read("records").to_pylist()} == {"traced"}


def test_edit_and_eval_equal_the_api(tmp_path, rng):
    from kncore import rome
    from kncore.evaluation import EditCase, evaluate_edits

    seed = int(rng.integers(100))
    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n".join(_prompt(rng, 4, 12) for _ in range(40)) + "\n")
    hp = {"layers": [int(rng.integers(0, 3))], "v_num_grad_steps": 4, "mom2_adjustment": True,
          "mom2_dataset": str(corpus), "mom2_n_samples": 30, "mom2_dtype": "float64", "mom2_reg": 0.1,
          "context_template_length_params": [[2, 2]], "kl_prompts": ["{} is a"]}
    (tmp_path / "hp.json").write_text(json.dumps(hp))
    cases = [{"case_id": 0, "subject": "canada", "prompt": "the capital of canada is", "target_new": "rome",
              "target_true": "ottawa", "relation": "P36",
              "probes": [{"kind": "generality", "prompt": "canada has the capital", "target": "rome",
                          "foil": "ottawa"}]},
             {"case_id": 1, "subject": "france", "prompt": "the capital of france is", "target_new": "berlin",
              "target_true": "paris"}]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    common = ["--model", f"tiny-gpt2:{seed}", "--data", str(tmp_path / "cases.json"), "--no-extra-probes",
              "--no-progress"]
    assert main(["edit", *common, "--hparams", str(tmp_path / "hp.json"), "--stats-cache", str(tmp_path / "c1"),
                 "--out", str(tmp_path / "ed")]) == 0
    assert main(["eval", *common, "--out", str(tmp_path / "ev")]) == 0
    lm = tiny_lm("gpt2", seed=seed)
    hparams = rome.load_hparams(str(tmp_path / "hp.json"))
    ecs = [EditCase.from_dict(c) for c in cases]
    want = evaluate_edits(lm, ecs, lambda case: rome.edit(lm, case.request(), hparams, cache_dir=tmp_path / "c2"))
    got = RunDir.load(tmp_path / "ed").read("edit_eval").to_pylist()
    assert len(got) == 2
    for g, w in zip(got, want):
        for k, v in w.items():
            if isinstance(v, float):
                assert g[k] == pytest.approx(v, rel=1e-4, abs=1e-7), k
    ev = RunDir.load(tmp_path / "ev").read("metrics").to_pylist()
    for g, w in zip(ev, want):
        assert g["reliability_prob_pre"] == pytest.approx(w["reliability_prob_pre"], rel=1e-5)
        assert not any(k.endswith("_post") for k in g)


@pytest.mark.slow
def test_smollm_attribute_capital_of_canada(tmp_path, smollm):
    out = tmp_path / "run"
    assert main(["attribute", "--prompt", "The capital of Canada is", "--target", " Ottawa", "--layers", "14-17",
                 "--steps", "6", "--out", str(out), "--no-progress"]) == 0
    rd = RunDir.load(out)
    row = rd.read("attribution").to_pylist()[0]
    p = smollm.next_token_probs("The capital of Canada is")[0, smollm.token_id(" Ottawa")].item()
    assert row["base_prob"] == pytest.approx(p, rel=1e-4) and p > 0.1
    kn = rd.read("kn").to_pylist()
    assert kn and all(14 <= r["layer"] <= 17 for r in kn)
    html, _ = kncore.report.write(out)
    assert "Layer distribution" in html.read_text()


def test_stats_equals_the_api(tmp_path, rng):
    from kncore import rome

    texts = [_prompt(rng, 3, 12) for _ in range(int(rng.integers(20, 40)))]
    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n".join(texts) + "\n")
    seed = int(rng.integers(100))
    out = tmp_path / "run"
    assert main(["stats", "--model", f"tiny-llama:{seed}", "--data", str(corpus), "--layers", "0,2",
                 "--n-samples", "15", "--stats-dtype", "float64", "--stats-cache", str(tmp_path / "cache"),
                 "--out", str(out), "--no-progress"]) == 0
    lm = tiny_lm("llama", seed=seed)
    want = rome.layer_stats(lm, [0, 2], str(corpus), n_samples=15, dtype="float64", use_cache=False, progress=False)
    rows = RunDir.load(out).read("stats").to_pylist()
    assert [r["layer"] for r in rows] == [0, 2]
    for r in rows:
        w = want[r["layer"]]
        assert r["n_tokens"] == w.n_tokens and r["n_texts"] == 15
        assert r["trace"] == pytest.approx(float(w.second_moment.diagonal().sum()), rel=1e-9)
        got = rome.load_stats(r["file"])
        torch.testing.assert_close(got.second_moment, w.second_moment, rtol=1e-12, atol=1e-12)
    assert main(["stats", "--model", "tiny-llama", "--out", str(tmp_path / "x"), "--no-progress"]) == 2  # no --layers


@pytest.mark.slow
def test_named_data_sets_feed_the_commands(smollm, data_dir):
    """--data pararel / blimp / known / counterfact resolve to records for the real tokenizer."""
    import argparse

    def ns(**kw):
        base = dict(command="localise", data=None, data_dir=str(data_dir), limit=2, relations=None, paradigms=None,
                    prompt=None, target=None, subject=None, target_new=None, no_extra_probes=False)
        base.update(kw)
        return argparse.Namespace(**base)

    from kncore.data import records

    bags = records.fact_bags(smollm, "pararel", relations=["P36", "P1376"], limit=2, data_dir=data_dir)
    assert {b["group"] for b in bags} == {"P36", "P1376"} and len(bags) == 4
    for b in bags:
        assert len(b["prompts"]) >= 2 and all(b["subject"] in q for q in b["prompts"])
        assert len({tuple(smollm.target_ids(q, t)) for q, t in zip(b["prompts"], b["targets"])}) == 1
    blimp = records.fact_bags(smollm, "blimp", paradigms=["determiner_noun_agreement_2"], limit=2, data_dir=data_dir)
    assert {b["subject"] for b in blimp} == {"singular", "plural"} and all(len(b["prompts"]) == 2 for b in blimp)
    known = records.trace_records("known", data_dir=data_dir)
    assert len(known) > 1000 and known[0]["subject"] in known[0]["prompt"]  # --limit applies later
    cases = cli.edit_cases(ns(command="edit", data="counterfact"), smollm)
    assert len(cases) == 2 and {p.kind for p in cases[0][1].probes} >= {"reliability", "generality", "locality"}
    recs = records.prompt_records(smollm, "pararel", relations=["P36"], limit=1, data_dir=data_dir)
    assert recs and all(r["relation"] == "P36" for r in recs)
