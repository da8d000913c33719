"""Every file kncore writes and reads back is checked before it is trusted.

The battery damages each kind of file (truncated to half, one byte flipped,
deleted) and asserts that the next run detects it, names the file, and
recovers to the same results as a clean run. Also: the statistics cache is
addressed by content (a model, tokenizer or corpus loaded from another path
finds the same file; a changed one does not), and run_items commits by time
as well as by count.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import kncore
from kncore import rome
from kncore.atomic import CorruptFile, atomic_write_text, dumps_checked, loads_checked, sidecar_path
from kncore.cli import main
from kncore.rundir import RunDir, run_items
from kncore.testing import tiny_lm
from kncore.tracing import corpus as corpus_mod

HOW = ("truncate", "flip", "delete")


pytestmark = pytest.mark.usefixtures("one_thread")


def _seed():
    return int(torch.randint(0, 1 << 30, ()))


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        path.unlink()


def _warned(caplog, path: Path) -> bool:
    return any(path.name in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# -- the JSON records -----------------------------------------------------------------------
def test_checked_json_detects_any_change():
    obj = {"a": [1, 2.5, "x"], "b": {"c": None}}
    text = dumps_checked(obj, indent=1)
    assert loads_checked("f", text) == obj
    rng = np.random.default_rng(_seed())
    raw = text.encode()
    for i in rng.choice(len(raw), size=40, replace=False):
        bad = bytearray(raw)
        bad[i] ^= 1 << int(rng.integers(8))
        try:
            got = loads_checked("f", bytes(bad))
        except CorruptFile as e:
            assert str(e).startswith("f: ")
            continue
        assert got == obj, f"a flip at byte {i} changed the record undetected"
    with pytest.raises(CorruptFile, match="no checksum"):
        loads_checked("f", json.dumps(obj))
    assert loads_checked("f", json.dumps(obj), required=False) == obj


# -- run directories (a real command) -------------------------------------------------------------
@pytest.fixture(scope="module")
def attribute_run(tmp_path_factory):
    """A clean `kncore attribute` run (one commit per item, dense tensors saved)."""
    tmp = tmp_path_factory.mktemp("attr")
    words = "the capital of canada is france paris italy rome city country big small red blue".split()
    rng = np.random.default_rng(_seed())
    recs = [{"prompt": " ".join(rng.choice(words, int(rng.integers(2, 6)))),
             "target": str(rng.choice(["ottawa", "paris", "rome"]))} for _ in range(4)]
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = ["attribute", "--model", f"tiny-gpt2:{int(rng.integers(100))}", "--data", str(data), "--steps", "3",
            "--chunk", "1", "--save-dense", "--batch-size", "4", "--no-progress"]
    clean = tmp / "clean"
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, which a module fixture runs before
    try:
        assert main([*args, "--out", str(clean)]) == 0
    finally:
        torch.set_num_threads(n)
    return args, clean


def _tables(path: Path) -> dict:
    rd = RunDir.load(path)
    out = {t: rd.read(t) for t in ("attribution", "kn")}
    out["scores"] = rd.load_tensors("scores")
    return out


def _same(a: dict, b: dict) -> None:
    for t in ("attribution", "kn"):
        assert a[t].num_rows > 0 and a[t].equals(b[t]), t
    assert set(a["scores"]) == set(b["scores"])
    assert all(torch.equal(a["scores"][k], b["scores"][k]) for k in a["scores"])


def _pick(run: Path, kind: str) -> Path:
    """The second commit's file of one kind (the manifest for "manifest")."""
    if kind == "manifest":
        return run / "manifest.json"
    stem = sorted((run / "commits").glob("r*.json"))[1].stem
    return {"commit": run / "commits" / f"{stem}.json",
            "part": run / "tables" / "attribution" / f"part-{stem}.parquet",
            "tensor": run / "tensors" / f"scores.{stem}.safetensors"}[kind]


