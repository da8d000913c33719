"""Causal tracing: the batched, cache-reusing grid equals ROME's per-cell loop
(one HF forward per cell with hooks) on every architecture; corpus runs resume
to the same files; the AIE groups are ROME's; plots are written; bad input is
refused."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from kncore import InputError
from kncore.testing import WORDS, tiny_lm
from kncore.tracing import (TraceResult, average_indirect_effect, embedding_std, trace,
                            trace_corpus, trace_ref, window_layers)
from kncore.tracing import core
from kncore.tracing import corpus as corpus_mod


def _rng():
    return random.Random(int(torch.randint(0, 1 << 30, ()).item()))


def _prompt(lm, rng, n_tokens):
    """A random prompt and a subject of 1-3 tokens somewhere in it (BERT: with
    one [MASK] after the subject)."""
    words = [rng.choice(WORDS) for _ in range(n_tokens)]
    size = rng.randint(1, 3)
    start = rng.randint(0, n_tokens - size - 1)
    subject = " ".join(words[start:start + size])
    if lm.is_mlm:
        words.insert(rng.randint(start + size, n_tokens), "[MASK]")
    return " ".join(words), subject


def _rel(a, b):
    return ((a - b).abs() / b.abs()).max().item()


@pytest.mark.every_arch
def test_embedding_std_is_that_of_the_embedding_output(tiny):
    """The noise scale ("3sd") is measured on what the noise is added to: the
    embedding module's output (Gemma's scales its rows by sqrt(d_model))."""
    emb = tiny.adapter.embedding_module()
    with torch.no_grad():
        out = emb(torch.arange(emb.weight.shape[0]))
    assert core.embedding_std(tiny) == pytest.approx(float(out.float().std()), rel=1e-5)


def test_target_probs_are_the_float64_softmax(monkeypatch):
    """A cell's score is softmax(head(h))[target]: within 2e-7 of the float64
    softmax of the same float32 logits over a 50k vocabulary, the same whatever
    the slices the head runs in (the normaliser is a float64 sum)."""
    g = torch.Generator().manual_seed(0)
    d, vocab, rows, target = 16, 50257, 37, 123
    head = torch.randn(vocab, d, generator=g)

    class Ad:
        vocab_size = vocab

        @staticmethod
        def final(h):
            return h @ head.T

    hidden = torch.randn(rows, d, generator=g) * 2
    ref = torch.softmax((hidden @ head.T).double(), -1)[:, target]
    got = core._target_probs(Ad, hidden, target)
    assert got.dtype == torch.float32 and got.shape == (rows,)
    assert _rel(got.double(), ref) <= 2e-7
    monkeypatch.setattr(core, "HEAD_BYTES", vocab * 4 * 5)  # 5 rows per slice
    assert torch.equal(core._target_probs(Ad, hidden, target), got)


@pytest.mark.every_arch
def test_trace_equals_rome_loop(tiny, monkeypatch):
    rng = _rng()
    prompt, subject = _prompt(tiny, rng, rng.randint(5, 8))
    samples, window = rng.randint(2, 4), rng.randint(1, 6)
    # a small state cap splits a token's jobs into several walks, a small
    # max_tokens forces several runtime calls per layer
    monkeypatch.setattr(core, "STATE_BYTES", samples * 10 * tiny.d_model * 4 * rng.randint(1, 6))
    fast = trace(tiny, prompt, subject, samples=samples, window=window, seed=rng.randint(0, 99),
                 noise="3sd", max_tokens=rng.randint(5, 40))
    ref = trace_ref(tiny, prompt, subject, samples=samples, window=window, seed=fast.seed, noise="3sd")
    assert fast.target == ref.target and fast.subject_range == ref.subject_range
    assert abs(fast.high - ref.high) <= 1e-5 * ref.high
    assert abs(fast.low - ref.low) <= 1e-5 * ref.low
    assert fast.low != pytest.approx(fast.high, rel=1e-3)  # the noise did something
    for k in ("hidden", "mlp", "attn"):
        assert fast.scores[k].shape == (len(fast.tokens), tiny.n_layers)
        assert _rel(fast.scores[k], ref.scores[k]) <= 1e-5, k
        assert fast.scores[k].std() > 0


def test_clipped_windows_start_from_the_longest(arch, monkeypatch):
    """Windows clipped at layer 0 ([0, 2), [0, 3) beside [0, 4)) restore a prefix
    of the longest one, so their rows start at their hi as copies of its rows;
    the scores stay ROME's, also when a small state cap puts them in another
    walk than their parent."""
    lm = tiny_lm(arch, seed=int(torch.randint(0, 1000, ())), n_layers=6)
    jobs, cells = core._jobs(("mlp", "attn"), 7, 6, 1, 4, lm.adapter.causal)
    kids = [j for j in jobs if j.parent is not None]
    assert sorted({(j.lo, j.hi) for j in kids}) == [(0, 2), (0, 3)]
    assert all(j.parent.hi == 4 and (j.parent.t, j.parent.code, j.parent.lo) == (j.t, j.code, 0) for j in kids)
    assert len(kids) == 2 * 2 * (7 if lm.is_mlm else 6)  # 2 kinds x 2 windows x the tokens from the subject on
    rng = _rng()
    prompt, subject = _prompt(lm, rng, 6)
    ref = trace_ref(lm, prompt, subject, samples=3, window=4, kinds=("mlp", "attn"))
    for cap in (core.STATE_BYTES, 3 * 8 * lm.d_model * 4):
        monkeypatch.setattr(core, "STATE_BYTES", cap)
        fast = trace(lm, prompt, subject, samples=3, window=4, kinds=("mlp", "attn"), max_tokens=17)
        for k in ("mlp", "attn"):
            assert _rel(fast.scores[k], ref.scores[k]) <= 1e-5, (k, cap)


def test_restoration_identities(tiny):
    """Restoring the last token's block output at the last layer gives the
    clean probability; on decoders, tokens before the subject give the
    corrupted one (the noise cannot reach them)."""
    rng = _rng()
    prompt, subject = _prompt(tiny, rng, 7)
    res = trace(tiny, prompt, subject, kinds=("hidden",), samples=3)
    tpos = res.target_position
    assert res.scores["hidden"][tpos, -1].item() == pytest.approx(res.high, rel=1e-5)
    b, _ = res.subject_range
    if not tiny.is_mlm:
        assert torch.all(res.scores["hidden"][:b] == res.low)
        # a block output below the last token at the last layer cannot reach the head
        assert torch.allclose(res.scores["hidden"][b:tpos, -1], torch.tensor(res.low), rtol=1e-5)


def test_zero_noise_restores_nothing(arch):
    lm = tiny_lm(arch, seed=int(torch.randint(0, 1000, ())))
    rng = _rng()
    prompt, subject = _prompt(lm, rng, 6)
    res = trace(lm, prompt, subject, noise=0.0, samples=2, window=3)
    assert res.low == pytest.approx(res.high, rel=1e-5)
    for k in res.kinds:
        assert torch.allclose(res.scores[k], torch.tensor(res.high), rtol=1e-5)


def test_noise_levels():
    lm = tiny_lm("gpt2", seed=int(torch.randint(0, 1000, ())))
    subjects = ["canada", "the big city", "paris"]
    # ROME's collect_embedding_std: embed each subject alone, std of all elements
    emb = lm.adapter.embedding_module()
    alldata = torch.cat([emb(torch.tensor(lm.tokenizer(s, add_special_tokens=False)["input_ids"]))
                         for s in subjects])
    assert embedding_std(lm, subjects) == pytest.approx(alldata.std().item(), rel=1e-6)
    assert embedding_std(lm) == pytest.approx(emb.weight.std().item(), rel=1e-6)
    a = trace(lm, "the capital of canada is", "canada", noise="2.5sd", noise_subjects=subjects, samples=2,
              kinds=("hidden",))
    assert a.noise == pytest.approx(2.5 * alldata.std().item(), rel=1e-6)
    b = trace(lm, "the capital of canada is", "canada", noise=a.noise, samples=2, kinds=("hidden",))
    assert torch.equal(a.scores["hidden"], b.scores["hidden"])
    c = trace(lm, "the capital of canada is", "canada", noise=a.noise, samples=2, kinds=("hidden",), seed=2)
    assert c.low != a.low  # another seed, another noise draw


def test_target_forms():
    lm = tiny_lm("llama", seed=int(torch.randint(0, 1000, ())))
    prompt = "the capital of canada is"
    by_word = trace(lm, prompt, "canada", target="ottawa", samples=2, kinds=("mlp",), window=2)
    by_id = trace(lm, prompt, "canada", target=lm.single_token(prompt, "ottawa"), samples=2, kinds=("mlp",),
                  window=2)
    assert by_word.answer.strip() == "ottawa"
    assert torch.equal(by_word.scores["mlp"], by_id.scores["mlp"])
    with pytest.raises(InputError, match="one token"):
        trace(lm, prompt, "canada", target="ottawa paris", samples=2)
    with pytest.raises(InputError, match="outside the vocabulary"):
        trace(lm, prompt, "canada", target=10 ** 6, samples=2)


def test_window_layers_is_romes():
    for N in (3, 12, 48):
        for w in (1, 2, 5, 10):
            for l in range(N):
                r = window_layers(l, w, N)
                assert list(r) == [L for L in range(max(0, l - w // 2), min(N, l - (-w // 2)))]
                assert l in r


@pytest.mark.parametrize("bad, match", [
    (dict(prompt=""), "empty prompt"),
    (dict(subject="berlin"), "not in the prompt"),
    (dict(samples=0), "samples"),
    (dict(samples=2.5), "samples"),
    (dict(kinds=("hidden", "mlps")), "unknown kind"),
    (dict(kinds=()), "no kinds"),
    (dict(window=0), "window"),
    (dict(noise="lots"), "not understood"),
    (dict(noise=-1.0), ">= 0"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_bad_input(bad, match):
    lm = tiny_lm("gpt2")
    args = dict(prompt="the capital of canada is", subject="canada")
    args.update(bad)
    with pytest.raises(InputError, match=match):
        trace(lm, args.pop("prompt"), args.pop("subject"), **args)


def test_plot_formats(tmp_path):
    lm = tiny_lm("gptj", seed=int(torch.randint(0, 1000, ())))
    res = trace(lm, "the capital of canada is", "capital of canada", samples=2, window=2)
    magic = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}
    for ext, head in magic.items():
        p = res.plot(tmp_path / f"trace.{ext}")
        assert p.read_bytes()[:len(head)] == head
    res.plot(tmp_path / "mlp_only.png", kinds=["mlp"])
    with pytest.raises(InputError, match="must end in"):
        res.plot(tmp_path / "trace.jpg")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["mlp_only.png", "trace.pdf", "trace.png", "trace.svg"]


def test_result_roundtrip():
    lm = tiny_lm("gpt2", seed=int(torch.randint(0, 1000, ())))
    res = trace(lm, "the capital of canada is", "canada", samples=2)
    back = TraceResult.from_dict(json.loads(json.dumps(res.to_dict())))
    for k in res.kinds:
        assert torch.equal(back.scores[k], res.scores[k])
    assert back.low == res.low and back.subject_range == res.subject_range and back.tokens == res.tokens


# -- corpus ---------------------------------------------------------------------------------
def _records(lm, rng, n):
    """known_1000-style records; about half carry the model's own top-1 as the
    attribute (traced), the rest a wrong one (skipped, as ROME does)."""
    recs = []
    for i in range(n):
        prompt, subject = _prompt(lm, rng, rng.randint(4, 7))
        top = lm.top_k(prompt, k=2)
        attr = top[0][0].strip() if i % 2 == 0 else top[1][0].strip()
        recs.append({"known_id": 100 + i, "subject": subject, "attribute": attr, "template": "-",
                     "prediction": "-", "prompt": prompt, "relation_id": "P0"})
    return recs


def _files(d):
    return {p.name: json.loads(p.read_text()) for p in sorted((d / "records").iterdir())}


def test_corpus_resumes_to_the_same_files(tmp_path, monkeypatch):
    lm = tiny_lm("gpt2", seed=int(torch.randint(0, 1000, ())))
    rng = _rng()
    recs = _records(lm, rng, 6)
    kw = dict(kinds=("hidden", "attn"), samples=2, window=2, progress=False)
    full = trace_corpus(lm, recs, tmp_path / "a", **kw)
    assert [r["status"] for r in full] == ["ok", "wrong_prediction"] * 3
    assert all(r["trace"].answer.strip() == r["record"]["attribute"] for r in full if r["status"] == "ok")

    k = rng.randint(1, 2)
    real, calls = corpus_mod.trace, []

    def interrupted(*a, **kw2):
        if len(calls) == k:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **kw2)
    monkeypatch.setattr(corpus_mod, "trace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trace_corpus(lm, recs, tmp_path / "b", **kw)
    done = _files(tmp_path / "b")
    assert 0 < len(done) < len(recs)
    assert all(not n.startswith(".") for n in done)  # no temp files left behind
    monkeypatch.setattr(corpus_mod, "trace", real)
    resumed = trace_corpus(lm, recs, tmp_path / "b", **kw)
    assert _files(tmp_path / "b") == _files(tmp_path / "a")
    assert len(resumed) == len(recs)

    with pytest.raises(InputError, match="other settings.*samples"):
        trace_corpus(lm, recs, tmp_path / "b", **{**kw, "samples": 3})


def test_corpus_bad_records(tmp_path):
    lm = tiny_lm("gpt2")
    with pytest.raises(InputError, match="no 'subject'"):
        trace_corpus(lm, [{"prompt": "the dog", "attribute": "x"}], tmp_path, progress=False)
    with pytest.raises(InputError, match="twice"):
        r = {"known_id": 1, "prompt": "the dog", "subject": "dog", "attribute": "x"}
        trace_corpus(lm, [r, r], tmp_path, progress=False)
    with pytest.raises(InputError, match="does not exist"):
        trace_corpus(lm, tmp_path / "none.json", tmp_path, progress=False)


def _fake(scores_by_token, subject_range, n_layers=4, low=0.1):
    T = len(scores_by_token)
    s = torch.tensor(scores_by_token, dtype=torch.float32)[:, None].expand(T, n_layers).clone()
    return TraceResult(scores={"hidden": s}, low=low, high=0.9, tokens=["w"] * T, input_ids=list(range(T)),
                       subject_range=subject_range, target=0, answer="x", target_position=T - 1, prompt="p",
                       subject="s", kinds=("hidden",), window=10, samples=10, noise=0.1, seed=1)


def test_aie_groups_are_romes(tmp_path):
    # token values: a grid whose row t holds v[t] at every layer
    v1 = np.random.rand(8).round(3).tolist()   # subject 1:5 -> first 1, middle 2,3, last 4; then 5, 6, last 7
    v2 = np.random.rand(5).round(3).tolist()   # subject 0:1 -> first = last = 0; then 1, further 2,3, last 4
    aie = average_indirect_effect([_fake(v1, (1, 5), low=0.1), _fake(v2, (0, 1), low=0.3)])
    want = [np.mean([v1[1], v2[0]]), np.mean([v1[2], v1[3]]), np.mean([v1[4], v2[0]]),
            np.mean([v1[5], v2[1]]), np.mean([v1[6], v2[2], v2[3]]), np.mean([v1[7], v2[4]])]
    assert np.allclose(aie.mean["hidden"][:, 0], want)
    assert np.allclose(aie.effect("hidden")[:, 2], np.array(want) - 0.2)
    assert np.allclose(aie.std["hidden"][:, 1][1], np.std([v1[2], v1[3]]))
    assert aie.count == 2 and aie.total_effect == pytest.approx(0.9 - 0.2)
    assert aie.plot(tmp_path / "aie.svg").read_bytes()[:5] == b"<?xml"
    with pytest.raises(InputError, match="no traced"):
        average_indirect_effect([])


# -- the real model ----------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm_trace_matches_rome_loop(smollm):
    prompt, subject = "The capital of Canada is", "Canada"
    res = trace(smollm, prompt, subject, samples=4)
    assert res.answer == " Ottawa"
    assert res.high > 0.1 and res.low < res.high / 10
    cells = random.Random(int(torch.randint(0, 1 << 30, ()))).sample(
        [(k, t, l) for k in res.kinds for t in range(len(res.tokens)) for l in range(smollm.n_layers)], 12)
    ref = trace_ref(smollm, prompt, subject, samples=4, cells=cells)
    assert ref.low == pytest.approx(res.low, rel=1e-5)
    # relative error of the map (max-norm): a cell's own relative error is the
    # absolute error of its log-probability, i.e. of fp32 logits after 30
    # layers, ~1e-5 on its own (1.3e-5 seen on a cell at p = 0.0015)
    scale = max([ref.high] + [abs(ref.scores[k][t, l].item()) for k, t, l in cells])
    for k, t, l in cells:
        assert abs(res.scores[k][t, l].item() - ref.scores[k][t, l].item()) <= 1e-5 * scale, (k, t, l)
    # ROME's finding, at this scale too: the last subject token's early MLPs carry the fact
    _, e = res.subject_range
    assert res.scores["mlp"][e - 1, : smollm.n_layers // 2].max() > res.low + 0.5 * (res.high - res.low)


@pytest.mark.slow
def test_smollm_known_1000_corpus(smollm, data_dir, tmp_path):
    recs = json.loads((data_dir / "known" / "known_1000.json").read_text())[:4]
    out = trace_corpus(smollm, recs, tmp_path, kinds=("hidden",), samples=2, progress=False)
    assert len(out) == 4 and {r["status"] for r in out} <= {"ok", "wrong_prediction"}
    cfg = json.loads((tmp_path / "config.json").read_text())
    # ROME's noise: 3 x the std of the embeddings of the data set's subjects
    assert cfg["noise_scale"] == pytest.approx(3 * embedding_std(smollm, [r["subject"] for r in recs]), rel=1e-6)
    for r in out:
        if r["status"] == "ok":
            assert r["trace"].answer.strip() == r["record"]["attribute"]
