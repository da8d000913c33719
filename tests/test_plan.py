"""The planner (kncore.plan) against the real run: FLOPs within 5% of torch's
FlopCounterMode, peak memory within 20% of the allocations measured by
torch's profiler, batch_size="auto" under a simulated memory budget, the
shipped configs and the `kncore plan` command."""
from __future__ import annotations

import json

import pytest
import torch

import kncore.planner as P
from kncore import InputError
from kncore import attribution as A
from kncore.testing import PLAN_EDIT_HPARAMS, PLAN_EDIT_REQUEST, STATS_TEXTS, measure_run, tiny_lm
from kncore.tracing import trace


def _check(pl, fn):
    flops, peak = measure_run(fn)
    _close(pl.flops, flops, 0.05)
    _close(pl.peak_bytes - pl.weights_bytes, peak, 0.20)


def _close(pred, real, tol):
    assert real > 0
    assert abs(pred - real) <= tol * real, f"planned {pred:.4g}, measured {real:.4g} ({pred / real - 1:+.1%})"


PROMPTS = {"decoder": (["the capital of canada is", "dog cat apple apples"], ["ottawa", "dogs"], "capital of canada"),
           "bert": (["the capital of canada is [MASK] .", "dog [MASK] apple"], ["ottawa", "dogs"], "capital of")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama", "bert"])
def test_tiny_attribute_flops_and_memory(arch, dtype):
    # bf16 decoders run IG's base pass and end rows in fp32, one block's
    # weights upcast at a time: the plan must hold those copies as long as the
    # run does (it under-counted them by 34-40% until attribution._weights_in
    # kept its converted tensors referenced).
    lm = tiny_lm(arch, d_model=40, d_ff=123, n_layers=3, dtype=dtype)
    prompts, targets, _ = PROMPTS["bert" if arch == "bert" else "decoder"]
    lengths = [len(lm.tokenize(p)) for p in prompts]
    run = lambda: A.attribute(lm, prompts, targets, steps=5, layers=[2, 0], batch_size=2, progress=False)
    pl = P.plan_attribute(P.meta_lm(lm), lengths=lengths, steps=5, layers=[2, 0], batch_size=2)
    assert pl.params["batch"] == 2
    _check(pl, run)


@pytest.mark.parametrize("arch", ["gptj", "bert"])
def test_tiny_trace_flops_and_memory(arch):
    lm = tiny_lm(arch, d_model=40, d_ff=123, n_layers=3)
    prompts, _, subject = PROMPTS["bert" if arch == "bert" else "decoder"]
    prompt = prompts[0]
    b, e = lm.subject_span(prompt, subject)
    run = lambda: trace(lm, prompt, subject, samples=3, window=2)
    pl = P.plan_trace(P.meta_lm(lm), tokens=len(lm.tokenize(prompt)), subject=(b, e), samples=3, window=2)
    _check(pl, run)


def test_smollm2_attribute_and_trace(smollm):
    lm = smollm
    ml = P.meta_lm(lm)
    assert P._weights_bytes(ml) >= sum(p.numel() * 4 for p in lm.model.parameters())
    prompt, target = "The capital of Canada is", " Ottawa"
    n = len(lm.tokenize(prompt))
    run = lambda: A.attribute(lm, prompt, target, steps=3, layers=[4, 20], batch_size=1, progress=False)
    pl = P.plan_attribute(ml, tokens=n, steps=3, layers=[4, 20], batch_size=1)
    _check(pl, run)
    prompt, subject = "The capital of Canada", "Canada"  # one restored token: one walk
    b, e = lm.subject_span(prompt, subject)
    run = lambda: trace(lm, prompt, subject, kinds=("hidden",), samples=2, window=4)
    pl = P.plan_trace(ml, tokens=len(lm.tokenize(prompt)), subject=(b, e), kinds=("hidden",), samples=2, window=4)
    _check(pl, run)


@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_tiny_stats_flops_and_memory(arch):
    # texts of many lengths: the plan batches them by the run's own schedule,
    # and counts the covariance op over the real (unpadded) tokens
    from kncore import rome
    from kncore.rome.stats import _encode
    lm = tiny_lm(arch, d_model=40, d_ff=123, n_layers=3)
    lengths = [len(ids) for ids in _encode(lm, STATS_TEXTS, 2048)]
    run = lambda: rome.layer_stats(lm, [0, 2], STATS_TEXTS, n_samples=None, use_cache=False, progress=False,
                                   batch_tokens=64, chunk_texts=7)
    pl = P.plan_stats(P.meta_lm(lm), layers=[2, 0], lengths=lengths, batch_tokens=64, chunk_texts=7)
    run()  # the covariance op's packing workspace is kept between calls (per thread): not this job's memory
    assert pl.params["tokens"] == sum(lengths) and pl.params["texts"] == len(STATS_TEXTS)
    assert pl.params["batches"] > len(STATS_TEXTS) // 7  # several batches per chunk
    _check(pl, run)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_tiny_edit_flops_and_memory(arch):
    # the plan runs ROME's own compute_keys, v_prepare and v_loss on the meta
    # device, over the request's rows or rows built from its lengths alone
    from kncore import rome
    from kncore.rome.editing import build_rows, parse_request
    lm = tiny_lm(arch, d_model=40, d_ff=123, n_layers=3)
    hp = rome.ROMEHparams(layers=[1], **PLAN_EDIT_HPARAMS)
    req = PLAN_EDIT_REQUEST
    rows = build_rows(lm, parse_request(req), ["{}"], hp.fact_token, hp.kl_prompts)
    n, se = rows.prompt_len[0], rows.lookup[0] + 1
    from_rows = P.plan_edit(P.meta_lm(lm), tokens=n, subject_end=se, target_tokens=len(rows.target), hparams=hp,
                            rows=rows)
    from_lengths = P.plan_edit(P.meta_lm(lm), tokens=n, subject_end=se, target_tokens=len(rows.target), hparams=hp)
    assert from_lengths.flops == from_rows.flops and from_lengths.peak_bytes == from_rows.peak_bytes
    edits = []
    _check(from_rows, lambda: edits.append(rome.edit(lm, req, hp)))
    edits[0].undo()


def test_auto_batch_stays_under_a_simulated_budget(monkeypatch):
    lm = tiny_lm("llama", d_model=40, d_ff=123, n_layers=3)
    prompts = ["the capital of canada is"] * 12
    per = P.attribute_chunk_memory(lm, len(lm.tokenize(prompts[0])), [0, 1, 2], 20, "act")[1]
    budget = int(3.5 * per)  # room for 3 items
    frac = A.AUTO_MEMORY_FRACTION["cpu"]
    monkeypatch.setattr(A, "_free_bytes", lambda device: int(budget / frac))
    seen = []
    orig = A._ig_chunk
    monkeypatch.setattr(A, "_ig_chunk", lambda lm_, items, *a: seen.append(len(items)) or orig(lm_, items, *a))
    peak = measure_run(lambda: A.attribute(lm, prompts, "ottawa", batch_size="auto", progress=False))[1]
    assert seen == [3, 3, 3, 3]
    assert peak <= budget * 1.2  # the plan's 20% tolerance


def test_auto_batch_for_7b_cards():
    ml = P.meta_lm("llama-2-7b", "bfloat16")
    layers = list(range(ml.n_layers))
    per = P.attribute_chunk_memory(ml, 12, layers, 20, "act")[1]
    for gb in (24, 80):
        budget = int((gb * 1e9 - P._weights_bytes(ml)) * A.AUTO_MEMORY_FRACTION["cuda"])
        k = A.chunk_size(ml, [12] * 64, layers, 20, "act", "auto", budget_bytes=budget, device_type="cuda")
        assert 1 <= k < 64 and k * per <= budget < (k + 1) * per
        if gb == 24:  # the whole planned chunk (not only the per-item figure) fits
            pl = P.plan_attribute(ml, prompts=k, tokens=12, steps=20, layers=layers, memory_bytes=budget)
            assert pl.params["batch"] == k and pl.peak_bytes - pl.weights_bytes <= budget


def test_shipped_configs():
    # parameter counts of the published models (embeddings and head included)
    want = {"gpt2-xl": 1.56e9, "gpt-j-6b": 6.05e9, "llama-2-7b": 6.74e9, "llama-2-13b": 13.0e9,
            "mistral-7b": 7.24e9, "llama-3-8b": 8.03e9}
    assert set(want) == set(P.SHIPPED)
    for name, n in want.items():
        ml = P.meta_lm(name, "float32")
        _close(P._weights_bytes(ml) / 4, n, 0.01)
    assert P.meta_lm("meta-llama/Llama-2-7b-hf").n_layers == 32
    assert P.meta_lm("mistral-7b").adapter.n_kv_heads == 8


def test_bad_inputs(tmp_path):
    import kncore
    assert kncore.plan is P.plan
    with pytest.raises(InputError, match="no model config"):
        P.meta_lm("no-such-model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(InputError, match="unsupported architecture"):
        P.meta_lm(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        P.meta_lm(tmp_path)
    lm = tiny_lm("gpt2")
    with pytest.raises(InputError, match="subject tokens"):
        P.plan_trace(P.meta_lm(lm), tokens=4, subject=(2, 6))
    with pytest.raises(InputError, match="tokens"):
        P.plan_attribute(P.meta_lm(lm), tokens=0)
    with pytest.raises(InputError, match="unknown job"):
        P.plan(lm, jobs=["nope"])
    for bad in (["12", "x"], [3, 0], [], [2.5], 7):  # strings, zero, empty, fractions, not a list
        with pytest.raises(InputError, match="positive integer token counts"):
            P.plan_stats(P.meta_lm(lm), layers=[0], lengths=bad)


def test_plan_cli_and_all_jobs(tmp_path, capsys):
    from kncore.cli import main
    lm = tiny_lm("llama", d_model=40, d_ff=123, n_layers=3)
    lm.model.config.save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path), "--tokens", "6", "--subject", "1:3", "--texts", "50",
                 "--text-tokens", "32", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [j["job"] for j in d["jobs"]] == ["attribute", "trace", "stats", "edit"]
    for j in d["jobs"]:
        assert j["flops"] > 0 and j["peak_bytes"] > d["weights_bytes"]
    assert set(d["seconds"]) == set(P.GPUS) and set(d["auto_batch"]) == set(P.GPUS)
    st = d["jobs"][2]
    assert st["params"]["tokens"] == 50 * 32
    assert main(["plan", str(tmp_path), "--jobs", "trace", "--tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "not measured on GPU" in out and "H100" in out
    assert main(["plan", "no-such-model"]) == 2


def test_profile_flag(tmp_path, capsys):
    from kncore.cli import main
    assert main(["attribute", "--model", "tiny-llama", "--prompt", "the capital of canada is", "--target", "ottawa",
                 "--steps", "3", "--layers", "0,2", "--out", str(tmp_path / "run"), "--profile", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "matmul peak" in err
    rows = {ln[:45].strip(): ln.split() for ln in err.splitlines() if ln.startswith("attribute:")}
    assert set(rows) == {"attribute: base pass", "attribute: step rows, backward, reduction"}
    for r in rows.values():
        assert int(r[-5]) == 1 and float(r[-3]) > 0  # one call each, FLOPs counted


def test_profile_plans_the_statistics(tmp_path, capsys):
    # the stats stage gets a plan: the texts the run read, batched as it batched them
    from kncore.cli import main
    assert main(["stats", "--model", "tiny-llama", "--layers", "0,1", "--n-samples", "12", "--out",
                 str(tmp_path / "run"), "--stats-cache", str(tmp_path / "cache"), "--profile", "--no-progress"]) == 0
    err = capsys.readouterr().err
    row = next(ln for ln in err.splitlines() if ln.startswith("stats: layer statistics"))
    planned, share = row[45:].split()[:2]
    assert float(planned) > 0 and abs(float(share.rstrip("%")) - 100) <= 5, row
