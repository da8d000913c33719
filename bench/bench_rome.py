"""ROME in kncore against plain ROME (kmeng01/rome's algorithm, run as it runs).

    flock /tmp/kncore-bench.lock .venv/bin/python bench/bench_rome.py [--runs 3] [--texts 200] [--no-xl]
    python bench/bench_rome.py --device cuda      # the xl section on a GPU (CUDA events)

Neither ROME's repository nor EasyEdit installs here (no package on PyPI), so
the peer is :mod:`kncore.rome.reference`: ROME's ``compute_u``/``compute_v``
line by line on the Hugging Face model with forward hooks (one forward per
key, a full forward of every rewriting prompt with logits at every position
at each Adam step, ``torch.inverse`` of C), and for the statistics ROME's
``layer_stats`` loop (a Hugging Face forward stopped at the layer by an
exception, then ``mom2 += X^T X`` on the kept rows, one layer per pass).

Sections (SmolLM2-135M, the layer of kncore/rome/hparams/smollm2-135m.yaml):

* stats: tokens/s of ``layer_stats`` over ``--texts`` texts of the built-in
  corpus, against the plain runtime forward over the same batches (the bound:
  the statistics cannot be cheaper than the forward that produces the keys)
  and against ROME's loop; one layer, and three layers in one pass. Checks
  that both give the same C (relative error printed).
* edit: one edit with cached statistics and templates, kncore vs reference on
  the same rows; checks the same top-1 and the cosine of the two right vectors.
* mom2: the effect of ``mom2_adjustment`` on CounterFact records (efficacy,
  paraphrase and neighbourhood scores) when ../shared/data is present.
* xl: one kncore edit on a random model of GPT-2 XL shape (48 layers, d 1600,
  d_ff 6400, vocabulary 50257; 6 GB fp32) with a synthetic C, layer 17.
  The reference is not run there (a full 48-layer forward and backward of 22
  prompts per Adam step: tens of minutes on 2 cores).

Reported: medians of ``--runs`` runs after a warm-up, ratios, peak resident
memory above each call's start. Results: bench/results/bench_rome_<machine>_<commit>.{csv,md}.
GPU targets (GPT-J statistics projected to 100k documents <= 30 min on an
H100; one GPT-2 XL edit <= 1 s): ``--device cuda`` runs the xl section on the
GPU (the others need SmolLM2's GGUF package, which a device image lacks).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from bench._common import commit, machine, measure, run_once, write_atomic, write_csv  # noqa: E402

import kncore  # noqa: E402
from kncore import rome  # noqa: E402
from kncore.rome import editing, reference  # noqa: E402
from kncore.rome.corpus import open_corpus, take  # noqa: E402
from kncore.rome.stats import _batches, _encode  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DATA = Path(os.environ.get("KNCORE_DATA", ROOT.parent / "shared" / "data"))
REQ = {"prompt": "The capital of {} is", "subject": "Canada", "target_new": "Rome"}


WARMUP = True
DEVICE = "cpu"


def timed(fn, runs: int):
    """Warm-up, then (last result, median seconds, max peak bytes) over ``runs``."""
    if WARMUP:
        fn()
    ts, peaks, out = [], [], None
    for _ in range(runs):
        out, dt, pk = measure(fn, DEVICE)
        ts.append(dt)
        peaks.append(pk)
    return out, statistics.median(ts), max(peaks)


def matmul_rate() -> float:
    a, b = torch.randn(2048, 2048, device=DEVICE), torch.randn(2048, 2048, device=DEVICE)
    a @ b
    return 2 * 2048 ** 3 / statistics.median([run_once(lambda: a @ b)[0] for _ in range(5)])


# -- statistics ---------------------------------------------------------------------------

class _Stop(Exception):
    pass


def rome_stats(lm, layers, batches):
    """ROME's layer_stats: one pass per layer, HF forward stopped at the layer
    (nethook.Trace(stop=True)), mom2 += X^T X on the kept rows (float32)."""
    out = {}
    for L in layers:
        C = torch.zeros(lm.d_ff, lm.d_ff)
        n = 0
        store = {}

        def hook(m, i):
            store["x"] = i[0]
            raise _Stop

        h = lm.adapter.down_module(L).register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                for b in batches:
                    try:
                        lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask.long())
                    except _Stop:
                        pass
                    X = store["x"][b.attention_mask].float()
                    C.addmm_(X.T, X)
                    n += X.shape[0]
        finally:
            h.remove()
        out[L] = C / n
    return out


def plain_forward(lm, layers, batches):
    with torch.inference_mode():
        for b in batches:
            lm.run(b.input_ids, attention_mask=b.attention_mask, stop_layer=max(layers) + 1, logits=None)


def bench_stats(lm, L, n_texts, runs, rows):
    corp = open_corpus("pydoc", n_texts)
    texts = list(take(corp, n_texts))
    seqs = _encode(lm, texts, min(lm.adapter.n_ctx, 2048))
    batches = [lm.batch_ids([seqs[i] for i in idx]) for idx in _batches(seqs, rome.stats.DEFAULT_BATCH_TOKENS)]
    n_tok = sum(len(s) for s in seqs)
    for layers in ([L], [max(0, L - 2), L, min(lm.n_layers - 1, L + 2)]):
        _, t_fwd, _ = timed(lambda: plain_forward(lm, layers, batches), runs)
        ours, t_ours, m_ours = timed(lambda: rome.layer_stats(lm, layers, texts, n_samples=None, use_cache=False,
                                                              progress=False), runs)
        peer, t_peer, m_peer = timed(lambda: rome_stats(lm, layers, batches), runs)
        err = max(float((ours[l].second_moment - peer[l]).abs().max() / peer[l].abs().max()) for l in layers)
        rows.append(dict(section="stats", case=f"{len(layers)} layer(s) {layers}", n=f"{n_texts} texts, {n_tok} tokens",
                         peer_s=round(t_peer, 3), kncore_s=round(t_ours, 3), speedup=round(t_peer / t_ours, 2),
                         bound_s=round(t_fwd, 3), of_bound=round(t_fwd / t_ours, 3),
                         kncore_tok_s=round(n_tok / t_ours), bound_tok_s=round(n_tok / t_fwd),
                         peer_peak_mib=round(m_peer / 2 ** 20, 1), kncore_peak_mib=round(m_ours / 2 ** 20, 1),
                         check=f"C rel err {err:.1e}"))
        print(rows[-1], flush=True)
    return texts


# -- edits ------------------------------------------------------------------------------------

def bench_edit(lm, hp, stats, runs, rows):
    L = hp.layers[0]
    req = editing.parse_request(REQ)
    templates = rome.context_templates(lm, hp)
    rome_id = lm.token_id(" Rome")

    def ours():
        with rome.edit(lm, REQ, hp, stats=stats) as e:
            top = int(lm.next_token_probs(req.text())[0].argmax())
            return e.steps[0], top

    def peer():
        rows_ = editing.build_rows(lm, req, templates, hp.fact_token, hp.kl_prompts)
        return reference.update_ref(lm, L, req, rows_, hp, C=stats[L].second_moment)

    (step, top), t_ours, m_ours = timed(ours, runs)
    ref, t_peer, m_peer = timed(peer, runs)
    W, a, b = editing._orient(lm, L, ref["left"].to(lm.dtype), ref["right"].to(lm.dtype))
    W = W.data
    rec = editing._rank1(W, a, b)
    top_ref = int(lm.next_token_probs(req.text())[0].argmax())
    editing._rank1_undo(W, rec)
    cos = float(torch.nn.functional.cosine_similarity(step.right.double(), ref["right"].double(), dim=0))
    rows.append(dict(section="edit", case=f"SmolLM2-135M layer {L}, {hp.v_num_grad_steps} steps",
                     n=f"{len(templates)} templates", peer_s=round(t_peer, 3), kncore_s=round(t_ours, 3),
                     speedup=round(t_peer / t_ours, 2), peer_peak_mib=round(m_peer / 2 ** 20, 1),
                     kncore_peak_mib=round(m_ours / 2 ** 20, 1),
                     check=f"top-1 Rome: kncore {top == rome_id}, peer {top_ref == rome_id}; cos(right) {cos:.4f}"))
    print(rows[-1], flush=True)


def _logprob(lm, prompts, target):
    """Sum of log-probabilities of ``target``'s tokens after each prompt (teacher forced)."""
    seqs, spans = [], []
    for p in prompts:
        ids = lm.tokenize(p)
        t = lm.target_ids(p, target)
        seqs.append(ids + t)
        spans.append((len(ids), t))
    b = lm.batch_ids(seqs)
    with torch.no_grad():
        lp = lm.run(b.input_ids, attention_mask=b.attention_mask).logits.float().log_softmax(-1)
    out = []
    for i, (s, t) in enumerate(spans):
        out.append(sum(float(lp[i, s - 1 + j, tok]) for j, tok in enumerate(t)))
    return torch.tensor(out)


