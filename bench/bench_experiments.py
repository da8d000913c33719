"""kncore.experiments.localise against the paper's own pipeline.

    flock /tmp/kncore-bench.lock .venv/bin/python bench/bench_experiments.py [--runs 3] [--quick]

The peer is what Niu et al.'s code (frankniujc/kn_thesis, ``search_kns``)
does for one fact: the ``knowledge-neurons`` package's ``get_scores`` for
every prompt (all layers, 20 IG steps in one batch of 20), then the adaptive
refinement (coarse neurons above 0.2 x max, p from 0.7 in steps of 0.05 until
2 to 5 neurons, at most 20 tries) and R1^2 from the largest singular value,
written here from that description. kncore runs ``experiments.localise`` on
the same facts, with the package's quadrature and neuron site
(``scheme="linspace", site="pre_act"``), into a fresh run directory (so its
time includes writing the Parquet tables, tensors, markdown and the figure).

Model: random GPT-2 with GPT-2-small widths (d 768, d_ff 3072, 12 heads,
vocabulary 50257) and 4 layers (12 would take minutes per prompt on the
package side on 2 busy cores), the word-level test tokenizer; two facts of
five paraphrases each. The script checks that both sides give the same
scores (1e-4 relative), knowledge neurons, p and R1^2 before timing.
Reported: median of ``--runs`` runs after a warm-up, the ratio, and each
side's peak resident memory during its first call above the level before
it (sampled every 2 ms, each side in a fresh process). Results:
bench/results/bench_experiments_<machine>_<commit>.{csv,md}.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from bench._common import commit, machine, peak_rss  # noqa: E402
from kncore import LM  # noqa: E402
from kncore import experiments as X  # noqa: E402
from kncore.testing import tiny_model, tiny_tokenizer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TEMPLATES = ["the capital of [X] is [Y] .", "the capital city of [X] is [Y] .", "in [X] the capital is [Y] .",
             "[X] has the capital city [Y] .", "[X] , the capital city is [Y] ."]
FACTS = [("canada", "ottawa"), ("france", "paris")]
STEPS = 20


# -- the peer: the paper's pipeline on the knowledge-neurons package ----------------------------
def paper_adaptive(scores: torch.Tensor, t: float = 0.2, p: float = 0.7, lo: int = 2, hi: int = 5):
    """Coarse neurons per prompt above t x its max; keep those shared by more
    than n x p prompts, moving p by 0.05 (at most 20 tries) toward 2..5 neurons."""
    coarse = [torch.nonzero(s > s.max().item() * t).tolist() for s in scores]
    paper_adaptive.coarse = coarse
    for _ in range(20):
        count: dict = {}
        for c in coarse:
            for n in c:
                count[tuple(n)] = count.get(tuple(n), 0) + 1
        kept = sorted(n for n, k in count.items() if k > len(coarse) * p)
        if len(kept) < lo:
            p -= 0.05
        elif len(kept) > hi:
            p += 0.05
        else:
            return kept, p, True
    return kept, p, False


def paper_r1(scores: torch.Tensor) -> float:
    y = scores.reshape(len(scores), -1).double()
    y = y / y.norm(dim=1, keepdim=True)
    s = torch.linalg.svdvals(y)
    return float((s[0] ** 2 - 1) / (len(y) - 1))


def run_peer(model, tok, facts):
    from knowledge_neurons import KnowledgeNeurons

    kn = KnowledgeNeurons(model, tok, model_type="gpt2", device="cpu")
    out = {}
    for subject, obj in facts:
        prompts = [t.replace("[X]", subject).replace(" [Y] .", "") for t in TEMPLATES]
        sc = torch.stack([kn.get_scores(q, obj, batch_size=STEPS, steps=STEPS, pbar=False) for q in prompts])
        neurons, p, conv = paper_adaptive(sc)
        out[subject] = {"scores": sc, "neurons": [tuple(n) for n in neurons], "p": p, "r1": paper_r1(sc),
                        "converged": conv, "coarse": [sorted(tuple(n) for n in c) for c in paper_adaptive.coarse]}
    return out


# -- kncore ------------------------------------------------------------------------------------------
def write_data(root: Path):
    (root / "pararel/patterns").mkdir(parents=True)
    (root / "pararel/facts").mkdir(parents=True)
    (root / "pararel/patterns/P36.jsonl").write_text("\n".join(json.dumps({"pattern": t}) for t in TEMPLATES))
    (root / "pararel/facts/P36.jsonl").write_text("\n".join(json.dumps({"sub_label": s, "obj_label": o,
                                                                        "uuid": s}) for s, o in FACTS))


def run_kncore(lm, data: Path, out: Path):
    shutil.rmtree(out, ignore_errors=True)
    res = X.localise(lm, "pararel:P36", out, steps=STEPS, scheme="linspace", site="pre_act", data_dir=data,
                     progress=False)
    kns = X.read_kns(out)
    from kncore.rundir import RunDir
    rd = RunDir.load(out)
    attr = rd.load_tensors("attr")
    coarse = rd.read("coarse").to_pylist()
    got = {}
    for f in res["bags"]:
        keys = sorted(k for k in attr if k.startswith(f["key"] + "#"))
        got[f["subject"]] = {"scores": torch.stack([attr[k] for k in keys]), "neurons": sorted(kns[f["key"]]),
                             "p": f["p"], "r1": f["r1_sq"],
                             "coarse": [sorted((r["layer"], r["neuron"]) for r in coarse
                                               if r["key"] == f["key"] and r["j"] == j) for j in range(len(keys))]}
    return got


def check(peer, ours) -> int:
    """Assert equal numbers (scores, every prompt's coarse neurons, R1^2, and
    KNs and p); returns how many facts the paper's p search left unconverged
    (it then steps p past 1 and back; kncore stops at the edge of [0, 1) and
    keeps the nearer side, so only the KNs and p are not compared there)."""
    skipped = 0
    for s in peer:
        a, b = peer[s], ours[s]
        assert a["scores"].shape == b["scores"].shape, (a["scores"].shape, b["scores"].shape)
        scale = a["scores"].abs().max()
        err = float((a["scores"].float() - b["scores"].float()).abs().max() / scale)
        assert err < 1e-4, f"{s}: scores differ by {err:.2e} of the largest"
        assert abs(a["r1"] - b["r1"]) < 1e-5, (s, a["r1"], b["r1"])
        assert a["coarse"] == b["coarse"], f"{s}: coarse neurons differ"
        if not a["converged"]:
            skipped += 1
            continue
        assert a["neurons"] == b["neurons"], (s, a["neurons"], b["neurons"])
        assert abs(a["p"] - b["p"]) < 1e-9, (s, a["p"], b["p"])
    return skipped


def timed(fn, runs):
    """(median seconds, all seconds) after a warm-up call."""
    fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def peak_mb(side: str, quick: bool) -> float:
    """Peak resident memory of one call of one side above the level before
    it, sampled every 2 ms in a fresh process (so neither side reuses pages
    the other freed)."""
    cmd = [sys.executable, __file__, "--child", side] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 layers and d_ff 1024 (a smoke run, not for reports)")
    ap.add_argument("--child", choices=["peer", "kncore"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    shape = dict(d_model=768, d_ff=3072, n_layers=4, n_heads=12, n_ctx=1024, vocab_size=50257)
    if args.quick:
        shape.update(d_ff=1024, n_layers=2)
    model = tiny_model("gpt2", **shape)
    for p in model.parameters():
        p.requires_grad_(False)
    tok = tiny_tokenizer()
    lm = LM(model, tok, name="gpt2-small-shape-4L")
    tmp = Path(tempfile.mkdtemp(prefix="bench-exp-"))
    try:
        write_data(tmp / "data")
        if args.child:
            if args.child == "peer":
                _, _, extra = peak_rss(lambda: run_peer(model, tok, FACTS))
            else:
                _, _, extra = peak_rss(lambda: run_kncore(lm, tmp / "data", tmp / "run"))
            print(extra / 2**20)
            return
        peer = run_peer(model, tok, FACTS)
        ours = run_kncore(lm, tmp / "data", tmp / "run")
        unconverged = check(peer, ours)
        t_peer, all_peer = timed(lambda: run_peer(model, tok, FACTS), args.runs)
        t_ours, all_ours = timed(lambda: run_kncore(lm, tmp / "data", tmp / "run"), args.runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m_peer, m_ours = peak_mb("peer", args.quick), peak_mb("kncore", args.quick)
    n_prompts = len(FACTS) * len(TEMPLATES)
    row = {"case": f"localise {len(FACTS)} facts x {len(TEMPLATES)} prompts, {shape['n_layers']} layers, "
                   f"{STEPS} steps", "peer": "knowledge-neurons get_scores + paper refinement",
           "peer_s": round(t_peer, 3), "kncore_s": round(t_ours, 3), "speedup": round(t_peer / t_ours, 2),
           "peer_peak_mb": round(m_peer, 1), "kncore_peak_mb": round(m_ours, 1),
           "peer_runs_s": " ".join(f"{t:.2f}" for t in all_peer),
           "kncore_runs_s": " ".join(f"{t:.2f}" for t in all_ours), "prompts": n_prompts,
           "same_numbers": "scores 1e-4 rel, coarse neurons, R1^2 1e-5, KNs and p equal" + (
               f" (KNs and p not compared for {unconverged} fact(s) where the paper's p search does not "
               f"converge)"
               if unconverged else "")}
    name = f"bench_experiments_{machine()}_{commit()}"
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(row))
        w.writeheader()
        w.writerow(row)
        (RESULTS / f"{name}.csv").write_text(buf.getvalue())
        md = (f"# bench_experiments on {machine()} at {commit()}\n\n"
              f"`flock /tmp/kncore-bench.lock .venv/bin/python bench/bench_experiments.py --runs {args.runs}`"
              f" (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch threads "
              f"{torch.get_num_threads()})\n\n| case | peer s | kncore s | speedup | peer peak MB | kncore peak MB |\n"
              f"|---|---|---|---|---|---|\n| {row['case']} | {row['peer_s']} | {row['kncore_s']} | "
              f"{row['speedup']}x | {row['peer_peak_mb']} | {row['kncore_peak_mb']} |\n\n"
              f"Median of {args.runs} runs after a warm-up; both sides in one process on the same model and "
              f"prompts, checked equal first ({row['same_numbers']}). GPU: not measured on GPU.\n")
        (RESULTS / f"{name}.md").write_text(md)
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
