"""Sequential editing as a run (kncore.sequential, ``kncore edit-seq``): three
MEMIT batches on a tiny model, the resumed run (killed after its first batch)
against the uninterrupted one (weights and tables identical), the checks of a
resume (a tampered update is refused), bad input refused with one line and the
model unchanged, MEMIT's n-gram entropy against its formula, and the report's
collapse finding."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from kncore import sequential
from kncore.cli import main
from kncore.evaluation import fluency
from kncore.rundir import RunDir
from kncore.testing import WORDS, tiny_lm
from test_rome import _one_thread  # noqa: F401  (autouse: tiny models on one thread)

RELATIONS = [("P36", "the capital of {} is"), ("P37", "{} speaks"), ("P19", "{} was born in")]


def _records(n, seed):
    """n CounterFact-layout records with distinct subjects, made of the tiny tokenizer's words."""
    r = random.Random(seed)
    subs, out = [], []
    while len(subs) < n:
        s = " ".join(r.sample(WORDS, 2))
        if s not in subs:
            subs.append(s)
    for i, s in enumerate(subs):
        rel, prompt = r.choice(RELATIONS)
        new, true = r.sample(WORDS, 2)
        out.append({"case_id": i, "requested_rewrite": {"prompt": prompt, "subject": s, "relation_id": rel,
                                                          "target_new": {"str": new}, "target_true": {"str": true}},
                    "paraphrase_prompts": [f"{r.choice(WORDS)} . " + prompt.format(s)],
                    "neighborhood_prompts": [prompt.format(" ".join(r.sample(WORDS, 2)))],
                    "generation_prompts": [f"{s} is a", f"the {s} was"]})
    return out


def _hp(path, layers, seed):
    hp = {"alg_name": "MEMIT", "layers": layers, "v_num_grad_steps": 4, "mom2_adjustment": False,
          "mom2_update_weight": 10.0, "context_template_length_params": [[3, 2]], "kl_prompts": ["{} is a"],
          "context_seed": seed}
    path.write_text(json.dumps(hp))
    return path


def _bits(lm):
    return {k: v.detach().clone().view(torch.int32) for k, v in lm.model.state_dict().items()
            if v.is_floating_point()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _table(path, name):
    return RunDir.load(path).read(name).to_pylist()


def test_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    seed = random.randrange(1000)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(_records(9, seed)))
    hp = _hp(tmp_path / "hp.json", [0, 1], seed)
    args = ["edit-seq", "--model", f"tiny-llama:{seed}", "--data", str(data), "--hparams", str(hp), "--batches", "3",
            "--edits-per-batch", "3", "--fluency-prompts", "2", "--gen-len", "12", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "full")]) == 0

    # The second run dies after its first batch's commit (a crash: the edited model goes with the process).
    real_commit = RunDir.commit
    calls = []

    def dying_commit(self, tables, **kw):
        real_commit(self, tables, **kw)
        calls.append(kw.get("keys"))
        if len(calls) == 2:  # base, then batch 0
            raise RuntimeError("killed")

    monkeypatch.setattr(RunDir, "commit", dying_commit)
    assert main(args + ["--out", str(tmp_path / "cut")]) == 1
    monkeypatch.setattr(RunDir, "commit", real_commit)
    assert RunDir.load(tmp_path / "cut").done_keys(sequential.TABLE) == {"base", "b0000"}

    # The resumed run re-applies batch 0 from its saved factors, then computes 1 and 2.
    reapplied = []
    real_reapply = sequential.reapply
    monkeypatch.setattr(sequential, "reapply", lambda *a: reapplied.append(a[2]) or real_reapply(*a))
    assert main(args + ["--out", str(tmp_path / "cut")]) == 0
    assert reapplied == [[0, 1]]
    for name in (sequential.TABLE, sequential.GEN_TABLE):
        assert _table(tmp_path / "full", name) == _table(tmp_path / "cut", name)
    rows = _table(tmp_path / "full", sequential.TABLE)
    assert [r["key"] for r in rows] == ["b0000", "b0000", "b0001", "b0001", "b0002", "b0002", "base"]
    assert [r["n_edits"] for r in rows if r["scope"] == "cumulative"] == [3, 6, 9]
    assert all(0 <= r[m] <= 1 for r in rows for m in ("ES", "PS", "NS"))
    assert len({r["weights_sha256"] for r in rows}) == 4  # each batch changed the edited weights
    assert (tmp_path / "cut" / "plots" / "collapse.png").stat().st_size > 1000

    # The weights: an API run of the same batches on a fresh model ends where the
    # runs' last hash says, and undo restores every byte.
    lm = tiny_lm("llama", seed=seed)
    snap = _bits(lm)
    hpo = sequential.load_hparams(lm, "memit", str(hp))
    from kncore.data import load_counterfact
    from kncore.evaluation import counterfact_case
    cases = [counterfact_case(r) for r in load_counterfact(data)]
    rd = RunDir.open(tmp_path / "api", {"x": 1}, lm)
    e = sequential.run(lm, rd, [cases[0:3], cases[3:6], cases[6:9]], hpo, prompts=["the cat", "a dog is"],
                       gen_len=12)
    assert sequential.weights_sha256(lm, [0, 1]) == rows[-3]["weights_sha256"]
    assert len(e.steps) == 6
    e.undo()
    assert _same(_bits(lm), snap)