def bench_mom2(lm, hp, stats, rows, n_records):
    path = DATA / "counterfact" / "counterfact_azhx_test_split.json"
    if not path.is_file():
        print(f"mom2 section skipped: {path} absent")
        return
    recs = json.load(open(path))[:n_records]
    for mom2 in (True, False):
        eff, para, neigh, dneigh = [], [], [], []
        t0 = time.perf_counter()
        for r in recs:
            rw = r["requested_rewrite"]
            new, true = rw["target_new"]["str"], rw["target_true"]["str"]
            prompt = rw["prompt"].format(rw["subject"])
            before = _logprob(lm, r["neighborhood_prompts"], true) - _logprob(lm, r["neighborhood_prompts"], new)
            with rome.edit(lm, r, hp.replace(mom2_adjustment=mom2), stats=stats):
                eff.append(float(_logprob(lm, [prompt], new) > _logprob(lm, [prompt], true)))
                para.append(float((_logprob(lm, r["paraphrase_prompts"], new)
                                   > _logprob(lm, r["paraphrase_prompts"], true)).float().mean()))
                after = _logprob(lm, r["neighborhood_prompts"], true) - _logprob(lm, r["neighborhood_prompts"], new)
                neigh.append(float((after > 0).float().mean()))
                dneigh.append(float((before - after).mean()))
        dt = time.perf_counter() - t0
        m = lambda x: round(100 * statistics.mean(x), 1)
        rows.append(dict(section="mom2", case=f"mom2_adjustment={mom2}", n=f"{len(recs)} CounterFact records",
                         check=f"efficacy {m(eff)}%, paraphrase {m(para)}%, neighbourhood {m(neigh)}%, "
                               f"mean drop of log p(true)-log p(new) on neighbours {statistics.mean(dneigh):.3f}",
                         kncore_s=round(dt, 1)))
        print(rows[-1], flush=True)


