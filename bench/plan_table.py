"""The planner's table for docs/planner.md: per-job FLOPs, peak memory and
predicted H100 time of LLaMA-2-7B, GPT-J-6B and GPT-2-XL, from their shipped
configs (no weights). Predictions, not measurements on a GPU.

    python bench/plan_table.py            # prints the Markdown rows of docs/planner.md's table,
                                          # writes bench/results/plan_table.json
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kncore.planner as P  # noqa: E402

MODELS = ("llama-2-7b", "gpt-j-6b", "gpt2-xl")
# the jobs as the peers run them: KN (Dai et al.): 20 steps over every layer;
# ROME's causal trace: 3 kinds, 10 samples, window 10; ROME's statistics: 100,000
# texts truncated to min(context, 2048) tokens (an upper bound on their length).
JOBS = dict(attribute=dict(prompts=1, tokens=12, steps=20), trace=dict(tokens=12, subject=(1, 4)),
            stats=dict(texts=100000), edit=dict(tokens=12))


def main():
    out = {}
    for m in MODELS:
        for dt in ("float32", "bfloat16"):
            t0 = time.time()
            p = P.plan(m, dtype=dt, **JOBS)
            out[f"{m}/{dt}"] = p.to_dict()
            print(f"{m} {dt}: planned in {time.time() - t0:.0f} s", file=sys.stderr)
            for j in p.jobs:
                print(f"| {m} | {dt} | {j.job} | {j.flops / 1e12:.3g} TFLOP | "
                      f"{(j.weight_bytes + j.act_bytes) / 1e9:.3g} GB | {j.peak_bytes / 1e9:.3g} GB | "
                      f"{P._sec(j.seconds('H100', p.dtype))} | {p.auto_batch.get('H100', '') if j.job == 'attribute' else ''} |")
    res = ROOT / "bench" / "results" / "plan_table.json"
    res.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
