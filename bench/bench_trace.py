"""Causal tracing: kncore.trace against ROME's per-cell loop, side by side.

The peer is ROME's ``calculate_hidden_flow``: one Hugging Face forward per
cell on a batch of 1 clean + 10 corrupted rows, hooks adding the noise and
restoring states (:func:`kncore.tracing.trace_ref`, the same code the tests
hold the fast path to). Both run in this process on the same random GPT-2
shaped model (word-level tokenizer, GPT-2's 50257-token head), the same
10-token prompt with a 3-token subject at its start (no free cells before the
subject; ``--subject-at middle``: from the 5th token), all three kinds,
samples=10, window=10. Scores must agree to 1e-5
relative.

    python bench/bench_trace.py --quick               # small model, seconds
    python bench/bench_trace.py                       # GPT-2-medium shape, full grid both sides
    python bench/bench_trace.py --config xl --naive-cells 24
        # GPT-2-XL shape: the naive loop is timed on a random subset of cells
        # and extrapolated to the full grid (stated in the output); equality is
        # checked on those cells.
    python bench/bench_trace.py --sweep               # max_tokens sweep for the default
    python bench/bench_trace.py --device cuda         # both sides on the GPU (CUDA events)

Writes bench/results/trace_<machine>_<commit>.{csv,md}. Run under
``flock /tmp/kncore-bench.lock`` on shared machines.
"""
from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import commit, machine, measure, run_once  # noqa: E402
from kncore import LM  # noqa: E402
from kncore.testing import tiny_model, tiny_tokenizer  # noqa: E402
from kncore.tracing import KINDS, trace, trace_ref  # noqa: E402
from kncore.tracing.core import _jobs  # noqa: E402

CONFIGS = {
    "quick": dict(n_layers=6, d_model=256, n_heads=4, vocab_size=50257),
    "medium": dict(n_layers=24, d_model=1024, n_heads=16, vocab_size=50257),
    "xl": dict(n_layers=48, d_model=1600, n_heads=25, vocab_size=50257),
}
# subject at the start (the common case: 83% of known_1000 prompts) or from the
# 5th token on, where the 4 cells x layers before it are free and shorter
PROMPTS = {"start": ("capital of canada is a city in the country of", "capital of canada"),
           "middle": ("a city in the capital of canada is the country", "capital of canada")}
SAMPLES, WINDOW = 10, 10


def build(cfg: dict, seed: int = 0) -> LM:
    d = cfg["d_model"]
    model = tiny_model("gpt2", seed=seed, d_model=d, n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                       d_ff=4 * d, n_ctx=1024, vocab_size=cfg["vocab_size"])
    for p in model.parameters():
        p.requires_grad_(False)
    return LM(model, tiny_tokenizer(), name=f"random-gpt2-{cfg['n_layers']}x{d}")


def macs(lm: LM, T: int, b: int):
    """Multiply-accumulates of each side (weights only; attention over <= 10
    positions is < 1% here). A layer costs 12 d^2 per position (its QKV 3 d^2),
    the head V*d. The kncore count walks kncore.trace's own jobs (one walk per
    token): cells before the subject are free, a window's first layer is one
    position, a window clipped at layer 0 starts at its hi from the longest
    one's rows, the last layer computes only keys and values except at the
    last position."""
    N, d, V = lm.n_layers, lm.d_model, lm.adapter.vocab_size
    layer, qkv, head = 12 * d * d, 3 * d * d, V * d
    cells = len(KINDS) * T * N
    naive = (cells + 1) * (SAMPLES + 1) * T * (N * layer + head) + T * (N * layer + head)
    fast = (1 + SAMPLES) * T * N * layer + (1 + SAMPLES) * head  # clean + corrupted runs
    jobs, _ = _jobs(KINDS, T, N, b, WINDOW, True)
    firsts = {(j.t, j.code, j.lo) for j in jobs if j.code and j.parent is None}
    for j in jobs:
        n, entry = T - j.t, (j.entry if j.parent is None else j.hi)
        walk = 0
        if entry <= N - 1:
            walk = (N - 1 - entry) * n * layer + (layer + (n - 1) * qkv)
        fast += SAMPLES * (walk + head)
    fast += len(firsts) * SAMPLES * layer
    return naive, fast


