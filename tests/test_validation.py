"""Arguments are validated before any side effect, in one place (kncore.validation).

The battery runs every CLI command in-process with bad arguments and asserts:
exit code 2, one line on stderr naming the argument, no run directory created,
and an existing one left byte for byte as it was. Then the API entry points
refuse the same values with the same ranges, and a corpus trace records the
items that fail on their own data."""
from __future__ import annotations

import inspect
import json

import pytest
import torch

from kncore import InputError, validation as V
from kncore.cli import TRACE_KINDS, build_parser, main
from kncore.testing import tiny_lm


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _snapshot(d):
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def _one_err_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


P = ["--prompt", "the dog is", "--target", " red"]
T = ["--prompt", "the dog is", "--subject", "the dog"]
E = ["--prompt", "the dog is", "--subject", "the dog", "--target-new", " red"]
TINY = ["--model", "tiny-llama"]

# (command line after the command's name, what the error line must name)
BAD = [
    ("attribute", [*P, "--steps", "0"], "--steps"),
    ("attribute", [*P, "--steps", "two"], "--steps"),
    ("attribute", [*P, "--limit", "0"], "--limit"),
    ("attribute", [*P, "--limit=-1"], "--limit"),
    ("attribute", [*P, "--batch-size", "0"], "--batch-size"),
    ("attribute", [*P, "--adaptive-threshold", "-1"], "--adaptive-threshold"),
    ("attribute", [*P, "--adaptive-threshold", "nan"], "--adaptive-threshold"),
    ("attribute", [*P, "--chunk", "0"], "--chunk"),
    ("attribute", [*P, "--seed", "-1"], "--seed"),
    ("attribute", [*P, "--max-tensor-gb", "0"], "--max-tensor-gb"),
    ("attribute", [*P, "--scheme", "simpson"], "--scheme"),
    ("attribute", ["--prompt", "", "--target", " red"], "--prompt"),
    ("attribute", ["--prompt", "the dog is", "--target", " "], "--target"),
    ("localise", ["--limit", "0"], "--limit"),
    ("localise", ["--p", "1.5"], "--p"),
    ("localise", ["--enhance-factor", "-2"], "--enhance-factor"),
    ("trace", [*T, "--kinds", "foo"], "--kinds"),
    ("trace", [*T, "--kinds", ""], "--kinds"),
    ("trace", [*T, "--samples", "0"], "--samples"),
    ("trace", [*T, "--window", "0"], "--window"),
    ("trace", [*T, "--noise", "-0.1"], "--noise"),
    ("trace", [*T, "--noise", "loud"], "--noise"),
    ("trace", [*T, "--trace-seed", "-1"], "--trace-seed"),
    ("trace", [*T, "--max-tokens", "0"], "--max-tokens"),
    ("trace", [*T, "--limit", "0"], "--limit"),
    ("trace", ["--prompt", "the dog is", "--subject", "a cat"], "--subject"),
    ("trace", ["--prompt", "the dog is", "--subject", "a cat", "--noise", "0.1"], "--subject"),
    ("trace", ["--prompt", "", "--subject", "dog"], "--prompt"),
    ("stats", ["--layers", "0", "--n-samples", "0"], "--n-samples"),
    ("stats", ["--layers", "0", "--batch-tokens", "0"], "--batch-tokens"),
    ("stats", [], "--layers"),
    ("edit", [*E, "--edit-layer", "-1"], "--edit-layer"),
    ("edit", [*E, "--limit=-1"], "--limit"),
    ("edit", ["--prompt", "the dog is", "--subject", "the dog", "--target-new", ""], "--target-new"),
    ("eval", [*E, "--method", "guess"], "--method"),
    ("report", ["somewhere", "--max-rows", "0"], "--max-rows"),
    ("bench", ["no_such_bench"], "no_such_bench"),
    ("info", ["--bogus"], "--bogus"),
    ("demo", ["--bogus"], "--bogus"),
]


