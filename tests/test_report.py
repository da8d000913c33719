"""Reports: the right sections, figures and tables for what a run directory
holds; the HTML is self-contained and renders with its images in a headless
browser (Debian's chromium, installed here when missing)."""
from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kncore import report
from kncore.cli import main
from kncore.rundir import RunDir
from kncore.testing import tiny_lm

PNG_SIG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine
    spinning OpenMP threads made each tiny matmul ~200x slower (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rng():
    return np.random.default_rng(int(torch.randint(0, 1 << 30, ())))


def _png_size(b: bytes) -> tuple[int, int]:
    assert b[:8] == PNG_SIG
    return int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")


def _make_run(path: Path, rng, *, with_plots_dir=True, config=None) -> RunDir:
    """A run directory holding every table kind the report knows, with random contents."""
    lm = tiny_lm("gpt2", seed=int(rng.integers(1000)))
    rd = RunDir.open(path, {"steps": int(rng.integers(5, 30)), **(config or {})}, lm, command="localise")
    n_layers = lm.n_layers
    kn = [{"key": f"f{k:02d}", "relation": str(rng.choice(["P36", "P101"])), "layer": int(rng.integers(n_layers)),
           "neuron": int(rng.integers(lm.d_ff)), "score": float(rng.random())}
          for k in range(12) for _ in range(int(rng.integers(1, 5)))]
    rd.append("kn", kn)
    eff = []
    for k in range(12):
        for mode, f in (("suppress", 0.4), ("enhance", 1.8)):
            b = float(rng.uniform(0.05, 0.9))
            eff.append({"key": f"f{k:02d}", "relation": "P36", "intervention": mode, "p_before": b,
                        "p_after": b * f * float(rng.uniform(0.9, 1.1))})
    rd.append("effect", eff)
    toks = "the capital of canada is".split()
    tr = []
    for k in range(2):
        hi = float(rng.uniform(0.3, 0.9))
        for kind in ("hidden", "mlp", "attn"):
            tr.append({"key": f"t{k}", "prompt": " ".join(toks), "subject": "canada", "target": " ottawa",
                       "kind": kind, "tokens": toks, "subject_start": 3, "subject_end": 4, "target_position": 4,
                       "scores": rng.uniform(0.01, hi, (len(toks), n_layers)).tolist(), "low_score": 0.01,
                       "high_score": hi, "window": 2, "samples": 3, "input_ids": list(range(len(toks))),
                       "target_id": 11, "noise": 0.1, "seed": 1})
    rd.append("trace", tr)
    rd.append("edit_eval", [{"key": f"c{k}", "method": m, "ES": float(rng.random() > 0.3),
                             "PS": float(rng.random() > 0.5), "NS": float(rng.random() > 0.2),
                             "reliability_prob_pre": float(rng.random()), "reliability_prob_post": float(rng.random())}
                            for k in range(4) for m in ("rome", "kn")])
    rd.append("misc", [{"key": f"m{k}", "value": float(rng.normal()), "label": f"x{k}"} for k in range(5)])
    if with_plots_dir:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.plot(rng.random(10))
        rd.plots_dir.mkdir(exist_ok=True)
        fig.savefig(rd.plots_dir / "extra.png")
        plt.close(fig)
    rd.close()
    return rd


def test_report_has_every_section_and_figure(tmp_path):
    rng = _rng()
    _make_run(tmp_path / "run", rng)
    html_path, md_path = report.write(tmp_path / "run", tmp_path / "rep")
    assert not (tmp_path / "run" / "report.html").exists()
    html = html_path.read_text()
    md = md_path.read_text()
    # figures: layer distribution, effect bars, 2 trace heatmaps + the AIE, the plots/ png
    imgs = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(imgs) == 6
    for b64 in imgs:
        w, h = _png_size(base64.b64decode(b64))
        assert w > 50 and h > 50
    assert "http" not in html.replace("http-equiv", "")  # nothing fetched from outside
    # markdown: the same figures as files beside it
    files = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(files) == 6
    for f in files:
        assert _png_size((md_path.parent / f).read_bytes())[0] > 50
    for name in ("kn", "effect", "trace", "edit_eval", "misc"):
        assert f"Table <code>{name}</code>" in html and f"Table `{name}`" in md
    assert "<h2>Plots</h2>" in html and "## Plots" in md
    # known tables come first, in the fixed order
    assert md.index("Table `kn`") < md.index("Table `effect`") < md.index("Table `trace`") < md.index("Table `misc`")
    assert "| metric | rome | kn |" in md  # the edit-evaluation table, one column per method


def test_report_is_generic_over_contents(tmp_path):
    rng = _rng()
    rd = RunDir.open(tmp_path / "r", {"a": int(rng.integers(100))}, command="custom")
    vals = rng.normal(size=7)
    rd.append("scores", [{"key": f"k{i}", "method": "m1" if i % 2 else "m2", "v": float(v)}
                         for i, v in enumerate(vals)])
    rd.close()
    html, md = report.write(tmp_path / "r")
    text = md.read_text()
    assert "<img" not in html.read_text()  # no plot registered for this table, no plots/ folder
    m1 = vals[1::2].mean()
    assert f"| m1 | {len(vals[1::2])} | {m1:.4g} |" in text


def test_effect_summary_marks_significance():
    import pyarrow as pa

    rng = _rng()
    n = 30
    before = rng.uniform(0.05, 0.9, n)
    rows = [{"key": f"{i}", "intervention": "suppress", "p_before": b, "p_after": b * rng.uniform(0.2, 0.5)}
            for i, b in enumerate(before)]
    # up and down in turn by the same factor: relative changes +0.1 and -0.1, no effect
    rows += [{"key": f"{i}", "intervention": "null", "p_before": b, "p_after": b * (1.1 if i % 2 else 1 / 1.1)}
             for i, b in enumerate(before)]
    rows.append({"key": "z", "intervention": "null", "p_before": 0.3, "p_after": 0.0})
    summ = {s["intervention"]: s for s in report.effect_summary(pa.Table.from_pylist(rows))}
    sup = summ["suppress"]
    assert sup["p_value"] < 1e-3 and sup["significance"] == "***" and sup["significant"]
    # the paper's change: relative to the smaller of the two probabilities
    want = 100 * np.mean([(r["p_after"] - r["p_before"]) / min(r["p_after"], r["p_before"]) for r in rows[:n]])
    assert sup["mean_change_pct"] == pytest.approx(want, rel=1e-9)
    null = summ["null"]
    assert null["p_value"] > 0.5 and null["significance"] == "n.s." and null["n"] == n and null["n_zero"] == 1
    assert abs(null["mean_change_pct"]) < 1e-6


def test_report_command(tmp_path, capsys):
    _make_run(tmp_path / "run", _rng(), with_plots_dir=False)
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.html").exists() and (tmp_path / "run" / "report.md").exists()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- rendering in a real browser ---------------------------------------------------------------
def _install_chromium() -> str | None:
    """chromium's path; installed with apt-get (bounded, serialised) when missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = "apt-get install -y -q --no-install-recommends chromium"
    for cmd in (install, f"apt-get update -q && {install}"):
        try:
            subprocess.run(["flock", "/tmp/kncore-apt.lock", "sh", "-c", cmd], env=env, timeout=600,
                           capture_output=True)
        except (subprocess.TimeoutExpired, OSError):
            return None
        found = shutil.which("chromium")
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def chromium():
    path = _install_chromium()
    if path is None:
        pytest.skip("chromium is not installed and could not be installed (needs root, apt-get and Debian's "
                    "registry)")
    return path


_CHECK = ("<script>window.addEventListener('load',function(){var im=document.images,w=[];"
          "for(var i=0;i<im.length;i++){w.push(im[i].complete?im[i].naturalWidth:-1);}"
          "var d=document.createElement('pre');d.id='kncore-check';d.textContent='widths='+w.join(',');"
          "document.body.appendChild(d);});</script>")


def _rendered_widths(chromium, html_file: Path) -> list[int]:
    page = html_file.with_name("check-" + html_file.name)
    page.write_text(html_file.read_text().replace("</body>", _CHECK + "</body>"))
    with tempfile.TemporaryDirectory() as ud:
        out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={ud}", "--window-size=1200,2000",
                              "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()],
                             capture_output=True, text=True, timeout=120)
    m = re.search(r'id="kncore-check">widths=([-0-9,]*)<', out.stdout)
    assert m, f"no check marker in the dumped DOM; chromium said: {out.stderr[-2000:]}"
    return [int(x) for x in m.group(1).split(",") if x]


def test_html_renders_with_images_in_chromium(tmp_path, chromium):
    _make_run(tmp_path / "run", _rng())
    html_path, _ = report.write(tmp_path / "run")
    html = html_path.read_text()
    want = [_png_size(base64.b64decode(b))[0] for b in re.findall(r"src='data:image/png;base64,([^']+)'", html)]
    assert len(want) == 6
    assert _rendered_widths(chromium, html_path) == want
    # the check can fail: a page whose first image is corrupt renders it with no width
    first = re.search(r"base64,([^']+)'", html).group(1)
    broken = tmp_path / "broken.html"
    broken.write_text(html.replace(first, base64.b64encode(b"not a png at all").decode(), 1))
    got = _rendered_widths(chromium, broken)
    assert got[0] <= 0 and got[1:] == want[1:]


# -- the layout: findings first, each with a reading from the data; the run's details folded ----------
def test_report_reads_like_a_result(tmp_path):
    import pyarrow as pa

    rng = _rng()
    long_value = "x" * 150 + "-the-end"
    rd = _make_run(tmp_path / "run", rng, with_plots_dir=False, config={"long_option": long_value})
    html_path, md_path = report.write(tmp_path / "run", tmp_path / "rep")
    html, md = html_path.read_text(), md_path.read_text()
    # findings come first, in this order, and the fold holds the manifest, the config and the tables
    order = ["<h2>Knowledge neurons</h2>", "<h2>Causal tracing</h2>",
             "<h2>Effect of interventions on the knowledge neurons</h2>", "<h2>Edit evaluation</h2>", "<details>",
             "<h2>Run</h2>", "Table <code>kn</code>"]
    at = [html.index(s) for s in order]
    assert at == sorted(at)
    assert html.count("<details>") == 1 and html.index("</details>") > html.index("Table <code>misc</code>")
    assert "<img" not in html[html.index("<details>"):]  # figures are findings, never folded
    assert md.index("## Knowledge neurons") < md.index("<details>") < md.index("## Run") < md.index("Table `kn`")
    # the config is never cut mid-string
    assert long_value in html and long_value in md
    # each reading is computed from the table
    kn = RunDir.load(tmp_path / "run").read("kn")
    layers = np.asarray(kn.column("layer").to_pylist())
    counts = np.bincount(layers, minlength=rd.manifest["model"]["n_layers"])
    top = int(counts.argmax())
    assert (f"{kn.num_rows} knowledge neurons for 12 facts" in md
            and f"most in layer {top} ({counts[top]} neurons" in md)
    for rel in sorted(set(kn.column("relation").to_pylist())):
        rs = [r for r in kn.to_pylist() if r["relation"] == rel]
        facts = len({r["key"] for r in rs})
        assert f"| {rel} | {facts} | {len(rs)} | {len(rs) / facts:.2f} |" in md
    eff = RunDir.load(tmp_path / "run").read("effect").to_pylist()
    sup = [r for r in eff if r["intervention"] == "suppress"]
    pct = 100 * np.mean([(r["p_after"] - r["p_before"]) / min(r["p_after"], r["p_before"]) for r in sup])
    assert (f"suppress lowers the target's probability, by {abs(pct):.3g}% of the smaller of the two on average "
            f"over {len(sup)} prompts") in md.lower()
    assert "enhance raises the target's probability" in md.lower()
    # pass or fail per criterion: the rate after the edit against one half, per method
    ev = RunDir.load(tmp_path / "run").read("edit_eval").to_pylist()
    for m in ("rome", "kn"):
        for c in ("ES", "PS", "NS"):
            rate = np.mean([r[c] for r in ev if r["method"] == m])
            verdict = "PASS" if rate > 0.5 else "FAIL"
            assert re.search(rf"\| {c} \|[^\n]*{verdict} \({rate:.2f}, 4 cases\)", md), (m, c, rate)
    crit = report.edit_criteria(pa.Table.from_pylist(ev))
    n_pass = {m: sum(crit[3][(m, c)] for c in ("ES", "PS", "NS")) for m in ("rome", "kn")}
    assert f"Rome passes {n_pass['rome']} of 3 criteria" in md and f"kn passes {n_pass['kn']} of 3 criteria" in md


def test_trace_reading_names_the_peak():
    """The trace reading names the token group and layer where restoring helps most (ROME's AIE)."""
    from kncore.pipeline import trace_results

    rng = _rng()
    toks = "a b c d e".split()
    n_layers = 5
    peak = (int(rng.integers(n_layers)))
    rows = []
    for k in range(3):
        s = rng.uniform(0.0, 0.1, (len(toks), n_layers))
        s[2, peak] = 0.9  # the last subject token (subject = tokens 1..2)
        rows.append({"key": f"t{k}", "prompt": " ".join(toks), "subject": "b c", "target": " z", "kind": "hidden",
                     "tokens": toks, "subject_start": 1, "subject_end": 3, "target_position": 4,
                     "scores": s.tolist(), "low_score": 0.05, "high_score": 0.95, "window": 1, "samples": 2})
    text = report.trace_reading(trace_results(rows))
    assert f"hidden at the last subject token, layer {peak} (P = 0.9, 94% of the clean-corrupted gap)" in text
    assert text.startswith("Over 3 traced prompts (clean P = 0.95, corrupted P = 0.05)")