@pytest.mark.parametrize("kind", ["part", "commit", "tensor", "manifest"])
def test_damaged_run_file_is_named_and_recomputed(attribute_run, tmp_path, caplog, kind):
    args, clean = attribute_run
    want = _tables(clean)
    for how in HOW:
        run = tmp_path / how
        shutil.copytree(clean, run)
        victim = _pick(run, kind)
        _damage(victim, how)
        if kind != "manifest":
            # a report (read-only) refuses the damaged directory, naming the file
            with pytest.raises(kncore.InputError, match=victim.name):
                _tables(run)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kncore"):
            assert main([*args, "--out", str(run)]) == 0
        assert _warned(caplog, victim), (kind, how, [r.getMessage() for r in caplog.records])
        _same(_tables(run), want)
        if kind != "manifest":
            assert list((run / "corrupt").rglob(victim.name)) or how == "delete", "the damaged file is kept aside"


def test_damaged_manifest_of_another_config_is_refused(attribute_run, tmp_path):
    args, clean = attribute_run
    run = tmp_path / "r"
    shutil.copytree(clean, run)
    _damage(run / "manifest.json", "flip")
    other = [*args]
    other[other.index("--steps") + 1] = "4"
    with pytest.raises(kncore.InputError, match="manifest.json.*another config"):
        RunDir.open(run, {"x": 1}, command="attribute")
    assert main([*other, "--out", str(run)]) == 2
    assert (run / "manifest.json").exists(), "nothing was set aside or rewritten"


def test_saved_tensors_are_checked(tmp_path):
    rd = RunDir.open(tmp_path / "r", {"a": 1})
    rd.save_tensors("w", {"x": torch.randn(7, 3)})
    path = tmp_path / "r" / "tensors" / "w.safetensors"
    assert sidecar_path(path).exists()
    assert torch.equal(rd.load_tensors("w")["x"], RunDir.load(tmp_path / "r").load_tensors("w")["x"])
    _damage(path, "flip")
    with pytest.raises(CorruptFile, match="w.safetensors: checksum mismatch"):
        rd.load_tensors("w")
    rd.close()


# -- commit by time ---------------------------------------------------------------------------
def test_run_items_commits_by_time_as_well_as_count(tmp_path):
    """Items that take 4 s each under commit_seconds=10: the first item alone
    (timed), then cells of 2 on a fixed grid over the items, so a kill loses
    at most ~10 s; a resumed run reuses the recorded size and grid, whatever
    its own timing, so it batches exactly as the uninterrupted run."""
    now, sizes = [0.0], []

    def work_costing(seconds, fail_at=None):
        def work(chunk):
            if fail_at is not None and len(sizes) == fail_at:
                raise KeyboardInterrupt
            sizes.append([k for k, _ in chunk])
            now[0] += seconds * len(chunk)
            return {"t": [{"key": k, "v": v} for k, v in chunk]}
        return work

    items = [(f"{i:03d}", (f"{i:03d}", i)) for i in range(9)]
    kw = dict(table="t", chunk=8, commit_seconds=10, clock=lambda: now[0])
    rd = RunDir.open(tmp_path / "r", {})
    assert run_items(rd, items, work_costing(4.0), **kw) == 9
    whole = list(sizes)
    assert [len(b) for b in whole] == [1, 1, 2, 2, 2, 1]
    assert len(list((tmp_path / "r" / "commits").glob("*.json"))) == 6 and rd.block_size("t") == 2
    sizes.clear()
    rd2 = RunDir.open(tmp_path / "r2", {})
    with pytest.raises(KeyboardInterrupt):
        run_items(rd2, items, work_costing(4.0, fail_at=3), **kw)
    assert run_items(rd2, items, work_costing(0.01), **kw) == 5  # fast now: the grid is kept
    assert sizes == whole
    assert [r["v"] for r in rd2.read("t").to_pylist()] == list(range(9))
    # fast items: blocks grow to chunk, not beyond
    sizes.clear()
    rd3 = RunDir.open(tmp_path / "r3", {})
    assert run_items(rd3, items, work_costing(0.01), **{**kw, "chunk": 3}) == 9
    assert [len(b) for b in sizes] == [1, 2, 3, 3]
    with pytest.raises(kncore.InputError, match="commit_seconds"):
        run_items(rd3, items, work_costing(1), table="t", commit_seconds=0)


# -- layer statistics: the cache file and the checkpoint ----------------------------------------------
def _texts(n, seed):
    rng = np.random.default_rng(seed)
    words = "the capital of canada is france paris italy rome city country big small red blue".split()
    return [" ".join(rng.choice(words, int(rng.integers(3, 30)))) for _ in range(n)]


