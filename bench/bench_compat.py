"""kncore.compat.KnowledgeNeurons against the knowledge-neurons package (0.0.2).

    flock /tmp/kncore-bench.lock .venv/bin/python bench/bench_compat.py [--runs 3] [--quick]

What a user swapping one import runs: ``get_refined_neurons`` over 3
paraphrases (all layers, 20 IG steps, the package's defaults: batch 10,
adaptive threshold 0.3, p 0.5) and ``suppress_knowledge`` with the neurons
found, on random models of GPT-2-small shape (12 layers, d 768, d_ff 3072,
vocabulary 50257) and BERT-base shape (12, 768, 3072, 30522), with the
word-level test tokenizer. Both sides run in this process on the same model
and inputs; the script checks that they return the same neurons and
probabilities (and scores within 1e-4 relative) before timing them.

Reported per case: median wall time of ``--runs`` runs after one warm-up,
the ratio, and peak memory as the resident set above the start of the call
(sampled every 2 ms after glibc's malloc_trim: on the CPU torch keeps no
allocator statistics). It also
counts the FLOPs integrated gradients needs at minimum (see ``floor_flops``)
and reports kncore's time as a multiple of the time that takes at the
machine's measured matmul rate. Results:
bench/results/bench_compat_<machine>_<commit>.{csv,md}.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import io
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from bench._common import commit, machine, write_atomic, peak_rss  # noqa: E402

from kncore.compat import KnowledgeNeurons  # noqa: E402
from kncore.testing import tiny_model, tiny_tokenizer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SHAPES = {
    "gpt2-small": dict(arch="gpt2", model_type="gpt2", d_model=768, d_ff=3072, n_layers=12, n_heads=12,
                       n_ctx=1024, vocab_size=50257),
    "bert-base": dict(arch="bert", model_type="bert", d_model=768, d_ff=3072, n_layers=12, n_heads=12,
                      n_ctx=512, vocab_size=30522),
}
PROMPTS = {
    "gpt2": ["the capital of canada is", "canada has the capital city", "in canada the capital is"],
    "bert": ["the capital of canada is [MASK] .", "canada has the capital city [MASK] .",
             "in canada the capital is [MASK] ."],
}
TARGET = "ottawa"
STEPS = 20


def peer_class():
    """knowledge_neurons.KnowledgeNeurons; einops (not installed) is shimmed
    with the one pattern the package uses."""
    try:
        import einops  # noqa: F401
    except ImportError:
        m = types.ModuleType("einops")
        m.repeat = lambda x, pattern, r: x.repeat(r, 1)
        sys.modules["einops"] = m
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from knowledge_neurons import KnowledgeNeurons as Peer
    return Peer


def _trim():
    """Hand freed heap memory back to the OS (glibc), so that a call's peak
    RSS above its start is not hidden by memory a previous call left free."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn):
    """(result, seconds, peak RSS above the start in bytes), after malloc_trim."""
    _trim()
    return peak_rss(fn)