def test_resume_refuses_a_tampered_update(tmp_path):
    seed = random.randrange(1000)
    lm = tiny_lm("gpt2", seed=seed)
    from kncore.data import load_counterfact
    from kncore.evaluation import counterfact_case
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(_records(4, seed)))
    cases = [counterfact_case(r) for r in load_counterfact(data)]
    hp = sequential.load_hparams(lm, "memit", str(_hp(tmp_path / "hp.json", [1], seed)))
    rd = RunDir.open(tmp_path / "run", {"x": 1}, lm)
    sequential.run(lm, rd, [cases[:2], cases[2:]], hp, prompts=["the cat"], gen_len=8).undo()
    rd.close()
    # the saved factors altered on their way back (what a different op or device would do)
    lm2 = tiny_lm("gpt2", seed=seed)
    snap = _bits(lm2)
    rd = RunDir.open(tmp_path / "run", {"x": 1}, lm2)
    real = sequential.reapply

    def bad(lm_, tensors, layers, reqs):
        t = dict(tensors)
        t["s000.right"] = t["s000.right"] * 1.0001
        return real(lm_, t, layers, reqs)

    sequential.reapply = bad
    try:
        with pytest.raises(sequential.InputError, match="re-applying batch 0's saved update gives weights"):
            sequential.run(lm2, rd, [cases[:2], cases[2:]], hp, prompts=["the cat"], gen_len=8)
    finally:
        sequential.reapply = real
    assert _same(_bits(lm2), snap)


@pytest.mark.parametrize("case", ["empty", "conflict_in_batch", "conflict_across", "layer"])
def test_bad_input_one_line_model_unchanged(tmp_path, case, capsys):
    seed = random.randrange(1000)
    recs = _records(4, seed)
    lm = tiny_lm("gpt2", seed=seed)
    snap = _bits(lm)
    from kncore.data import load_counterfact
    from kncore.evaluation import counterfact_case
    if case.startswith("conflict"):
        j = 1 if case == "conflict_in_batch" else 3
        first = recs[0]["requested_rewrite"]
        other = next(w for w in WORDS if w != first["target_new"]["str"])
        recs[j]["requested_rewrite"] = dict(first, target_new={"str": other})
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(recs))
    cases = [counterfact_case(r) for r in load_counterfact(data)]
    hp = sequential.load_hparams(lm, "memit", str(_hp(tmp_path / "hp.json", [1], seed)))
    batches = {"empty": [cases[:2], []], "conflict_in_batch": [cases[:2], cases[2:]],
               "conflict_across": [cases[:2], cases[2:]], "layer": [cases[:2], cases[2:]]}[case]
    want = {"empty": "batch 1 of 2 is empty", "conflict_in_batch": "rewrite the same subject",
            "conflict_across": "batch 0 request 0 and batch 1 request 1 rewrite the same subject",
            "layer": "layer 7 is outside the model's 3 layers"}[case]
    rd = RunDir.open(tmp_path / "run", {"x": 1}, lm)
    with pytest.raises(sequential.InputError, match=want) as ei:
        if case == "layer":
            sequential.load_hparams(lm, "memit", str(tmp_path / "hp.json"), layers=[1, 7])
        sequential.run(lm, rd, batches, hp, prompts=["the cat"], gen_len=8)
    assert "\n" not in str(ei.value)
    assert _same(_bits(lm), snap)
    assert rd.done_keys() == set()
    rd.close()
    # the command line: one line on stderr, exit 2, no run directory
    hpf = tmp_path / "hp.json"
    cmd = ["edit-seq", "--model", f"tiny-gpt2:{seed}", "--data", str(data), "--hparams", str(hpf), "--batches", "2",
           "--edits-per-batch", "2", "--gen-len", "8", "--fluency-prompts", "1", "--no-progress",
           "--out", str(tmp_path / "cli")]
    if case == "empty":
        cmd[cmd.index("--edits-per-batch") + 1] = "0"
        assert main(cmd) == 2
        assert "--edits-per-batch" in capsys.readouterr().err
    else:
        if case == "layer":
            cmd += ["--layers", "1,7"]
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and ("rewrite the same subject" in err or "layer 7" in err)
    assert not (tmp_path / "cli").exists()


