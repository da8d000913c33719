"""Layer statistics that know when they have converged: probe keys, the change
history, the stop, its exactness (a stopped C is the C of the first n texts),
resume, cache identity and bad input (kncore.rome.stats)."""
from __future__ import annotations

import random

import pytest
import torch

from kncore import rome
from kncore.cli import main
from kncore.errors import InputError
from kncore.rome import editing
from kncore.rome import stats as S
from kncore.testing import WORDS, tiny_lm


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _seed():
    return int(torch.randint(0, 1 << 30, ()).item())


def _texts(n, seed, lo=1, hi=30):
    r = random.Random(seed)
    return [" ".join(r.choices(WORDS, k=r.randint(lo, hi))) for _ in range(n)]


def _reqs(k=4):
    subjects = random.Random(_seed()).sample(WORDS, k)
    return [{"prompt": "the capital of {} is", "subject": s, "target_new": "rome"} for s in subjects]


def _setup(n=300, arch="llama"):
    lm = tiny_lm(arch, seed=_seed())
    texts = _texts(n, _seed())
    keys = rome.probe_keys_for(lm, _reqs(), [0, 2])
    return lm, texts, keys


KW = dict(n_samples=None, dtype="float64", chunk_texts=8, check_every=150, progress=False)


def _tol_stopping_midway(hist):
    """A tolerance that two consecutive checks in the middle of ``hist`` meet, so the
    converged run stops there at the latest (and certainly before the end)."""
    ch = [h["change"] for h in hist]
    i = len(ch) // 2
    assert ch[i] is not None and ch[i + 1] is not None and i + 1 < len(ch) - 1
    return max(ch[i], ch[i + 1]) * (1 + 1e-9)


def test_probe_keys_are_the_editors_keys():
    lm = tiny_lm("gpt2", seed=_seed())
    reqs = _reqs(3)
    keys = rome.probe_keys_for(lm, reqs, [1, 2])
    for L in (1, 2):
        rows = [editing.locate(lm, r["prompt"], r["subject"], "subject_last") for r in reqs]
        acts, _ = editing.compute_keys(lm, L, rows)
        assert keys[L].shape == (3, lm.d_ff)
        torch.testing.assert_close(keys[L], acts.float(), rtol=1e-5, atol=1e-6)


def test_stopped_C_is_the_C_of_the_first_n_texts(tmp_path):
    lm, texts, keys = _setup()
    watched = rome.layer_stats(lm, [0, 2], texts, probe_keys=keys, use_cache=False, **KW)
    hist = watched[0].convergence["history"]
    assert watched[0].convergence["stopped"] is False and watched[0].n_texts == len(texts)
    # monitoring alone does not change the statistics
    plain = rome.layer_stats(lm, [0, 2], texts, use_cache=False, **{k: v for k, v in KW.items() if k != "check_every"})
    assert torch.equal(plain[0].second_moment, watched[0].second_moment)
    # the change shrinks as the statistics fill in: the last quarter's mean is well
    # below the first measured changes'
    ch = [h["change"] for h in hist if h["change"] is not None]
    assert len(ch) >= 8
    q = len(ch) // 4
    assert sum(ch[-q:]) / q < 0.5 * sum(ch[:q]) / q, ch
    assert all(b["tokens"] - a["tokens"] >= KW["check_every"] for a, b in zip(hist, hist[1:]))

    tol = _tol_stopping_midway(hist)
    st = rome.layer_stats(lm, [0, 2], texts, probe_keys=keys, until="converged", tol=tol, use_cache=False, **KW)
    conv = st[0].convergence
    n = st[0].n_texts
    assert conv["stopped"] and n < len(texts) and n % KW["chunk_texts"] == 0
    assert conv["history"] == hist[:len(conv["history"])], "the stop is a prefix of the full stream's checks"
    assert conv["change_at_stop"] < tol and conv["history"][-2]["change"] < tol
    assert st[0].n_tokens == conv["history"][-1]["tokens"]
    first_n = rome.layer_stats(lm, [0, 2], texts, n_samples=n, dtype="float64", chunk_texts=KW["chunk_texts"],
                               use_cache=False, progress=False)
    for L in (0, 2):
        assert first_n[L].n_texts == n and first_n[L].n_tokens == st[L].n_tokens
        assert torch.equal(first_n[L].second_moment, st[L].second_moment), "bit for bit"
        assert torch.equal(first_n[L].mean, st[L].mean)


