"""MEMIT in kncore against plain MEMIT (kmeng01/memit's algorithm, run as it runs), on SmolLM2.

    flock /tmp/kncore-bench.lock .venv/bin/python bench/bench_memit.py [--sizes 1,10,100] [--ref-sizes 1,10,100]
        [--step-sizes 1000] [--dtype float64]

The peer is :func:`kncore.rome.reference.memit_ref`: ``execute_memit`` line by
line on the Hugging Face model with forward hooks (``compute_z`` one request
at a time with a full forward of every rewriting prompt at every Adam step,
``compute_ks`` one forward per key, ``torch.linalg.solve`` in float64, each
layer's update added before the next layer's keys are read). Neither MEMIT's
repository nor EasyEdit installs here (no package on PyPI).

For each batch size N (the first N CounterFact records of the shared split,
hparams kncore/rome/hparams/MEMIT/smollm2-135m.yaml, statistics of the pydoc
corpus cached under $KNCORE_CACHE/rome_stats):

* kncore: seconds for the whole batch and per edit, peak resident memory
  above the call's start; ES, PS, NS and S (ROME's CounterFact scores,
  :func:`kncore.evaluation.evaluate_edits` with the batch applied); undo
  checked bit for bit on every edited weight.
* peer (for N in ``--ref-sizes``): seconds and peak memory; the update of each
  layer compared with kncore's (max |difference| / max |peer|, over layers), and
  each request's z.
* update step (for N in ``--step-sizes``): the peer's keys, solves and layer
  spreading on kncore's z (``memit_ref(z=...)``), where the plain z loop would
  take hours: its time and its update's error.

Target: at least 3x the peer's speed at N = 100 with the same update to 1e-4
relative. Results: bench/results/bench_memit_<machine>_<commit>.{csv,md}.
GPU (GPT-J shape at N = 1000, statistics projected to convergence): not
measured on GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from bench._common import commit, machine, measure, write_atomic, write_csv  # noqa: E402

import kncore  # noqa: E402
from kncore import evaluation as E  # noqa: E402
from kncore import rome  # noqa: E402
from kncore.data import load_counterfact  # noqa: E402
from kncore.rome import editing, memit, reference  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DATA = Path(os.environ.get("KNCORE_DATA", ROOT.parent / "shared" / "data"))


def records(lm, n: int, hp):
    """The first n CounterFact records that form a valid batch (no subject/relation
    asked twice with different targets)."""
    out, seen = [], set()
    for r in load_counterfact(data_dir=DATA):
        key = (r.subject, r.relation_id)
        if key in seen:
            continue
        seen.add(key)
        out.append(r)
        if len(out) == n:
            break
    reqs = [{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new, "relation_id": r.relation_id}
            for r in out]
    memit.check_batch(lm, reqs, hp)
    return out, reqs


def scores(lm, recs) -> dict:
    """ES, PS, NS, S of the model as it is (the batch applied)."""
    rows = E.evaluate_edits(lm, [E.counterfact_case(r) for r in recs], None)  # the batch is already applied
    s = E.summarise_edits(rows)
    return {k: s.get(k, float("nan")) for k in ("ES", "PS", "NS", "S")}


def rel_err(a, b, dim=None):
    """max |a - b| / max |b|, in float64: a float over the whole tensors, or a
    tensor of them over ``dim`` (per request, for z's columns)."""
    d, m = (a.double() - b.double()).abs(), b.double().abs()
    return (d.max() / m.max()).item() if dim is None else d.amax(dim) / m.amax(dim)


def bits(lm, layers):
    return {L: lm.adapter.down_module(L).weight.detach().clone() for L in layers}


def write(rows: list, st, hp, suffix: str = "", model_dtype: str = "float32") -> str:
    """Write the table of the sizes done so far (after each size: a stopped run keeps its rows)."""
    tag = f"{machine()}_{commit()}{suffix}"
    keys = ["n", "kncore_s", "kncore_s_per_edit", "peer_s", "peer_s_per_edit", "speedup", "update_rel_err",
            "z_rel_err", "z_worst", "peer_step_s", "step_rel_err", "kncore_peak_mib", "peer_peak_mib",
            "ES", "PS", "NS", "S", "undo_exact"]
    write_csv(RESULTS / f"bench_memit_{tag}.csv", rows, keys)
    md = [f"# bench_memit on {machine()} at {commit()}", "",
          f"`flock /tmp/kncore-bench.lock .venv/bin/python bench/bench_memit.py {' '.join(sys.argv[1:])}`; "
          f"model dtype {model_dtype}; torch threads {torch.get_num_threads()}; one run per size (the shared "
          f"2-core machine); "
          f"statistics: pydoc corpus, {st[hp.layers[0]].n_tokens:,} tokens per layer; MEMIT layers {hp.layers}.",
          "", "Peer: plain MEMIT (kncore.rome.reference.memit_ref). Update error: max over layers of "
          "max |kncore - peer| / max |peer| of the layer's update; z error: the largest over requests of "
          "max |z_kncore - z_peer| / max |z_peer| (request index in the batch); update step: the peer's keys, "
          "solves and layer spreading on kncore's z. Peak: resident memory above the call's start. "
          "ES/PS/NS/S: ROME's CounterFact scores with the whole batch applied.", "",
          "| N | kncore s | s/edit | peer s | peer s/edit | speed-up | update rel err | z rel err (request) "
          "| peer update step s | update step rel err | peak MiB (kncore / peer) | ES | PS | NS | S | undo exact |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = lambda k: r.get(k, "")  # noqa: E731
        md.append(f"| {g('n')} | {g('kncore_s')} | {g('kncore_s_per_edit')} | {g('peer_s')} | {g('peer_s_per_edit')} "
                  f"| {g('speedup')} | {g('update_rel_err')} | {g('z_rel_err')} ({g('z_worst')}) "
                  f"| {g('peer_step_s')} | {g('step_rel_err')} | {g('kncore_peak_mib')} / {g('peer_peak_mib')} "
                  f"| {g('ES')} | {g('PS')} | {g('NS')} | {g('S')} | {g('undo_exact')} |")
    md += ["", "GPU (GPT-J shape, N = 1000; statistics projected to convergence): not measured on GPU."]
    write_atomic(RESULTS / f"bench_memit_{tag}.md", "\n".join(md) + "\n")
    return "\n".join(md)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,10,100")
    ap.add_argument("--ref-sizes", default="1,10,100")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-eval", action="store_true", help="skip ES/PS/NS")
    ap.add_argument("--step-sizes", default="", help="sizes at which the plain update step runs on kncore's z "
                    "(the plain z loop is skipped): the update step's own error and time")
    ap.add_argument("--suffix", default="", help="appended to the results' file names (runs split over sizes)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="the model's dtype, for both editors (float64: the update without the float32 rounding "
                    "that Adam amplifies where a request's loss is flat; the statistics are those of the "
                    "float64 model)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    ref_sizes = {int(x) for x in args.ref_sizes.split(",") if x}
    step_sizes = {int(x) for x in args.step_sizes.split(",") if x}
    lm = kncore.load("smollm2-135m", dtype=args.dtype)
    hp = rome.load_hparams("smollm2-135m", memit.MEMITHparams)
    st = rome.layer_stats(lm, hp.layers, hp.mom2_dataset, n_samples=hp.mom2_n_samples, dtype=hp.mom2_dtype,
                          progress=False)
    C = {L: st[L].second_moment for L in hp.layers}
    templates = rome.context_templates(lm, hp)
    groups = memit.template_groups(hp, templates)
    print(f"statistics: {st[hp.layers[0]].n_tokens:,} tokens per layer; layers {hp.layers}; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    rows = []
    for n in sizes:
        recs, reqs = records(lm, n, hp)
        before = bits(lm, hp.layers)
        e, t_ours, peak_ours = measure(lambda: memit.memit_edit(lm, reqs, hp, stats=st))
        ours = {s.layer: (s.right.double() @ s.left.double().T) for s in e.steps}
        Z = e.steps[0].z.double()  # the targets z, one column per request
        sc = {} if args.no_eval else scores(lm, recs)
        e.undo()
        after = bits(lm, hp.layers)
        exact = all(torch.equal(before[L].view(torch.int32), after[L].view(torch.int32)) for L in hp.layers)
        row = {"n": n, "kncore_s": round(t_ours, 2), "kncore_s_per_edit": round(t_ours / n, 3),
               "kncore_peak_mib": round(peak_ours / 2**20), "undo_exact": exact, **{k: round(v, 4) for k, v in sc.items()}}
        print(row, flush=True)
        if n in ref_sizes:
            parsed = [editing.parse_request(r) for r in reqs]
            ref, t_ref, peak_ref = measure(lambda: reference.memit_ref(lm, parsed, hp, C, templates, groups))
            err = max(rel_err(ours[L], ref["updates"][L]) for L in hp.layers)
            zr = ref["z"]
            zerr = rel_err(Z, zr, dim=0)  # per request (the columns)
            row.update(peer_s=round(t_ref, 2), peer_s_per_edit=round(t_ref / n, 3),
                       peer_peak_mib=round(peak_ref / 2**20), speedup=round(t_ref / t_ours, 2),
                       update_rel_err=f"{err:.1e}", z_rel_err=f"{zerr.max().item():.1e}",
                       z_worst=int(zerr.argmax()))
            print(row, flush=True)
        if n in step_sizes:  # the update step alone, on kncore's z (the plain z loop at this N takes hours)
            parsed = [editing.parse_request(r) for r in reqs]
            ref, t_step, _ = measure(lambda: reference.memit_ref(lm, parsed, hp, C, templates, groups, z=Z))
            err = max(rel_err(ours[L], ref["updates"][L]) for L in hp.layers)
            row.update(peer_step_s=round(t_step, 2), step_rel_err=f"{err:.1e}")
            print(row, flush=True)
        rows.append(row)
        write(rows, st, hp, args.suffix, args.dtype)

    print(write(rows, st, hp, args.suffix, args.dtype))


if __name__ == "__main__":
    main()