def gemm_peak(d: int, device: str, rows: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an fp32 [rows, d] x [d, 4d] matmul, the shape of an MLP's first layer."""
    a, w = torch.randn(rows, d, device=device), torch.randn(d, 4 * d, device=device)
    a @ w
    ts = [run_once(lambda: a @ w)[0] for _ in range(reps)]
    return 2 * rows * d * 4 * d / statistics.median(ts) / 1e9


def timed(fn, repeats, device: str):
    """(fn's result, seconds of each run, peak extra MiB): CUDA events and the
    allocator's high-water mark on a GPU, the host clock and sampled RSS on the CPU."""
    times, mems, out = [], [], None
    for _ in range(repeats):
        out, t, extra = measure(fn, device)
        times.append(t)
        mems.append(extra / 2**20)
    return out, times, max(mems)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="medium")
    ap.add_argument("--quick", action="store_true", help="the small config (same as --config quick)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the fast path (median reported)")
    ap.add_argument("--naive-repeats", type=int, default=1, help="timed runs of the naive loop")
    ap.add_argument("--naive-cells", type=int, default=0,
                    help="time the naive loop on this many random cells and extrapolate (0: full grid)")
    ap.add_argument("--max-tokens", type=int, default=None, help="kncore.trace's max_tokens (default: its own)")
    ap.add_argument("--sweep", action="store_true", help="time the fast path for several max_tokens")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--machine", default=None, help="names the result files (default: the GPU's name or cpu-<n>core)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subject-at", choices=sorted(PROMPTS), default="start",
                    help="where the 3-token subject sits in the 10-token prompt (default: its start)")
    args = ap.parse_args()
    if args.quick:
        args.config = "quick"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    if args.machine is None:
        args.machine = machine(args.device)
    cfg = CONFIGS[args.config]
    lm = build(cfg, args.seed)
    lm.model.to(args.device)
    PROMPT, SUBJECT = PROMPTS[args.subject_at]
    T = len(lm.tokenize(PROMPT))
    b, _ = lm.subject_span(PROMPT, SUBJECT)
    N = lm.n_layers
    print(f"{lm}  prompt of {T} tokens, subject tokens {lm.subject_span(PROMPT, SUBJECT)}, "
          f"threads={torch.get_num_threads()}", flush=True)

    if args.sweep:
        for mt in (512, 1024, 2048, 4096, 8192):
            _, ts, mem = timed(lambda: trace(lm, PROMPT, SUBJECT, samples=SAMPLES, window=WINDOW, max_tokens=mt),
                               args.repeats, args.device)
            print(f"max_tokens={mt:5d}: median {statistics.median(ts):.2f}s (runs {[round(t, 2) for t in ts]}), "
                  f"peak +{mem:.0f} MiB", flush=True)
        return

    if args.device == "cuda":  # first call: CUDA context, kernels' autotuning
        trace(lm, PROMPT, SUBJECT, samples=SAMPLES, window=WINDOW, max_tokens=args.max_tokens)
    fast, ft, fmem = timed(lambda: trace(lm, PROMPT, SUBJECT, samples=SAMPLES, window=WINDOW,
                                         max_tokens=args.max_tokens), args.repeats, args.device)
    print(f"kncore.trace: {[round(t, 2) for t in ft]} s, peak +{fmem:.0f} MiB; "
          f"low {fast.low:.4g} high {fast.high:.4g}", flush=True)

    all_cells = [(k, t, l) for k in KINDS for t in range(T) for l in range(N)]
    if args.naive_cells:
        cells = random.Random(args.seed).sample(all_cells, min(args.naive_cells, len(all_cells)))
    else:
        cells = all_cells
    ref, nt, nmem = timed(lambda: trace_ref(lm, PROMPT, SUBJECT, samples=SAMPLES, window=WINDOW, cells=cells),
                          args.naive_repeats, args.device)
    # the naive call is 1 forward for `low` plus one per cell (+ 1 clean forward)
    naive_full = [t * (len(all_cells) + 2) / (len(cells) + 2) for t in nt]
    errs = [abs(fast.scores[k][t, l].item() - ref.scores[k][t, l].item()) / abs(ref.scores[k][t, l].item())
            for k, t, l in cells]
    max_rel = max(errs + [abs(fast.low - ref.low) / ref.low])
    f_med, n_med = statistics.median(ft), statistics.median(naive_full)
    n_macs, f_macs = macs(lm, T, b)
    peak = gemm_peak(lm.d_model, args.device)
    extrap = len(cells) < len(all_cells)
    naive_note = (f"extrapolated from {len(cells)} random cells of {len(all_cells)}" if extrap
                  else f"full grid of {len(all_cells)} cells")
    print(f"naive ROME loop: {[round(t, 1) for t in naive_full]} s ({naive_note}), peak +{nmem:.0f} MiB", flush=True)
    print(f"speed-up {n_med / f_med:.1f}x; max relative score difference {max_rel:.2e} over {len(cells)} cells")
    print(f"MACs: naive {n_macs / 1e12:.2f} T, kncore {f_macs / 1e12:.2f} T (FLOP ratio {n_macs / f_macs:.1f}x); "
          f"achieved {2 * n_macs / n_med / 1e9:.0f} vs {2 * f_macs / f_med / 1e9:.0f} GFLOP/s; "
          f"sgemm [2048,{lm.d_model}]x[{lm.d_model},{4 * lm.d_model}] {peak:.0f} GFLOP/s")
    ok = max_rel <= 1e-5
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (GPU not measured)"

    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"trace_{args.machine}_{commit()}"
    row = dict(config=args.config, model=lm.name, n_layers=N, d_model=lm.d_model, tokens=T,
               subject_tokens=f"{b}-{b + 2}", samples=SAMPLES,
               window=WINDOW, kinds="+".join(KINDS), threads=torch.get_num_threads(),
               kncore_s=round(f_med, 3), kncore_runs=" ".join(f"{t:.3f}" for t in ft), kncore_peak_mib=round(fmem),
               naive_s=round(n_med, 2), naive_runs=" ".join(f"{t:.2f}" for t in naive_full),
               naive_peak_mib=round(nmem), naive_timing=naive_note, speedup=round(n_med / f_med, 2),
               max_rel_diff=f"{max_rel:.2e}", equal=ok, naive_tmacs=round(n_macs / 1e12, 3),
               kncore_tmacs=round(f_macs / 1e12, 3), flop_ratio=round(n_macs / f_macs, 2),
               kncore_gflops=round(2 * f_macs / f_med / 1e9, 1), naive_gflops=round(2 * n_macs / n_med / 1e9, 1),
               sgemm_gflops=round(peak, 1), device=where)
    csv_path = stem.with_suffix(".csv")
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    md_path = stem.with_suffix(".md")
    line = (f"| {args.config} ({N}x{lm.d_model}) | {b}-{b + 2} | {f_med:.2f} s | {n_med:.1f} s{' (extrap.)' if extrap else ''} | "
            f"**{n_med / f_med:.1f}x** | {n_macs / f_macs:.1f}x | {max_rel:.1e} | {fmem:.0f} / {nmem:.0f} MiB | "
            f"{where} |\n")
    if not md_path.exists():
        md_path.write_text(
            f"# Causal tracing, {args.machine}, commit {commit()}\n\n"
            f"kncore.trace vs ROME's per-cell loop (HF forward + hooks, 1 clean + 10 corrupted rows), "
            f"10-token prompt with a 3-token subject, kinds hidden+mlp+attn, samples 10, window 10, "
            f"random GPT-2-shaped fp32 models. Command: `python bench/bench_trace.py --config <cfg> "
            f"[--subject-at start|middle]`.\n\n"
            "| config | subject tokens | kncore (median) | naive | speed-up | FLOP ratio | max rel. diff | "
            "peak mem (kncore / naive) | device |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    with open(md_path, "a") as f:
        f.write(line)
    print(f"wrote {csv_path} and {md_path}")
    if not ok:
        sys.exit("scores differ beyond 1e-5 relative")


if __name__ == "__main__":
    main()
