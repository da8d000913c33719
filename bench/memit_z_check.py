"""Per-request z of kncore's MEMIT against plain MEMIT's compute_z, on SmolLM2:
where the batched update of bench_memit.py differs from the peer's, which
requests carry it, and whether it is rounding (float32) or the algorithm
(float64 makes rounding vanish).

    python bench/memit_z_check.py --n 100 --requests 39 31 --dtypes float32 float64

For each request (its index among the first N CounterFact records of a valid
batch, as bench_memit.py picks them) and dtype: kncore's z optimised alone,
the peer's (``reference.delta_ref``, MEMIT's init at the layer output), and
in the first dtype kncore's z optimised in the whole batch of N (the
``batch_requests`` chunks bench_memit runs). With float32 and float64 both
given, each request's float32 z (the peer's and kncore's) is also compared with
the peer's float64 z: how far float32 rounding alone moves the reference itself.
Errors: bench_memit.rel_err, max |a - b| / max |b|.
Prints; writes nothing. GPU: not measured on GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import kncore  # noqa: E402
from kncore import rome  # noqa: E402
from kncore.rome import editing, memit, reference  # noqa: E402

import bench_memit  # noqa: E402
from bench_memit import rel_err  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--requests", type=int, nargs="+", required=True)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    args = ap.parse_args()
    bad = [j for j in args.requests if not 0 <= j < args.n]
    if bad:
        ap.error(f"--requests {bad} outside the batch of --n {args.n}")
    z = {}  # (dtype, request, "peer", "kncore" alone or kncore in the "batch") -> z, float64
    for k, dt in enumerate(args.dtypes):
        lm = kncore.load("smollm2-135m", dtype=dt)
        hp = rome.load_hparams("smollm2-135m", memit.MEMITHparams)
        templates = rome.context_templates(lm, hp)
        _, reqs = bench_memit.records(lm, args.n, hp)
        parsed = [editing.parse_request(r) for r in reqs]
        zL = max(hp.layers)
        batched = memit.compute_targets(lm, parsed, hp, templates)[0] if k == 0 else None
        for j in args.requests:
            rows = editing.build_rows(lm, parsed[j], templates, hp.fact_token, hp.kl_prompts)
            delta, init, lr = reference.delta_ref(lm, zL, rows, hp, init="layer")
            z_peer = init.double() + delta.double()
            dk, ik, lk, _ = editing.optimise_deltas(lm, zL, [rows], hp, init_site="resid_post")[0]
            z_alone = ik.double() + dk.double()
            z[dt, j, "peer"], z[dt, j, "kncore"] = z_peer, z_alone
            msg = (f"{dt} request {j}: kncore alone vs peer {rel_err(z_alone, z_peer):.2e} "
                   f"(Adam steps {len(lk)} / {len(lr)})")
            if batched is not None:
                z[dt, j, "batch"] = batched[:, j].double()
                msg += (f"; kncore in the batch of {args.n} vs alone {rel_err(batched[:, j], z_alone):.2e}, "
                        f"vs peer {rel_err(batched[:, j], z_peer):.2e}")
            print(msg, flush=True)
    if "float32" in args.dtypes and "float64" in args.dtypes:
        for j in args.requests:
            ref = z["float64", j, "peer"]
            got = {w: rel_err(z["float32", j, w], ref) for w in ("peer", "kncore", "batch") if ("float32", j, w) in z}
            print(f"request {j}, float32 against the peer's float64 z: "
                  + ", ".join(f"{w} {e:.2e}" for w, e in got.items()), flush=True)


if __name__ == "__main__":
    main()