def test_damaged_stats_cache_is_named_and_rebuilt(tmp_path, caplog):
    lm = tiny_lm("llama", seed=_seed() % 1000)
    texts = _texts(20, _seed())
    calls = []
    kw = dict(n_samples=None, cache_dir=tmp_path, dtype="float32", progress=calls.append)
    want = rome.layer_stats(lm, [1], texts, **kw)[1]
    path = want.path
    for victim, how in [(path, h) for h in HOW] + [(sidecar_path(path), "flip"), (sidecar_path(path), "delete")]:
        _damage(victim, how)
        with pytest.raises(kncore.InputError, match=path.name):
            rome.load_stats(path)
        calls.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kncore"):
            got = rome.layer_stats(lm, [1], texts, **kw)[1]
        assert calls, "recomputed"
        assert _warned(caplog, path), (victim.name, how)
        assert got.path == path and torch.equal(got.second_moment, want.second_moment)
        assert torch.equal(rome.load_stats(path).second_moment, want.second_moment)
        for p in tmp_path.rglob("*.corrupt-*"):
            p.unlink()


def test_damaged_stats_checkpoint_restarts_from_the_first_text(tmp_path, caplog):
    lm = tiny_lm("gpt2", seed=_seed() % 1000)
    texts = _texts(30, _seed())
    kw = dict(n_samples=None, dtype="float32", batch_tokens=48, chunk_texts=8, checkpoint_every=2)
    want = rome.layer_stats(lm, [1], texts, use_cache=False, progress=False, **kw)[1]
    for how in ("truncate", "flip"):
        cache = tmp_path / how
        seen = []

        def stop(info):
            seen.append(info)
            if len(seen) == 5:
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            rome.layer_stats(lm, [1], texts, cache_dir=cache, progress=stop, **kw)
        (ckpt,) = cache.rglob("partial-*.safetensors")
        _damage(ckpt, how)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kncore"):
            got = rome.layer_stats(lm, [1], texts, cache_dir=cache, progress=False, **kw)[1]
        assert _warned(caplog, ckpt)
        assert torch.equal(got.second_moment, want.second_moment) and got.n_tokens == want.n_tokens


# -- causal-tracing records ---------------------------------------------------------------------
def test_damaged_trace_record_is_named_and_traced_again(tmp_path, caplog):
    lm = tiny_lm("gpt2", seed=_seed() % 1000)
    words = "the capital of canada is france paris italy rome".split()
    recs = []
    for i in range(3):
        prompt = " ".join(words[i:i + 5])
        recs.append({"known_id": i, "subject": words[i + 1], "prompt": prompt,
                     "attribute": lm.top_k(prompt, 1)[0][0].strip()})
    kw = dict(kinds=("hidden",), samples=2, window=1, noise=0.1, progress=False)
    corpus_mod.trace_corpus(lm, recs, tmp_path / "clean", **kw)

    def files(d):
        return {p.name: p.read_bytes() for p in sorted((d / "records").glob("*.json"))}
    want = files(tmp_path / "clean")
    for how in HOW:
        run = tmp_path / how
        shutil.copytree(tmp_path / "clean", run)
        victim = run / "records" / "1.json"
        _damage(victim, how)
        if how != "delete":
            with pytest.raises(CorruptFile, match="1.json"):
                corpus_mod.load_corpus(run)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kncore"):
            corpus_mod.trace_corpus(lm, recs, run, **kw)
        assert how == "delete" or _warned(caplog, victim)
        assert files(run) == want
    # the same model under another name or path resumes the directory (identity is the fingerprint)
    lm.name = "/another/folder/same-model"
    corpus_mod.trace_corpus(lm, recs, tmp_path / "clean", **kw)
    assert files(tmp_path / "clean") == want
    run = tmp_path / "truncate"
    _damage(run / "config.json", "flip")
    with pytest.raises(CorruptFile, match="config.json"):
        corpus_mod.trace_corpus(lm, recs, run, **kw)


