"""``--profile`` (kncore.planner_cli.Profile) and the one walk the planner
shares with the engine: the profile's columns for the attribute, trace and
edit jobs, planned FLOPs (the same calls replayed on the meta device) against
the FLOPs counted on the run, the cached matmul peak, and the meta-device
walk making the same runtime calls as the real run."""
from __future__ import annotations

import json
import re

import pytest

import kncore.planner as P
import kncore.planner_cli as PC
from kncore import attribution as A
from kncore import runtime
from kncore.testing import tiny_lm
from kncore.tracing import trace

COLUMNS = ["planned GFLOP", "of plan", "calls", "seconds", "GFLOP", "GFLOP/s", "of peak"]


def _table(err: str) -> dict:
    """stage name -> (planned GFLOP or None, calls, counted GFLOP) from the profile on stderr."""
    lines = err.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("stage "))
    assert re.split(r"\s{2,}", lines[head].strip()) == ["stage", *COLUMNS]  # every column, in this order
    rows = {}
    for ln in lines[head + 1:]:
        if not ln.strip():
            break
        name, r = ln[:45].strip(), ln[45:].split()
        assert len(r) == len(COLUMNS), ln
        rows[name] = (None if r[0] == "-" else float(r[0]), int(r[2]), float(r[4]))
    return rows


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KNCORE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _run(capsys, *argv) -> dict:
    from kncore.cli import main
    assert main([*argv, "--profile", "--no-progress"]) == 0
    return _table(capsys.readouterr().err)


def _planned_equals_counted(rows, names):
    for n in names:
        planned, calls, counted = rows[n]
        assert calls >= 1 and counted > 0, n
        assert planned is not None and abs(planned - counted) <= 0.05 * counted, (n, planned, counted)


def test_profile_attribute_trace_edit(tmp_path, cache, capsys):
    rows = _run(capsys, "attribute", "--model", "tiny-llama", "--prompt", "the capital of canada is",
                "--target", "ottawa", "--steps", "3", "--layers", "0,2", "--out", str(tmp_path / "a"))
    # batch_size="auto" plans on the meta device inside the run: not counted as the run's
    assert rows["attribute: base pass"][1] == 1 and "IG chunks" not in rows
    _planned_equals_counted(rows, ["attribute: base pass",
                                   "attribute: step rows, backward, reduction", "whole command"])

    rows = _run(capsys, "trace", "--model", "tiny-gptj", "--prompt", "the capital of canada is",
                "--subject", "capital of", "--samples", "3", "--window", "2", "--out", str(tmp_path / "t"))
    _planned_equals_counted(rows, ["trace: one prompt", "trace: walks", "whole command"])

    hp = {"layers": [1], "v_num_grad_steps": 3, "mom2_adjustment": False,
          "context_template_length_params": [[2, 2]], "kl_prompts": ["{} is a"]}
    (tmp_path / "hp.json").write_text(json.dumps(hp))
    rows = _run(capsys, "edit", "--model", "tiny-gpt2", "--prompt", "the capital of canada is", "--subject", "canada",
                "--target-new", "rome", "--target", "ottawa", "--no-extra-probes", "--hparams",
                str(tmp_path / "hp.json"), "--out", str(tmp_path / "e"))
    planned, calls, counted = rows["edit: one request"]
    assert calls == 1 and counted > 0 and planned > 0
    # the plan runs ROME's own compute_keys on the meta device: the keys' stage is planned too
    _planned_equals_counted(rows, ["edit: keys"])
    n = "edit: optimise v"  # the plan takes the loop's pieces (v_prepare, v_loss), not the loop
    assert rows[n][1] == 1 and rows[n][2] > 0 and rows[n][0] is None
    assert rows["whole command"][0] == planned  # the command's plan: its one request's
    assert json.loads((cache / "matmul_peak.json").read_text())


def test_matmul_peak_measured_once(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(PC, "matmul_peak", lambda device: calls.append(device) or 1.5e10)
    assert PC.cached_matmul_peak("cpu") == (1.5e10, False)
    assert PC.cached_matmul_peak("cpu") == (1.5e10, True)
    assert calls == ["cpu"]
    (cache / "matmul_peak.json").write_text("{not json")
    assert PC.cached_matmul_peak("cpu") == (1.5e10, False)  # unreadable: measured again, rewritten
    assert len(json.loads((cache / "matmul_peak.json").read_text())) == 1


def _calls(monkeypatch) -> list:
    """Record every kncore.runtime.run call: (input shape, start, stop, past rows)."""
    seen = []
    orig = runtime.run

    def rec(ad, input_ids=None, **kw):
        x = input_ids if input_ids is not None else kw["hidden"]
        pr = kw.get("past_rows")
        seen.append((tuple(x.shape), kw.get("start_layer", 0), kw.get("stop_layer"),
                     None if pr is None else len(pr), kw.get("past") is not None))
        return orig(ad, input_ids, **kw)
    monkeypatch.setattr(runtime, "run", rec)
    return seen


@pytest.mark.parametrize("arch", ["gptj", "bert"])
def test_meta_walk_is_the_real_schedule(arch, monkeypatch):
    """The planner's trace and attribution chunk on the meta device make the
    same runtime calls, in the same order and shapes, as the real run."""
    lm = tiny_lm(arch, d_model=40, d_ff=123, n_layers=3)
    ml = P.meta_lm(lm)
    bert = arch == "bert"
    prompt, subject = ("the capital of [MASK] .", "capital of") if bert else ("the capital of canada is", "capital of")
    T = len(lm.tokenize(prompt))
    b, e = lm.subject_span(prompt, subject)
    seen = _calls(monkeypatch)
    # max_tokens small enough that the walks are cut into several slices per layer
    trace(lm, prompt, subject, samples=3, window=2, max_tokens=16)
    real = list(seen)
    seen.clear()
    P.trace_run(ml, T, b, e, ("hidden", "mlp", "attn"), 3, 2, 16)
    assert len(real) > 2 * lm.n_layers and seen == real

    prompts = [prompt, "dog cat [MASK]" if bert else "dog cat apple apples"]
    targets = ["ottawa", "dogs"]
    seen.clear()
    A.attribute(lm, prompts, targets, steps=4, layers=[2, 0], scheme="midpoint", batch_size=2, progress=False)
    real = list(seen)
    seen.clear()
    lengths = sorted(len(lm.tokenize(p)) for p in prompts)
    P.attribute_chunk(ml, lengths, [2, 0], "act", "midpoint", 4)
    assert len(real) >= 2 and seen == real