@pytest.mark.parametrize("cmd,argv,names", BAD, ids=[f"{c}:{' '.join(a[-2:])}" for c, a, _ in BAD])
def test_bad_arguments_are_refused_before_any_side_effect(cmd, argv, names, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is runs/<command>, relative to here
    out = ["--out", str(tmp_path / "run")] if cmd not in ("report", "bench", "info", "demo") else []
    assert main([cmd, *TINY, *argv, *out] if out else [cmd, *argv]) == 2
    line = _one_err_line(capsys)
    assert names in line and "error" in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
    # an existing run directory is left as it was
    if out:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "notes.txt").write_text("mine")
        before = _snapshot(tmp_path / "run")
        assert main([cmd, *TINY, *argv, *out]) == 2
        _one_err_line(capsys)
        assert _snapshot(tmp_path / "run") == before


def test_top_level_debug_works_like_the_commands(tmp_path, capsys):
    argv = ["attribute", "--model", "tiny-nope", *P, "--out", str(tmp_path / "a")]
    assert main(argv) == 2
    assert "unknown tiny model" in _one_err_line(capsys)
    for form in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(InputError, match="unknown tiny model"):
            main(form)
    assert not (tmp_path / "a").exists()


def test_a_rejected_command_does_not_block_the_corrected_one(tmp_path, capsys, monkeypatch):
    """A failure after the run directory was opened (a bad corpus line, read by
    layer_stats) removes it; the corrected command then runs, with the default --out."""
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "texts.jsonl"
    corpus.write_text('{"text": "the dog is red"}\n{"text": broken\n')
    argv = ["stats", *TINY, "--layers", "0", "--n-samples", "2", "--stats-cache", str(tmp_path / "cache"),
            "--no-progress"]
    assert main([*argv, "--data", str(corpus)]) == 2
    assert "texts.jsonl:2: not JSON" in _one_err_line(capsys)
    assert not (tmp_path / "runs").exists()
    corpus.write_text('{"text": "the dog is red"}\n{"text": "a cat is blue"}\n')
    assert main([*argv, "--data", str(corpus)]) == 0
    assert (tmp_path / "runs" / "stats" / "manifest.json").exists()
    # an existing, finished run directory: a different config is refused and leaves it unchanged
    before = _snapshot(tmp_path / "runs" / "stats")
    assert main([*argv, "--data", str(corpus), "--seed", "3"]) == 2
    assert "different config" in _one_err_line(capsys)
    assert _snapshot(tmp_path / "runs" / "stats") == before


def test_jsonl_errors_name_the_line_and_hparams_errors_the_file(tmp_path, capsys):
    data = tmp_path / "recs.jsonl"
    data.write_text('{"prompt": "the dog is", "target": " red"}\n{"prompt": "a cat\n')
    assert main(["attribute", *TINY, "--data", str(data), "--out", str(tmp_path / "a")]) == 2
    line = _one_err_line(capsys)
    assert f"{data}, line 2" in line, line
    hp = tmp_path / "hp.yaml"
    hp.write_text("layers: [0\nv_lr: 0.5\n")
    assert main(["edit", *TINY, *E, "--hparams", str(hp), "--out", str(tmp_path / "e")]) == 2
    line = _one_err_line(capsys)
    assert str(hp) in line and "YAML" in line, line
    assert not (tmp_path / "a").exists() and not (tmp_path / "e").exists()


def test_trace_records_failures_and_fails_when_nothing_traced(tmp_path, capsys):
    data = tmp_path / "facts.jsonl"
    common = ["trace", *TINY, "--kinds", "hidden", "--samples", "2", "--window", "1", "--target-mode", "top1",
              "--no-progress"]
    data.write_text(json.dumps({"prompt": "the dog is", "subject": "a cat"}) + "\n")
    assert main([*common, "--data", str(data), "--out", str(tmp_path / "t1")]) == 2
    assert "no record could be traced" in _one_err_line(capsys)
    man = json.loads((tmp_path / "t1" / "manifest.json").read_text())
    assert man["summary"]["errors"] == 1 and man["summary"]["traced"] == 0
    data.write_text(json.dumps({"prompt": "the dog is", "subject": "a cat"}) + "\n"
                    + json.dumps({"prompt": "the dog is", "subject": "dog"}) + "\n")
    assert main([*common, "--data", str(data), "--noise", "0.1", "--out", str(tmp_path / "t2")]) == 0
    assert "1 of 2 records failed" in capsys.readouterr().err
    man = json.loads((tmp_path / "t2" / "manifest.json").read_text())
    assert man["summary"]["errors"] == 1 and man["summary"]["traced"] == 1
    # an inline one-token subject with the default noise: measured over the whole embedding, as the API does
    assert main([*common, "--prompt", "the dog is", "--subject", "dog", "--out", str(tmp_path / "t3")]) == 0