def bench_xl(runs, rows, smoke=False):
    from kncore.testing import tiny_model, tiny_tokenizer
    t0 = time.perf_counter()
    # --smoke: 18 narrow layers (layer 17 is the edit layer), to check the code path only
    d, d_ff, n_layers, n_heads = (64, 256, 18, 4) if smoke else (1600, 6400, 48, 25)
    model = tiny_model("gpt2", d_model=d, d_ff=d_ff, n_layers=n_layers, n_heads=n_heads, n_ctx=1024,
                       vocab_size=50257)
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(DEVICE)
    lm = kncore.LM(model, tiny_tokenizer(), name="gpt2-xl-shape-random")
    print(f"built the GPT-2 XL-shape model on {DEVICE} in {time.perf_counter() - t0:.0f} s", flush=True)
    hp = rome.load_hparams("gpt2-xl")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8192, lm.d_ff, generator=g)
    C = X.T @ X / X.shape[0]  # synthetic second moment (random keys), well conditioned
    stats = {17: rome.LayerStats.from_tensor(17, C, n_tokens=X.shape[0])}
    req = {"prompt": "the capital of {} is", "subject": "canada", "target_new": "rome"}
    first = measure(lambda: rome.edit(lm, req, hp, stats=stats).undo(), DEVICE)
    _, t, pk = timed(lambda: rome.edit(lm, req, hp, stats=stats).undo(), max(1, runs - 1))
    rows.append(dict(section="xl", case=f"GPT-2 XL shape (random weights, synthetic C), layer 17, 20 steps, {DEVICE}",
                     n="21 templates", kncore_s=round(t, 2), kncore_peak_mib=round(pk / 2 ** 20, 1),
                     check=f"first edit (templates + Cholesky of C) {first[1]:.1f} s; reference not run"))
    print(rows[-1], flush=True)


