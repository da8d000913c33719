"""How many tokens MEMIT's layer statistics need: converged statistics against full ones, on SmolLM2.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/bench_stats_convergence.py [--records 20]
        [--tols 0.3,0.1,0.03,0.01]

SmolLM2-135M, MEMIT with kncore/rome/hparams/MEMIT/smollm2-135m.yaml (layers 2-5,
statistics of the pydoc corpus: every text, ~110k tokens per layer, the "full"
statistics here; ROME and MEMIT read 100,000 Wikipedia texts, which are not on
this machine). The first ``--records`` CounterFact records form one batch; the
probe keys are their subjects' keys at the edit layers
(:func:`kncore.rome.probe_keys_for`).

1. z for the batch, once (:func:`kncore.rome.memit.compute_targets`): z does not
   depend on C, so every variant below edits with the same targets and differs
   only in its statistics. It is kept in ``$KNCORE_CACHE/bench_z`` between runs,
   in pieces of 4 requests (its seconds are those of the runs that computed it).
2. Full statistics: ``layer_stats`` over the whole corpus with probes and no stop
   (timed, checks included): the same C as without probes, and the change history
   of the whole stream.
3. For each tolerance: ``layer_stats(..., until="converged", tol=t)`` (timed),
   the tokens it read and the change at its stop (skipped where the full run's
   history shows it would not stop before the end of the corpus).
4. For every set of statistics: MEMIT with the shared z, ROME's CounterFact scores
   ES, PS, NS with the batch applied, then undo (checked bit for bit).

The answer: the fewest tokens at which ES, PS and NS are all within 1 point
(0.01) of the full-statistics edit, and the statistics time it saves.
Results: bench/results/bench_stats_convergence_<machine>_<commit>.{md,json}.
GPT-J and GPU: not measured on GPU.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from bench._common import commit, machine, write_atomic  # noqa: E402
from bench.bench_memit import bits, records, scores  # noqa: E402

import kncore  # noqa: E402
from kncore import rome  # noqa: E402
from kncore.rome import memit  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WITHIN = 0.01  # "within 1 point": ES, PS and NS are fractions in [0, 1]


Z_CHUNK = 4  # requests per cached piece of z: a run cut short keeps the pieces it finished


def cached_targets(lm, reqs, parsed, hp, templates):
    """z for the batch and the seconds it took, kept in kncore's cache between runs
    (safetensors, one file per piece of ``Z_CHUNK`` requests, keyed by the model,
    hparams, requests and templates): z does not depend on the statistics, and on
    a shared 2-core machine it is most of a run. Each request's z is its own
    optimisation (its own loss, early stop and clamp), so pieces give the z of
    the whole batch."""
    from dataclasses import asdict

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from kncore.loading import cache_root
    from kncore.rome.editing import build_rows
    zs, losses, ps, seconds = [], [], [], 0.0
    for c in range(0, len(parsed), Z_CHUNK):
        part = parsed[c:c + Z_CHUNK]
        key = hashlib.sha256(json.dumps({"model": lm.fingerprint(), "hp": asdict(hp), "reqs": reqs[c:c + Z_CHUNK],
                                         "templates": templates}, sort_keys=True, default=str).encode()).hexdigest()
        path = cache_root() / "bench_z" / f"z-{key[:16]}.safetensors"
        if not path.is_file():
            t = time.perf_counter()
            Z, _, ls, p = memit.compute_targets(lm, part, hp, templates)
            dt = time.perf_counter() - t
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"Z": Z.detach().cpu().contiguous()}, str(tmp),
                      metadata={"seconds": str(dt), "losses": json.dumps([[float(x) for x in v] for v in ls]),
                                "p_target": json.dumps([float(x) for x in p])})
            os.replace(tmp, path)
            print(f"z for requests {c}..{c + len(part) - 1}: {dt:.1f} s", flush=True)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        zs.append(load_file(str(path))["Z"].to(lm.device))
        losses += json.loads(meta["losses"])
        ps += json.loads(meta["p_target"])
        seconds += float(meta["seconds"])
    rows = [build_rows(lm, r, templates, hp.fact_token, hp.kl_prompts) for r in parsed]
    return (torch.cat(zs, 1), rows, losses, ps), seconds


def _g(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20)
    ap.add_argument("--tols", default="0.3,0.1,0.03,0.01")
    ap.add_argument("--check-every", type=int, default=0, help="tokens between checks (0: d_ff)")
    ap.add_argument("--steps", type=int, default=0, help="v* steps (0: the hparams file's)")
    ap.add_argument("--n-samples", type=int, default=0, help="texts of the corpus (0: the hparams', all of pydoc)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    lm = kncore.load("smollm2-135m")
    hp = rome.load_hparams("smollm2-135m", memit.MEMITHparams)
    if args.steps:
        hp.v_num_grad_steps = args.steps
    layers = sorted(hp.layers)
    every = args.check_every or lm.d_ff
    tols = [float(x) for x in args.tols.split(",") if x]
    recs, reqs = records(lm, args.records, hp)
    probes = rome.probe_keys_for(lm, reqs, layers)
    common = dict(n_samples=args.n_samples or hp.mom2_n_samples, dtype=hp.mom2_dtype, use_cache=False, progress=False)

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    parsed = memit.check_batch(lm, reqs, hp)
    templates = rome.context_templates(lm, hp)
    targets, t_z = cached_targets(lm, reqs, parsed, hp, templates)
    print(f"z for {len(reqs)} records: {t_z:.1f} s", flush=True)

    # The full statistics, watched: the same C as without probes (tested), and the
    # whole stream's change history. Its time includes the checks, as the converged
    # runs' times do.
    full, t_full = timed(lambda: rome.layer_stats(lm, layers, hp.mom2_dataset, probe_keys=probes,
                                                  check_every=every, **common))
    n_full, n_texts = full[layers[0]].n_tokens, full[layers[0]].n_texts
    hist = full[layers[0]].convergence["history"]
    print(f"full statistics: {n_full:,} tokens, {t_full:.1f} s with {len(hist)} checks", flush=True)

    def edit_scores(st):
        before = bits(lm, layers)
        e = memit.batch_edit(lm, reqs, hp, stats=st, targets=targets)
        sc = scores(lm, recs)
        e.undo()
        after = bits(lm, layers)
        exact = all(torch.equal(before[L].view(torch.int32), after[L].view(torch.int32)) for L in layers)
        return {k: round(float(v), 4) for k, v in sc.items()}, exact

    def report(rows, final):
        """Write the results so far (after every row: a run cut short still leaves them)."""
        for r in rows:
            r["within_1pt"] = all(abs(r[k] - ref[k]) <= WITHIN + 1e-9 for k in ("ES", "PS", "NS"))
        ok = [r for r in rows[1:] if r["within_1pt"] and r.get("stopped")]
        # the answer must hold from there on: the fewest tokens such that every variant
        # with at least as many tokens is within 1 point too
        best = None
        for r in sorted(ok, key=lambda r: r["tokens"]):
            if all(x["within_1pt"] for x in rows[1:] if x["tokens"] >= r["tokens"]):
                best = r
                break
        tag = f"{machine()}_{commit()}"
        cmd = ("OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/bench_stats_convergence.py "
               + " ".join(sys.argv[1:]))
        summary = {"machine": machine(), "commit": commit(), "command": cmd.strip(), "model": "smollm2-135m",
                   "layers": layers, "records": len(reqs), "corpus": hp.mom2_dataset, "check_every": every,
                   "v_num_grad_steps": hp.v_num_grad_steps, "z_seconds": round(t_z, 1),
                   "full_tokens": n_full, "full_seconds": round(t_full, 1),
                   "history": [{"tokens": h["tokens"], "change": h["change"]} for h in hist], "rows": rows,
                   "answer": None if best is None else {"tokens": best["tokens"], "tol": best["tol"],
                                                       "fraction_of_full": round(best["tokens"] / n_full, 3),
                                                       "seconds": best["seconds"], "full_seconds": round(t_full, 1),
                                                       "saved_seconds": round(t_full - best["seconds"], 1)},
                   "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
                   "wall_seconds": round(time.perf_counter() - t_start, 1)}
        write_atomic(RESULTS / f"bench_stats_convergence_{tag}.json", json.dumps(summary, indent=1) + "\n")
        md = [f"# bench_stats_convergence on {machine()} at {commit()}", "",
              f"`{summary['command']}`; torch threads {torch.get_num_threads()}, load average "
              f"{', '.join(f'{x:.1f}' for x in summary['load_avg'])} at the end (a shared machine); one run each.", "",
              f"SmolLM2-135M, MEMIT layers {layers}, the first {len(reqs)} CounterFact records in one batch, "
              f"z computed once ({t_z:.0f} s, {hp.v_num_grad_steps} v* steps) and shared by every row; probes: the "
              f"records' subjects' keys; a check every {every} tokens. Full: the first {n_texts} texts of the "
              f"{hp.mom2_dataset} corpus ({n_full:,} tokens per layer; ROME/MEMIT use 100,000 Wikipedia texts, "
              f"not on this machine). Seconds: the "
              f"statistics alone, checks included ({len(hist)} in the full run). ES/PS/NS: ROME's CounterFact "
              f"scores with the batch applied.", "",
              "| statistics | tokens | texts | seconds | change at stop | ES | PS | NS | within 1 pt of full "
              "| undo exact |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ch = r.get("change_at_stop")
            md.append(f"| {r['stats']} | {r['tokens']:,} | {r['texts']} | {r['seconds']} | {_g(ch)} | {r['ES']} "
                      f"| {r['PS']} | {r['NS']} | {'yes' if r['within_1pt'] else 'no'} | {r['undo_exact']} |")
        md.append("")
        if best is None:
            md.append("No tolerance gave ES, PS and NS within 1 point of the full statistics.")
        else:
            a = summary["answer"]
            md.append(f"**{a['tokens']:,} tokens per layer ({a['fraction_of_full']:.0%} of the full corpus, tol "
                      f"{a['tol']:g}) give ES, PS and NS within 1 point of the full-statistics edit: statistics in "
                      f"{a['seconds']} s instead of {a['full_seconds']} s.**")
        md += ["", "Change history of the full stream (tokens: relative change of C^-1 k, max over probes and "
                   "layers; - before two solvable checks):", "",
                   " ".join(f"{h['tokens']}:{_g(h['change'])}" for h in hist), "",
               "GPT-J (the peers' 36 hours) and any GPU figure: not measured on GPU."]
        write_atomic(RESULTS / f"bench_stats_convergence_{tag}.md", "\n".join(md) + "\n")
        if final:
            print("\n".join(md))

    ref, exact = edit_scores(full)
    rows = [{"stats": "full", "tokens": n_full, "texts": full[layers[0]].n_texts, "seconds": round(t_full, 1),
             "change_at_stop": full[layers[0]].convergence["change_at_stop"], **ref, "undo_exact": exact}]
    print(rows[-1], flush=True)
    report(rows, False)
    ch = [h["change"] for h in hist]
    for tol in tols:
        # a run stopped by tol reads a prefix of this stream: where none would stop
        # before the end, it is the full run again, and is not repeated
        if not any(a is not None and b is not None and a < tol and b < tol for a, b in zip(ch, ch[1:-1])):
            rows.append({"stats": f"tol {tol:g}", "tol": tol, "tokens": n_full, "texts": full[layers[0]].n_texts,
                         "seconds": round(t_full, 1), "stopped": False, "change_at_stop": ch[-1], **ref,
                         "undo_exact": exact, "note": "does not converge within the corpus (the full run)"})
            report(rows, False)
            continue
        st, t = timed(lambda: rome.layer_stats(lm, layers, hp.mom2_dataset, probe_keys=probes, check_every=every,
                                               until="converged", tol=tol, **common))
        conv = st[layers[0]].convergence
        sc, exact = edit_scores(st)
        rows.append({"stats": f"tol {tol:g}", "tol": tol, "tokens": st[layers[0]].n_tokens,
                     "texts": st[layers[0]].n_texts, "seconds": round(t, 1), "stopped": conv["stopped"],
                     "change_at_stop": conv["change_at_stop"], **sc, "undo_exact": exact})
        print(rows[-1], flush=True)
        report(rows, False)
    report(rows, True)



if __name__ == "__main__":
    main()
