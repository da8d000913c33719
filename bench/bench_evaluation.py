"""kncore.evaluation against the reference evaluation code, on SmolLM2-135M.

    flock /tmp/kncore-bench.lock .venv/bin/python bench/bench_evaluation.py [--runs 3] [--quick]

Two jobs, each side by side in this process on the same model and inputs:

* ``counterfact``: the probabilities of ``target_new`` and ``target_true``
  after every rewrite, paraphrase and neighbourhood prompt of 12 CounterFact
  cases (156 prompts, 312 prompt-target pairs: what ES/PS/NS/EM are computed
  from). Peer: ROME's ``test_batch_prediction`` (eval_utils_counterfact.py),
  transcribed onto the Hugging Face model: one right-padded batch per case
  with a row per (prompt, target), logits at every position. kncore:
  :func:`kncore.evaluation.score_targets` over the same pairs (rows shared by
  the candidates of one prompt, the head only where a target is read).
  Checked equal: ROME's mean token NLL of each target, to 1e-4.
* ``blimp``: full-sentence log-probabilities of 100 BLiMP pairs (two
  paradigms, 200 sentences), BLiMP's standard metric. Peer:
  lm-evaluation-harness's way on the Hugging Face model (a BOS-prefixed, right-padded batch, log-softmax over
  every position). kncore: :func:`kncore.evaluation.sentence_logprobs`.
  Checked equal to 1e-3 (absolute, on sums of ~10 log-probs).

Reported: median wall time of ``--runs`` runs after a warm-up, the ratio,
peak resident memory above the call's start (sampled every 2 ms), and the FLOP
floor: 2 x (block parameters) per distinct token that must be computed, plus
2 x d_model x vocabulary per position whose prediction is read, at the
machine's measured matmul rate. Results:
bench/results/bench_evaluation_<machine>_<commit>.{csv,md}.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from bench._common import commit, machine, write_atomic, peak_rss as measure  # noqa: E402

import kncore  # noqa: E402
import kncore.data as D  # noqa: E402
from kncore import evaluation as E  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BATCH = 32


def matmul_rate() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * 2048 ** 3 / statistics.median(ts)


def block_params(lm) -> int:
    emb = {id(p) for p in lm.adapter.embedding_module().parameters()}
    return sum(p.numel() for n, p in lm.model.named_parameters() if id(p) not in emb and "layers." in n)


# -- the peers -------------------------------------------------------------------------
@torch.no_grad()
def rome_test_batch_prediction(model, tok, prefixes, target_new, target_true):
    """ROME's test_batch_prediction (eval_utils_counterfact.py), on the CPU:
    mean NLL of each target after each prefix."""
    prefix_lens = [len(n) for n in tok(prefixes)["input_ids"]]
    prompt_tok = tok([f"{prefix} {suffix}" for prefix in prefixes for suffix in [target_new, target_true]],
                     padding=True, return_tensors="pt")
    a_tok, b_tok = (tok(f" {n}")["input_ids"] for n in [target_new, target_true])
    logits = model(**prompt_tok).logits
    out = []
    for i in range(logits.size(0)):
        toks = a_tok if i % 2 == 0 else b_tok
        nll = 0.0
        for j, t in enumerate(toks):
            nll += -torch.nn.functional.log_softmax(logits[i, prefix_lens[i // 2] + j - 1, :], dim=0)[t].item()
        out.append(nll / len(toks))
    return [{"target_new": out[i], "target_true": out[i + 1]} for i in range(0, len(out), 2)]


@torch.no_grad()
def harness_sentence_logprobs(lm, sentences, batch_size=BATCH):
    """lm-evaluation-harness's loglikelihood of a sentence with empty context:
    BOS-prefixed, right-padded batches, log-softmax at every position."""
    pre = lm.tokenizer.bos_token_id if lm.tokenizer.bos_token_id is not None else lm.tokenizer.eos_token_id
    seqs = [[pre] + lm.tokenizer(s, add_special_tokens=False)["input_ids"] for s in sentences]
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s: s + batch_size]
        T = max(map(len, chunk))
        ids = torch.full((len(chunk), T), lm.pad_id)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for i, q in enumerate(chunk):
            ids[i, : len(q)] = torch.tensor(q)
            mask[i, : len(q)] = 1
        lp = lm.model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
        for i, q in enumerate(chunk):
            tgt = torch.tensor(q[1:])
            out.append(lp[i, : len(q) - 1].gather(1, tgt[:, None]).sum().item())
    return out


# -- jobs --------------------------------------------------------------------------------
def counterfact_job(lm, n_cases):
    recs = D.load_counterfact()[:n_cases]
    tok = lm.tokenizer
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    groups = [[r.rewrite_prompt] + r.paraphrase_prompts + r.neighborhood_prompts for r in recs]

    def peer():
        return [rome_test_batch_prediction(lm.model, tok, g, r.target_new, r.target_true)
                for g, r in zip(groups, recs)]

    prompts = [p for g in groups for p in g for _ in range(2)]
    targets = [t for g, r in zip(groups, recs) for _ in g for t in (r.target_new, r.target_true)]

    def ours():
        return E.score_targets(lm, prompts, targets, batch_size=BATCH)

    a, b = peer(), ours()
    flat = [x for case in a for d in case for x in (d["target_new"], d["target_true"])]
    mine = [-s.logprob / len(s.ids) for s in b]
    err = max(abs(x - y) for x, y in zip(flat, mine))
    assert err <= 1e-4, f"counterfact: mean NLL differs by {err:.2e}"
    # FLOP floor: every distinct sequence's tokens once, the head where a target is read
    reqs = {}
    heads = 0
    for s in b:
        ids = lm.tokenize(s.prompt)
        reqs[tuple(ids + s.ids[:-1])] = 1
        heads += len(s.ids)
    toks = sum(len(k) for k in reqs)
    info = dict(items=len(prompts), tokens=toks, head_positions=heads, max_err=err)
    return peer, ours, info


def blimp_job(lm, n_pairs):
    sents = []
    for par in ("determiner_noun_agreement_2", "regular_plural_subject_verb_agreement_1"):
        for p in D.load_blimp(par)[: n_pairs // 2]:
            sents += [p.sentence_good, p.sentence_bad]

    def peer():
        return harness_sentence_logprobs(lm, sents)

    def ours():
        return E.sentence_logprobs(lm, sents, batch_size=BATCH)

    a, b = peer(), ours()
    err = max(abs(x - y) for x, y in zip(a, b))
    assert err <= 1e-3, f"blimp: log-probs differ by {err:.2e}"
    toks = sum(len(lm.tokenize(s)) + 1 for s in sents)
    info = dict(items=len(sents), tokens=toks, head_positions=toks - len(sents), max_err=err)
    return peer, ours, info


def _fixed_mmap_threshold():
    """Re-run with glibc's mmap threshold fixed at 64 KiB: by default glibc
    raises it after the first large free, so the second side's tensors reuse
    heap the first side left and its resident-memory peak reads 0."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def main():
    _fixed_mmap_threshold()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one run, small sizes; writes no results")
    args = ap.parse_args()
    lm = kncore.load("smollm2-135m")
    rate = matmul_rate()
    per_tok = 2 * block_params(lm)
    head = 2 * lm.d_model * lm.adapter.vocab_size
    print(f"matmul rate: {rate / 1e9:.1f} GFLOP/s, threads: {torch.get_num_threads()}", flush=True)
    runs = 1 if args.quick else args.runs
    jobs = [("counterfact", counterfact_job, 4 if args.quick else 12), ("blimp", blimp_job, 20 if args.quick else 100)]
    rows = []
    for name, job, size in jobs:
        peer, ours, info = job(lm, size)
        res = {}
        for side, fn in (("peer", peer), ("kncore", ours)):
            fn()
            ts, ms = [], []
            for _ in range(runs):
                _, dt, mem = measure(fn)
                ts.append(dt)
                ms.append(mem)
            res[side] = (statistics.median(ts), max(ms))
        floor = (info["tokens"] * per_tok + info["head_positions"] * head) / rate
        rows.append(dict(job=name, items=info["items"], tokens=info["tokens"], peer_s=round(res["peer"][0], 3),
                         kncore_s=round(res["kncore"][0], 3), speedup=round(res["peer"][0] / res["kncore"][0], 2),
                         peer_peak_mib=round(res["peer"][1] / 2 ** 20, 1),
                         kncore_peak_mib=round(res["kncore"][1] / 2 ** 20, 1), floor_s=round(floor, 3),
                         kncore_x_floor=round(res["kncore"][0] / floor, 1), max_err=f"{info['max_err']:.1e}"))
        print(rows[-1], flush=True)
    if args.quick:
        return
    tag = f"{machine()}_{commit()}"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_atomic(RESULTS / f"bench_evaluation_{tag}.csv", buf.getvalue())
    cmd = "flock /tmp/kncore-bench.lock .venv/bin/python bench/bench_evaluation.py" + \
        (f" --runs {args.runs}" if args.runs != 3 else "")
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    md = [f"# bench_evaluation on {machine()} at {commit()}", "",
          f"`{env}{cmd}`; SmolLM2-135M fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"matmul rate {rate / 1e9:.1f} GFLOP/s; median of {runs} runs after a warm-up; batch {BATCH}.",
          "Peers: ROME's test_batch_prediction (counterfact), lm-evaluation-harness's sentence log-likelihood "
          "(blimp), both on the Hugging Face model. Same numbers on both sides (max_err). Peak = resident "
          "memory above the call's start.", "GPU: not measured on GPU.", "",
          "| job | items | tokens | peer s | kncore s | speed-up | peak MiB (peer / kncore) | kncore / FLOP floor "
          "| max err |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['job']} | {r['items']} | {r['tokens']} | {r['peer_s']} | {r['kncore_s']} | "
                  f"{r['speedup']}x | {r['peer_peak_mib']} / {r['kncore_peak_mib']} | {r['kncore_x_floor']}x | "
                  f"{r['max_err']} |")
    write_atomic(RESULTS / f"bench_evaluation_{tag}.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