def trace_layer(n_facts: int) -> None:
    """The evidence for SmolLM2's edit layer: ROME's causal trace (MLP, window
    10, 10 samples, noise 3 sd) averaged at the last subject token over the
    first ``n_facts`` known_1000 facts that SmolLM2 gets right."""
    from kncore.tracing import average_indirect_effect, trace
    path = DATA / "known" / "known_1000.json"
    if not path.is_file():
        raise SystemExit(f"{path} is absent")
    lm = kncore.load("smollm2-135m")
    known = []
    for r in json.load(open(path)):
        top = lm.tokenizer.decode([int(lm.next_token_probs(r["prompt"])[0].argmax())]).strip()
        if top and r["attribute"].startswith(top):
            known.append(r)
        if len(known) >= n_facts:
            break
    t0 = time.perf_counter()
    res = []
    for r in known:
        res.append(trace(lm, r["prompt"], r["subject"], kinds=("mlp",), samples=10, window=10))
        print(f"{len(res)}/{len(known)} traced, {time.perf_counter() - t0:.0f} s", flush=True)
    aie = average_indirect_effect(res)
    eff = aie.effect("mlp")
    out = {"model": "smollm2-135m", "facts": [r["known_id"] for r in known], "low": aie.low, "high": aie.high,
           "aie_last_subject_token": eff[2].tolist(), "aie_last_token": eff[5].tolist(),
           "peak_layer": int(eff[2].argmax()), "seconds": round(time.perf_counter() - t0, 1)}
    write_atomic(RESULTS / f"rome_layer_trace_{machine()}_{commit()}.json", json.dumps(out, indent=1))
    print("layer | AIE at the last subject token | AIE at the last token")
    for L in range(len(eff[2])):
        print(f"{L} | {eff[2][L]:.4f} | {eff[5][L]:.4f}")
    print(f"peak at layer {out['peak_layer']}; mean p clean {aie.high:.3f}, corrupted {aie.low:.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace-layer", type=int, metavar="N_FACTS", default=0,
                    help="only run the causal trace that chose SmolLM2's layer, over N_FACTS facts")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--records", type=int, default=5)
    ap.add_argument("--no-xl", action="store_true")
    ap.add_argument("--xl-only", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-warmup", action="store_true", help="time the first call (quick runs on a busy machine)")
    ap.add_argument("--smoke", action="store_true", help="the xl section on a narrow 18-layer model; writes nothing")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: the xl section only, on the GPU")
    args = ap.parse_args()
    if args.smoke:
        args.xl_only = True
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device")
        global DEVICE
        DEVICE = "cuda"
        args.xl_only, args.no_xl = True, False
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_warmup:
        global WARMUP
        WARMUP = False
    if args.trace_layer:
        torch.set_num_threads(1)  # 40x faster than 2 threads on the shared 2-core machine (tiny matmuls)
        trace_layer(args.trace_layer)
        return
    rate = matmul_rate()
    print(f"matmul rate {rate / 1e9:.0f} GFLOP/s, torch threads {torch.get_num_threads()}", flush=True)
    rows: list = []
    if not args.xl_only:
        lm = kncore.load("smollm2-135m")
        hp = rome.load_hparams("smollm2-135m")
        L = hp.layers[0]
        texts = bench_stats(lm, L, args.texts, args.runs, rows)
        stats = rome.layer_stats(lm, [L], texts, n_samples=None, use_cache=False, progress=False)
        bench_edit(lm, hp, stats, args.runs, rows)
        bench_mom2(lm, hp, stats, rows, args.records)
        del lm
    if args.smoke:
        bench_xl(1, rows, smoke=True)
        return
    if not args.no_xl:
        bench_xl(args.runs, rows)

    tag = f"{machine()}_{commit()}" + ("_xl" if args.xl_only else "")
    keys = ["section", "case", "n", "peer_s", "kncore_s", "speedup", "bound_s", "of_bound", "kncore_tok_s",
            "bound_tok_s", "peer_peak_mib", "kncore_peak_mib", "check"]
    write_csv(RESULTS / f"bench_rome_{tag}.csv", rows, keys)
    md = [f"# bench_rome on {machine()} at {commit()}", "",
          f"`flock /tmp/kncore-bench.lock .venv/bin/python bench/bench_rome.py {' '.join(sys.argv[1:])}`; "
          f"torch threads {torch.get_num_threads()}; matmul rate {rate / 1e9:.0f} GFLOP/s; "
          f"medians of {args.runs} runs{'' if WARMUP else ' (no warm-up)'}; "
          "peak = resident memory above the call's start.", "",
          "Peer: plain ROME (kncore.rome.reference; ROME's layer_stats loop for statistics). "
          "Bound: the plain runtime forward over the same batches, stopped after the last layer needed. "
          "kncore's statistics time includes tokenising and batching the texts; the peer and the bound "
          "get the batches ready-made.", "",
          "| section | case | size | peer s | kncore s | speed-up | forward bound s | kncore / bound | "
          "kncore tok/s | peak MiB (peer / kncore) | check |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['section']} | {r['case']} | {r.get('n', '')} | {r.get('peer_s', '')} | {r.get('kncore_s', '')} "
                  f"| {r.get('speedup', '')} | {r.get('bound_s', '')} | {r.get('of_bound', '')} | "
                  f"{r.get('kncore_tok_s', '')} | {r.get('peer_peak_mib', '')} / {r.get('kncore_peak_mib', '')} | "
                  f"{r.get('check', '')} |")
    md += ["", "GPU targets (GPT-J statistics over 100k documents <= 30 min on an H100; one GPT-2 XL edit "
               "<= 1 s): " + (f"the xl edit measured on {torch.cuda.get_device_name()}; GPT-J statistics not "
                              "measured." if DEVICE == "cuda" else "not measured on GPU.")]
    write_atomic(RESULTS / f"bench_rome_{tag}.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