def test_resume_after_interrupt_gives_the_same_file(tmp_path):
    lm, texts, keys = _setup(200, "gpt2")
    kw = dict(KW, dtype="float32", batch_tokens=48, checkpoint_every=3, probe_keys=keys, until="converged",
              tol=1e-6)  # a tolerance it never meets: it reads every text, checking all the way

    def boom(info):
        if info["batches"] == 40:
            raise KeyboardInterrupt("injected")

    with pytest.raises(KeyboardInterrupt):
        rome.layer_stats(lm, [0, 2], texts, cache_dir=tmp_path / "a", **dict(kw, progress=boom))
    assert list((tmp_path / "a").rglob("partial-*")), "a checkpoint was left behind"
    seen = []
    resumed = rome.layer_stats(lm, [0, 2], texts, cache_dir=tmp_path / "a", **dict(kw, progress=seen.append))
    assert seen[0]["batches"] == 40, "resumed after the checkpoint at batch 39, not from the start"
    assert not list((tmp_path / "a").rglob("partial-*"))
    whole = rome.layer_stats(lm, [0, 2], texts, cache_dir=tmp_path / "b", **kw)
    for L in (0, 2):
        assert torch.equal(resumed[L].second_moment, whole[L].second_moment)
        a, b = rome.read_meta(resumed[L].path), rome.read_meta(whole[L].path)
        a.pop("seconds"), b.pop("seconds")
        assert a == b and resumed[L].path.name == whole[L].path.name
        assert len(a["convergence"]["history"]) > 3


def test_converged_and_full_files_have_their_own_identity(tmp_path):
    lm, texts, keys = _setup(120, "gpt2")
    calls = []
    base = dict(KW, cache_dir=tmp_path, progress=calls.append)
    full = rome.layer_stats(lm, [0, 2], texts, **{k: v for k, v in base.items() if k != "check_every"})
    calls.clear()
    conv = rome.layer_stats(lm, [0, 2], texts, probe_keys=keys, until="converged", tol=0.5, **base)
    assert calls, "a converged request does not take the full file"
    assert conv[0].path != full[0].path and "-conv-" in conv[0].path.name
    assert conv[0].key != full[0].key
    assert rome.read_meta(conv[0].path)["until"]["tol"] == 0.5 and "until" not in rome.read_meta(full[0].path)
    calls.clear()
    again = rome.layer_stats(lm, [0, 2], texts, probe_keys=keys, until="converged", tol=0.5, **base)
    assert not calls and again[0].path == conv[0].path and torch.equal(again[0].second_moment,
                                                                       conv[0].second_moment)
    assert again[0].convergence == conv[0].convergence
    # another tolerance, other probes, or the layers stopping together differ: each its own file
    other = {k: v[:2] for k, v in keys.items()}
    paths = {conv[0].path}
    for kw in (dict(tol=0.4), dict(tol=0.5, probe_keys=other)):
        calls.clear()
        got = rome.layer_stats(lm, [0, 2], texts, **dict(dict(probe_keys=keys, until="converged"), **kw), **base)
        assert calls and got[0].path not in paths
        paths.add(got[0].path)
    calls.clear()
    full2 = rome.layer_stats(lm, [0, 2], texts, **{k: v for k, v in base.items() if k != "check_every"})
    assert not calls and full2[0].path == full[0].path, "the full file is still found, and not a converged one"


