"""IG completeness gap on SmolLM2 in bf16 against fp32, kncore and plain PyTorch.

For each (prompt, layer): |sum_j IG_j - (F(a) - F(0))| / |F(a) - F(0)| with
riemann-left, 20 steps. kncore: ``attribute(...).completeness_gap``; plain:
``kncore.testing.ig_plain`` (the HF forward with a hook, autograd, sums in
fp32), whose F(a) and F(0) come from the same HF forward. Writes
bench/results/ig_bf16_<machine>_<commit>.md.

    python bench/bench_ig_bf16.py [--prompts 3] [--skip-plain]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, commit, machine, write_atomic  # noqa: E402

import kncore  # noqa: E402
from kncore.testing import ig_plain  # noqa: E402

FACTS = [("The capital of Canada is", " Ottawa"), ("The capital of France is", " Paris"),
         ("The capital of Japan is", " Tokyo"), ("Canada's capital city is", " Ottawa"),
         ("The official language of France is", " French"), ("Paris is the capital of", " France")]


def plain_gaps(lm, prompts, targets, steps):
    gaps = torch.zeros(len(prompts), lm.n_layers, dtype=torch.float64)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        for L in range(lm.n_layers):
            ig, f1, f0 = ig_plain(lm, p, t, L, steps, with_f=True)
            gaps[i, L] = abs(float(ig.double().sum()) - (f1 - f0)) / abs(f1 - f0)
    return gaps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-plain", action="store_true")
    args = ap.parse_args()
    prompts, targets = map(list, zip(*FACTS[: args.prompts]))
    rows = []
    for dt in ("float32", "bfloat16"):
        lm = kncore.load("smollm2-135m", dtype=dt)
        t = time.time()
        g = kncore.attribute(lm, prompts, targets, steps=args.steps, progress=False).completeness_gap.double()
        rows.append(("kncore", dt, g, time.time() - t))
        if not args.skip_plain:
            t = time.time()
            rows.append(("plain torch", dt, plain_gaps(lm, prompts, targets, args.steps), time.time() - t))
    lines = [f"# IG completeness gap, SmolLM2-135M, {args.prompts} prompts x 30 layers, riemann-left "
             f"{args.steps} steps ({machine('cpu')}, commit {commit()})", "",
             "| run | dtype | max gap | median gap | largest per-layer max (layer) | time |",
             "|---|---|---|---|---|---|"]
    for who, dt, g, sec in rows:
        per = g.max(0).values
        lines.append(f"| {who} | {dt} | {float(g.max()):.3g} | {float(g.median()):.3g} | "
                     f"{float(per.max()):.3g} ({int(per.argmax())}) | {sec:.0f} s |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_atomic(ROOT / "bench" / "results" / f"ig_bf16_{machine('cpu')}_{commit()}.md", text)


if __name__ == "__main__":
    main()