def test_ngram_entropy_is_memits_formula():
    r = random.Random()
    toks = [r.choice(WORDS[:8]) for _ in range(r.randint(8, 40))]
    text = " ".join(toks) + " ."
    words = toks + ["."]

    def H(n):
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        return -sum(grams.count(g) / len(grams) * math.log2(grams.count(g) / len(grams)) for g in set(grams))

    assert fluency.ngram_entropy(text) == pytest.approx((2 / 3 * H(2) + 4 / 3 * H(3)) / 2, rel=1e-12)
    assert fluency.ngram_entropy("the the the the the the") == 0.0
    assert fluency.words("Paris, don't go.") == ["Paris", ",", "don't", "go", "."]
    assert fluency.mean_ngram_entropy(["a b c d", "a a a a"]) == pytest.approx(fluency.ngram_entropy("a b c d") / 2)


def test_report_shows_the_collapse(tmp_path):
    from kncore import report

    seed = random.randrange(1000)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(_records(4, seed)))
    hp = _hp(tmp_path / "hp.json", [1], seed)
    assert main(["edit-seq", "--model", f"tiny-gpt2:{seed}", "--data", str(data), "--hparams", str(hp),
                 "--batches", "2", "--edits-per-batch", "2", "--fluency-prompts", "1", "--gen-len", "8",
                 "--no-progress", "--out", str(tmp_path / "run")]) == 0
    secs = report.build(tmp_path / "run")
    seq = [s for s in secs if s.title == "Sequential editing" and not s.fold]
    assert len(seq) == 1 and seq[0].figures and "After 4 edits in 2 batches" in seq[0].text
    assert not any(f.name == "plots-collapse" for s in secs for f in s.figures)  # shown once, among the findings
    html, md = report.write(tmp_path / "run")
    assert "Sequential editing" in md.read_text()


@pytest.mark.parametrize("method", ["rome", "emmet"])
def test_other_editors_resume_from_their_saved_factors(tmp_path, method):
    """ROME's rank-one steps (one per request) and EMMET's rank-B steps are saved
    and re-applied to the same bits on a fresh copy of the model."""
    seed = random.randrange(1000)
    from kncore.data import load_counterfact
    from kncore.evaluation import counterfact_case
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(_records(4, seed)))
    cases = [counterfact_case(r) for r in load_counterfact(data)]
    hpd = json.loads(_hp(tmp_path / "hp.json", [1], seed).read_text())
    hpd["alg_name"] = method.upper()
    r = random.Random(seed)
    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n".join(" ".join(r.choices(WORDS, k=r.randint(5, 20))) for _ in range(40)) + "\n")
    hpd.update(mom2_adjustment=True, mom2_dataset=str(corpus), mom2_n_samples=40, mom2_dtype="float64",
               mom2_reg=0.1)  # statistics computed once, then loaded from the cache by the resumed run
    hpd.pop("mom2_update_weight") if method == "rome" else None
    (tmp_path / "hp.json").write_text(json.dumps(hpd))
    lm = tiny_lm("gpt2", seed=seed)
    snap = _bits(lm)
    hp = sequential.load_hparams(lm, method, str(tmp_path / "hp.json"))
    rd = RunDir.open(tmp_path / "run", {"m": method}, lm)
    e = sequential.run(lm, rd, [cases[:2], cases[2:]], hp, prompts=["the cat"], gen_len=8,
                       cache_dir=tmp_path / "stats")
    assert len(e.steps) == (4 if method == "rome" else 2)
    final = sequential.weights_sha256(lm, [1])
    rd.close()
    lm2 = tiny_lm("gpt2", seed=seed)
    rd = RunDir.open(tmp_path / "run", {"m": method}, lm2)
    e2 = sequential.run(lm2, rd, [cases[:2], cases[2:]], hp, prompts=["the cat"], gen_len=8,
                        cache_dir=tmp_path / "stats")
    assert sequential.weights_sha256(lm2, [1]) == final != sequential.weights_sha256(tiny_lm("gpt2", seed=seed), [1])
    assert _same(_bits(lm2), _bits(lm))
    e2.undo()
    e.undo()
    assert _same(_bits(lm), snap) and _same(_bits(lm2), snap)


def test_score_cases_equals_evaluate_edits_without_an_edit(tmp_path):
    """The cumulative scorer (all cases' probes batched together) gives evaluate_edits' rows."""
    from kncore.data import load_counterfact
    from kncore.evaluation import counterfact_case, evaluate_edits
    from kncore.evaluation.edits import score_cases

    seed = random.randrange(1000)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(_records(5, seed)))
    cases = [counterfact_case(r) for r in load_counterfact(data)]
    lm = tiny_lm("gpt2", seed=seed)
    got, want = score_cases(lm, cases, batch_size=4), evaluate_edits(lm, cases, None)
    assert len(got) == len(want) == 5
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k, v in w.items():
            assert g[k] == (pytest.approx(v, rel=1e-5, abs=1e-7) if isinstance(v, float) else v), k