def test_bad_input_is_refused(monkeypatch, tmp_path, capsys):
    lm, texts, keys = _setup(20, "gpt2")
    kw = dict(use_cache=False, progress=False)
    cases = [
        (dict(until="converged"), "needs probe_keys"),
        (dict(check_every=100), "needs probe_keys"),
        (dict(probe_keys=keys, until="always"), "until must be"),
        (dict(probe_keys=keys, until="converged", tol=0), "tol must be"),
        (dict(probe_keys=keys, until="converged", tol=1.5), "tol must be"),
        (dict(probe_keys=keys, until="converged", tol=float("nan")), "tol must be"),
        (dict(probe_keys=keys, check_every=0), "check_every must be"),
        (dict(probe_keys=keys, probe_reg=-1.0), "probe_reg must be"),
        (dict(probe_keys={0: keys[0]}), r"no probe keys for layers \[2\]"),
        (dict(probe_keys={0: keys[0], 2: keys[2][:, :5]}), "must be"),
        (dict(probe_keys={0: keys[0], 2: keys[2] * float("nan")}), "NaN"),
        (dict(probe_keys={0: keys[0], 2: torch.zeros_like(keys[2])}), "all zeros"),
        (dict(probe_keys=keys[0]), "one probe-key tensor"),
    ]
    for extra, msg in cases:
        with pytest.raises(InputError, match=msg):
            rome.layer_stats(lm, [0, 2], texts, **kw, **extra)
    with pytest.raises(InputError, match="no requests"):
        rome.probe_keys_for(lm, [], [0])
    with pytest.raises(InputError, match="outside"):
        rome.probe_keys_for(lm, _reqs(1), [lm.n_layers])
    monkeypatch.setattr(S.dist, "world", lambda: 2)
    with pytest.raises(InputError, match="torchrun"):
        rome.layer_stats(lm, [0, 2], texts, probe_keys=keys, **kw)
    monkeypatch.undo()
    # the command line: one line naming the option, before anything is loaded
    for argv, msg in ((["--tol", "0"], "--tol"), (["--check-every", "-5"], "--check-every"),
                      (["--n-probes", "0"], "--n-probes"), (["--until", "never"], "--until"),
                      (["--until", "converged"], "need --probes")):
        assert main(["stats", "--model", "tiny-gpt2", "--layers", "0", "--out", str(tmp_path / "r"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_memit_on_converged_statistics_with_shared_targets():
    """An editor takes converged statistics as any others, and z computed once
    (compute_targets) gives the same edit as z computed inside batch_edit."""
    from test_memit import _hp, _requests
    from kncore.rome import memit
    from kncore.rome.templates import context_templates
    lm = tiny_lm("llama", seed=_seed())
    reqs = _requests(3, _seed())
    keys = rome.probe_keys_for(lm, reqs, [1, 2])
    st = rome.layer_stats(lm, [1, 2], _texts(150, _seed()), probe_keys=keys, until="converged", tol=0.3,
                          use_cache=False, **KW)
    assert st[1].convergence["stopped"] and st[1].n_texts < 150
    hp = _hp(rome.MEMITHparams, [1, 2], v_num_grad_steps=3)
    targets = memit.compute_targets(lm, memit.check_batch(lm, reqs, hp), hp, context_templates(lm, hp))
    with rome.memit_edit(lm, reqs, hp, stats=st) as plain:
        a = [(s.left.clone(), s.right.clone()) for s in plain.steps]
    with rome.batch_edit(lm, reqs, hp, stats=st, targets=targets) as shared:
        b = [(s.left.clone(), s.right.clone()) for s in shared.steps]
    for (la, ra), (lb, rb) in zip(a, b):
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(rb, ra, rtol=1e-5, atol=1e-7)
    with pytest.raises(InputError, match="targets are for 3 requests"):
        rome.batch_edit(lm, reqs[:2], hp, stats=st, targets=targets)


def test_cli_stats_until_converged_equals_the_api(tmp_path):
    import json

    from kncore.rundir import RunDir
    seed = _seed()
    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n".join(_texts(150, _seed())) + "\n")
    facts = [{"prompt": f"the capital of {s} is", "subject": s, "target_new": "rome", "ground_truth": "paris"}
             for s in random.Random(seed).sample(WORDS, 3)]
    (tmp_path / "facts.json").write_text(json.dumps(facts))
    assert main(["stats", "--model", f"tiny-llama:{seed}", "--data", str(corpus), "--layers", "0,2",
                 "--n-samples", "150", "--stats-dtype", "float64", "--probes", str(tmp_path / "facts.json"),
                 "--n-probes", "2", "--check-every", "150", "--until", "converged", "--tol", "0.3",
                 "--stats-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    lm = tiny_lm("llama", seed=seed)
    keys = rome.probe_keys_for(lm, facts[:2], [0, 2])
    want = rome.layer_stats(lm, [0, 2], str(corpus), n_samples=150, dtype="float64", probe_keys=keys,
                            check_every=150, until="converged", tol=0.3, use_cache=False, progress=False)
    rows = RunDir.load(tmp_path / "run").read("stats").to_pylist()
    assert [r["layer"] for r in rows] == [0, 2]
    for r in rows:
        got, w = rome.load_stats(r["file"]), want[r["layer"]]
        assert torch.equal(got.second_moment, w.second_moment) and got.n_texts == w.n_texts
        assert got.convergence["history"] == w.convergence["history"]
        assert r["converged"] == w.convergence["stopped"] and r["probe_change"] == w.convergence["change_at_stop"]