# -- the API: the same ranges, and the CLI's defaults are the API's ---------------------------------
def test_api_entry_points_refuse_out_of_range_values(tmp_path):
    import kncore
    from kncore.rome import layer_stats

    lm = tiny_lm("llama", seed=0)
    for kw, name in (({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"), ({"steps": 2.5}, "steps")):
        with pytest.raises(InputError, match=name):
            kncore.attribute(lm, "the dog is", " red", progress=False, **kw)
    with pytest.raises(InputError, match="empty prompt 0"):
        kncore.attribute(lm, "", " red", progress=False)
    att = kncore.attribute(lm, "the dog is", " red", steps=2, layers=[0], progress=False)
    with pytest.raises(InputError, match="adaptive_threshold"):
        kncore.select_coarse(att, adaptive_threshold=-1)
    with pytest.raises(InputError, match=r"neuron \(5.5, 3\): layer must be an integer"):
        kncore.patch_neurons(lm, [(5.5, 3)])
    with pytest.raises(InputError, match="factor"):
        kncore.patch_neurons(lm, [(0, 3)], mode="enhance", factor=float("inf"))
    for kw, name in (({"samples": 0}, "samples"), ({"window": 0}, "window"), ({"kinds": ["foo"]}, "kinds"),
                     ({"noise": -1.0}, "noise"), ({"max_tokens": 0}, "max_tokens")):
        with pytest.raises(InputError, match=name):
            kncore.trace(lm, "the dog is", "dog", **kw)
    with pytest.raises(InputError, match="not in the prompt"):
        kncore.trace(lm, "the dog is", "cat")
    with pytest.raises(InputError, match="empty prompt"):
        kncore.trace(lm, "", "cat")
    with pytest.raises(InputError, match="n_samples"):
        layer_stats(lm, 0, ["a b c"], n_samples=0, use_cache=False, progress=False)
    # a corpus smaller than n_samples: all of it, named for what it holds
    st = layer_stats(lm, 0, ["the dog is red", "a cat is blue", "big city"], n_samples=50,
                     cache_dir=tmp_path, progress=False)[0]
    assert st.n_texts == 3 and "-n3-" in st.path.name and st.meta["n_samples"] == 3


def test_cli_defaults_are_the_apis():
    from kncore import attribution, interventions, tracing
    from kncore.rome import stats

    args = {c: vars(build_parser().parse_args([c])) for c in ("attribute", "trace", "stats", "localise")}
    sig = {f.__name__: inspect.signature(f).parameters for f in
           (attribution.attribute, tracing.trace, stats.layer_stats, interventions.patch_neurons)}
    a, t, s = args["attribute"], args["trace"], args["stats"]
    for k in ("steps", "scheme", "site", "multi_token"):
        assert a[k] == sig["attribute"][k].default, k
    assert t["samples"] == sig["trace"]["samples"].default and t["window"] == sig["trace"]["window"].default
    assert t["trace_seed"] == sig["trace"]["seed"].default and t["noise"] == sig["trace"]["noise"].default
    assert tuple(t["kinds"].split(",")) == tuple(sig["trace"]["kinds"].default) == tuple(tracing.KINDS) == TRACE_KINDS
    assert s["n_samples"] == sig["layer_stats"]["n_samples"].default
    assert s["batch_tokens"] == sig["layer_stats"]["batch_tokens"].default
    assert args["localise"]["enhance_factor"] == sig["patch_neurons"]["factor"].default


def test_every_numeric_option_has_a_declared_range():
    """No numeric option is parsed by a bare int/float: each goes through kncore.validation."""
    import argparse
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in subs.choices.items():
        for act in sp._actions:
            assert act.type not in (int, float), f"kncore {name} {act.option_strings}: no declared range"
    assert V.check("limit", None) is None and V.check("batch_size", "auto") == "auto"
    for name, bad in (("limit", 0), ("limit", -1), ("steps", True), ("adaptive_threshold", 1.5),
                      ("max_tensor_gb", 0.0), ("noise", float("nan"))):
        with pytest.raises(InputError, match=name):
            V.check(name, bad)