def matmul_rate() -> float:
    """FLOP/s of a large fp32 matmul on this machine (median of 5)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * 2048 ** 3 / statistics.median(ts)


def floor_flops(shape: dict, T: int, steps: int, n_prompts: int) -> float:
    """FLOPs integrated gradients over every layer needs at minimum: for each
    start layer L and step, the layers from L up (one token for a decoder,
    whose prefix keys and values cannot change; all T tokens for BERT) forward
    and backward to the activations (parameters frozen: about as much again),
    plus the head at the target position."""
    d, f, N, V = shape["d_model"], shape["d_ff"], shape["n_layers"], shape["vocab_size"]
    tok = 1 if shape["arch"] != "bert" else T
    per_layer = 2 * (4 * d * d + 2 * d * f) * tok + 4 * d * T * tok  # projections + attention
    head = 2 * d * V
    fwd = sum(steps * ((N - L) * per_layer + head) for L in range(N))
    return 2 * fwd * n_prompts


def run_case(name: str, runs: int, Peer, rate: float) -> list[dict]:
    shape = SHAPES[name]
    arch, mt = shape["arch"], shape["model_type"]
    kw = {k: v for k, v in shape.items() if k not in ("arch", "model_type")}
    model = tiny_model(arch, seed=0, **kw)
    for p in model.parameters():
        p.requires_grad_(False)
    tok = tiny_tokenizer(mlm=(arch == "bert"))
    if arch == "bert":
        tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    peer = Peer(model, tok, model_type=mt, device="cpu")
    ours = KnowledgeNeurons(model, tok, model_type=mt, device="cpu")
    prompts = PROMPTS[arch]
    T = max(len(tok(p)["input_ids"]) for p in prompts)

    def refined(side):
        return lambda: side.get_refined_neurons(prompts, TARGET, p=0.5, steps=STEPS, quiet=True)

    # Same numbers: scores of one prompt within 1e-4, then (in the warm-up
    # calls below) the same refined neurons and suppression results.
    s_peer = peer.get_scores(prompts[0], TARGET, steps=STEPS, pbar=False).detach()
    s_ours = ours.get_scores(prompts[0], TARGET, steps=STEPS, pbar=False)
    rel = ((s_ours - s_peer).abs().max() / s_peer.abs().max()).item()
    assert rel <= 1e-4, f"{name}: scores differ by {rel:.2e} (relative)"
    found = {}

    def suppress(side):
        return lambda: side.suppress_knowledge(prompts[0], TARGET, found["kns"] or [[0, 0]], quiet=True)[0]

    def check(op, out):
        if op == "get_refined_neurons":
            assert out["knowledge-neurons"] == out["kncore"], f"{name}: refined neurons differ"
            found["kns"] = out["kncore"]
            return
        for when in ("before", "after"):
            a, b = out["knowledge-neurons"][when], out["kncore"][when]
            assert a["argmax_completion"] == b["argmax_completion"], (name, when)
            for k in ("gt_prob", "argmax_prob"):
                assert abs(a[k] - b[k]) <= 1e-4 * max(abs(a[k]), 1e-30), (name, when, k, a[k], b[k])

    rows = []
    for op, make, flops in (("get_refined_neurons", refined, floor_flops(shape, T, STEPS, len(prompts))),
                            ("suppress_knowledge", suppress, None)):
        res, first = {}, {}
        for side_name, side in (("knowledge-neurons", peer), ("kncore", ours)):
            fn = make(side)
            first[side_name] = fn()  # warm-up; its result is checked
            times, mems = [], []
            for _ in range(runs):
                _, dt, mem = measure(fn)
                times.append(dt)
                mems.append(mem)
            res[side_name] = (statistics.median(times), max(mems))
        check(op, first)
        t_peer, m_peer = res["knowledge-neurons"]
        t_ours, m_ours = res["kncore"]
        rows.append(dict(case=name, op=op, n_prompts=len(prompts) if op == "get_refined_neurons" else 1,
                         tokens=T, steps=STEPS, n_kns=len(found["kns"]),
                         peer_s=round(t_peer, 4), kncore_s=round(t_ours, 4), speedup=round(t_peer / t_ours, 2),
                         peer_peak_mib=round(m_peer / 2 ** 20, 1), kncore_peak_mib=round(m_ours / 2 ** 20, 1),
                         floor_s=None if flops is None else round(flops / rate, 4),
                         kncore_x_floor=None if flops is None else round(t_ours / (flops / rate), 1),
                         score_rel_err=f"{rel:.1e}"))
        print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one run, GPT-2 shape only; writes no results")
    args = ap.parse_args()
    torch.manual_seed(0)
    Peer = peer_class()
    rate = matmul_rate()
    print(f"matmul rate: {rate / 1e9:.1f} GFLOP/s, threads: {torch.get_num_threads()}", flush=True)
    cases = ["gpt2-small"] if args.quick else list(SHAPES)
    rows = [r for c in cases for r in run_case(c, 1 if args.quick else args.runs, Peer, rate)]
    if args.quick:
        return
    tag = f"{machine()}_{commit()}"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_atomic(RESULTS / f"bench_compat_{tag}.csv", buf.getvalue())
    cmd = "flock /tmp/kncore-bench.lock .venv/bin/python bench/bench_compat.py" + \
        (f" --runs {args.runs}" if args.runs != 3 else "")
    md = [f"# bench_compat on {machine()} at {commit()}", "",
          f"`{cmd}`; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"matmul rate {rate / 1e9:.1f} GFLOP/s; median of {args.runs} runs after a warm-up.",
          "Same neurons and probabilities on both sides (checked); peak = resident memory above the call's start.",
          "GPU: not measured on GPU.", "",
          "| model | call | prompts | steps | knowledge-neurons s | kncore s | speed-up | peak MiB (peer / kncore) "
          "| kncore / FLOP floor |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fl = "" if r["kncore_x_floor"] is None else f"{r['kncore_x_floor']}x"
        md.append(f"| {r['case']} | {r['op']} | {r['n_prompts']} | {r['steps']} | {r['peer_s']} | {r['kncore_s']} "
                  f"| {r['speedup']}x | {r['peer_peak_mib']} / {r['kncore_peak_mib']} | {fl} |")
    write_atomic(RESULTS / f"bench_compat_{tag}.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