# -- the model cache -----------------------------------------------------------------------------
def test_damaged_model_cache_file_is_named(tmp_path, caplog):
    from kncore.atomic import sha256_file, write_json_checked
    from kncore.loading import cache_ok

    src = {"file": "m.gguf", "size": 123}
    for how in HOW:
        cdir = tmp_path / how
        cdir.mkdir()
        (cdir / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
        (cdir / "config.json").write_text("{}")
        write_json_checked(cdir / "kncore-cache.json", {"format": 1, "source": src, "files": {
            p.name: sha256_file(p) for p in cdir.iterdir()}})
        assert cache_ok(cdir, src)
        _damage(cdir / "model.safetensors", how)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kncore"):
            assert not cache_ok(cdir, src)
        assert _warned(caplog, cdir / "model.safetensors")
    atomic_write_text(cdir / "kncore-cache.json", "{")
    assert not cache_ok(cdir, src)


def test_replace_dir_puts_the_whole_new_folder_in_place(tmp_path):
    """The model cache's folder swap: the new folder's files replace the old
    folder's, the temporary and the old folder are gone."""
    from kncore.atomic import replace_dir

    dest = tmp_path / "cache"
    for n in (1, 2):
        tmp = tmp_path / f".new-{n}"
        tmp.mkdir()
        (tmp / f"file{n}").write_text(str(n))
        replace_dir(tmp, dest)
        assert [p.name for p in dest.iterdir()] == [f"file{n}"] and (dest / f"file{n}").read_text() == str(n)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


# -- the statistics cache is addressed by content --------------------------------------------------
def _save_model(lm, path: Path, *, tweak_tokenizer=False) -> Path:
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    if tweak_tokenizer:  # swap the ids of two ordinary words
        tj = json.loads((path / "tokenizer.json").read_text())
        v = tj["model"]["vocab"]
        a, b = "paris", "rome"
        v[a], v[b] = v[b], v[a]
        (path / "tokenizer.json").write_text(json.dumps(tj))
    return path


def test_stats_cache_identity_is_content_not_path(tmp_path):
    base = tiny_lm("llama", seed=_seed() % 1000)
    a = kncore.load(str(_save_model(base, tmp_path / "a")))
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    b = kncore.load(str(tmp_path / "elsewhere" / "b"))
    assert a.name != b.name and a.fingerprint() == b.fingerprint()
    texts = _texts(15, _seed())
    (tmp_path / "c1.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "c1.txt", tmp_path / "copy" / "corpus.txt")
    calls = []
    kw = dict(n_samples=None, cache_dir=tmp_path / "cache", dtype="float32", progress=calls.append)
    first = rome.layer_stats(a, [1, 2], tmp_path / "c1.txt", **kw)
    assert calls
    calls.clear()
    second = rome.layer_stats(b, [1, 2], tmp_path / "copy" / "corpus.txt", **kw)
    assert not calls, "the same model, tokenizer and corpus from other paths reuse the cache"
    assert second[1].path == first[1].path
    assert torch.equal(second[2].second_moment, first[2].second_moment)
    rome.load_stats(first[1].path, b, 1)  # accepted for the copy too

    # a changed tokenizer, corpus or model is a different request: computed, never mixed up
    t = kncore.load(str(_save_model(base, tmp_path / "t", tweak_tokenizer=True)))
    assert t.fingerprint() == a.fingerprint() and t.tokenizer_fingerprint() != a.tokenizer_fingerprint()
    calls.clear()
    other_tok = rome.layer_stats(t, [1], tmp_path / "c1.txt", **kw)
    assert calls and other_tok[1].path != first[1].path
    with pytest.raises(rome.StatsCacheMismatch, match="tokenizer"):
        rome.load_stats(first[1].path, t, 1)
    (tmp_path / "c2.txt").write_text("\n".join(texts[:-1]) + "\n")
    calls.clear()
    assert rome.layer_stats(a, [1], tmp_path / "c2.txt", **kw)[1].path != first[1].path and calls
    m = tiny_lm("llama", seed=_seed() % 1000 + 1000)
    calls.clear()
    assert rome.layer_stats(m, [1], tmp_path / "c1.txt", **kw)[1].path != first[1].path and calls
    with pytest.raises(rome.StatsCacheMismatch, match="fingerprint"):
        rome.load_stats(first[1].path, m, 1)
