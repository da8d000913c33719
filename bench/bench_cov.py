"""Benchmark kncore.ops.cov_accumulate_ (C += X^T X, lower triangle) against its peers.

Peers, in the same process on the same inputs (``case`` label in brackets):
  * [fp32] float32 X and accumulator: torch ``C.addmm_(X.T, X)`` and ROME's
    layer_stats accumulation ``mom2 += a.t().mm(a)``; ours with a float32 C.
  * [bf16->fp64] bfloat16 X, float64 accumulator: the plain-torch way to that
    accuracy, ``X64 = X.double(); C.addmm_(X64.T, X64)``; ours with C float64.
  * [bf16->fp32] bfloat16 X, float32 accumulator: ``Xf = X.float();
    C.addmm_(Xf.T, Xf)`` (the upcast is timed with the peer); ours with C float32.
  * [masked] float32 X with a seeded random boolean row mask keeping ~70% of
    rows (ROME dropping padding): ``Xk = X[mask]; C.addmm_(Xk.T, Xk)`` (the
    index selection is timed with the peer); ours ``cov_accumulate_(C, X, mask=mask)``.
  * [tf32] (CUDA only) the fp32 case with TF32 tensor-core matmuls allowed on
    both sides (``torch.backends.cuda.matmul.allow_tf32``), against the TF32 peak.
The bf16->fp32 and masked cases are the ones that matter for ROME statistics. Each case checks
that both sides agree, reports the median (and min) of several runs, the
speed-up against its own torch row, the extra resident memory during the call,
and the useful rate (rows*d*(d+1) FLOPs for the symmetric product, counting
only kept rows when masked) as a fraction of a large matmul measured in the
same run. The float32-accumulator cases also give the error against a float64
reference for d <= 6400.

    python bench/bench_cov.py --quick              # d = 3072 only
    python bench/bench_cov.py                      # d = 3072 6400 11008 16384
    python bench/bench_cov.py --d 3072 6400 --reps 7
    python bench/bench_cov.py --cases 'bf16->fp32' masked   # quote the '>' labels in a shell

Results: bench/results/bench_cov_<machine>_<commit>.{csv,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench._common import commit, machine, write_atomic, run_once, extra_mib, switched_off  # noqa: E402

from kncore import _ext  # noqa: E402
from kncore.ops.cov_accumulate import cov_accumulate_, cov_mirror  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def bench(fns: dict, reps: int, after_first=None) -> dict:
    """name -> (median s, min s, median CPU s, MiB). The first call of each side is
    untimed: it measures memory (cold, so buffers an op keeps count) and warms up;
    ``after_first()`` runs then (the agreement check). Timed runs are interleaved,
    so load changes hit every side alike."""
    mem = {k: extra_mib(f)[0] for k, f in fns.items()}
    if after_first is not None:
        after_first()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            w, c, _ = run_once(f)
            wall[k].append(w)
            cpu[k].append(c)
    return {k: (statistics.median(wall[k]), min(wall[k]), statistics.median(cpu[k]), mem[k]) for k in fns}


def matmul_peak(dtype, n=4096) -> float:
    """GFLOP/s of a large square matmul (the machine's ceiling for this dtype)."""
    a = torch.randn(n, n, dtype=dtype, device=DEV)
    b = torch.randn(n, n, dtype=dtype, device=DEV)
    torch.mm(a, b)
    t = min(run_once(lambda: torch.mm(a, b))[0] for _ in range(3))
    return 2 * n**3 / t / 1e9


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def case_fp32(d, rows, reps, check_fp64, tag="fp32"):
    X = torch.randn(rows, d, device=DEV) * 2 + 0.5
    C_t, C_r, C_o = (torch.zeros(d, d, device=DEV) for _ in range(3))
    fns = {f"torch addmm_ {tag}": lambda: C_t.addmm_(X.T, X),
           "ROME mom2 += a.t().mm(a)": lambda: C_r.add_(X.t().mm(X)),  # runningstats.SecondMoment
           f"kncore cov_accumulate_ {tag}": lambda: cov_accumulate_(C_o, X)}
    if DEV == "cpu" and tag == "fp32" and _ext.load() and torch.ops.kncore.cov_avx512():
        # the same op with its AVX-512 triangle switched off: what a CPU without it runs
        C_b = torch.zeros(d, d, device=DEV)
        fns[f"kncore cov_accumulate_ {tag} (per-block gemms)"] = lambda: switched_off("cov", lambda: cov_accumulate_(C_b, X))
    out = {}

    def check():  # each C holds exactly one accumulation now
        full = cov_mirror(C_o)
        out["agree"] = rel(full, C_t)
        if check_fp64:
            ref = X.double().T @ X.double()
            out["errs"] = {f"torch addmm_ {tag}": rel(C_t, ref), "ROME mom2 += a.t().mm(a)": rel(C_r, ref),
                           f"kncore cov_accumulate_ {tag}": rel(full, ref)}

    res = bench(fns, reps, check)
    return res, out["agree"], out.get("errs", {})


def case_bf16(d, rows, reps, acc, check_fp64):
    """bf16 inputs into an fp32 or fp64 accumulator, against upcast + addmm_ in the
    accumulator's dtype (fp64: the best plain-torch way to the same accuracy)."""
    X = (torch.randn(rows, d, device=DEV) * 2 + 0.5).bfloat16()
    C_t, C_o = (torch.zeros(d, d, dtype=acc, device=DEV) for _ in range(2))
    tag = "fp64" if acc == torch.float64 else "fp32"
    peer, ours = f"torch upcast + addmm_ {tag}", f"kncore cov_accumulate_ bf16->{tag}"

    def plain():
        Xa = X.to(acc)
        C_t.addmm_(Xa.T, Xa)

    fns = {peer: plain, ours: lambda: cov_accumulate_(C_o, X)}
    out = {}

    def check():
        full = cov_mirror(C_o)
        out["agree"] = rel(full, C_t)
        if check_fp64 and acc != torch.float64:  # an fp64 accumulator is its own reference
            ref = X.double().T @ X.double()
            out["errs"] = {peer: rel(C_t, ref), ours: rel(full, ref)}

    res = bench(fns, reps, check)
    return res, out["agree"], out.get("errs", {})


def row_mask(rows, keep=0.7, seed=0):
    """Seeded random boolean row mask keeping about ``keep`` of the rows."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, generator=g) < keep).to(DEV)


def case_masked_fp32(d, rows, reps, check_fp64):
    X = torch.randn(rows, d, device=DEV) * 2 + 0.5
    mask = row_mask(rows)
    C_t, C_o = (torch.zeros(d, d, device=DEV) for _ in range(2))

    def plain():  # what ROME does when it drops padding
        Xk = X[mask]
        C_t.addmm_(Xk.T, Xk)

    fns = {"torch X[mask] + addmm_ fp32": plain,
           "kncore cov_accumulate_ masked fp32": lambda: cov_accumulate_(C_o, X, mask=mask)}
    out = {}

    def check():
        full = cov_mirror(C_o)
        out["agree"] = rel(full, C_t)
        if check_fp64:
            Xk = X[mask].double()
            ref = Xk.T @ Xk
            out["errs"] = {"torch X[mask] + addmm_ fp32": rel(C_t, ref),
                           "kncore cov_accumulate_ masked fp32": rel(full, ref)}

    res = bench(fns, reps, check)
    return res, out["agree"], out.get("errs", {}), int(mask.sum())


@contextlib.contextmanager
def tf32():
    """TF32 tensor-core matmuls allowed (CUDA) inside the block."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def case_tf32(d, rows, reps, check_fp64):
    """The fp32 case with TF32 matmuls allowed on both sides (CUDA)."""
    with tf32():
        return case_fp32(d, rows, reps, check_fp64, tag="tf32")


CASES = ("fp32", "bf16->fp64", "bf16->fp32", "masked", "tf32")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, nargs="+", default=None, help="hidden sizes (default 3072 6400 11008 16384)")
    p.add_argument("--rows", type=int, default=4096, help="rows per update (a realistic token batch)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed runs per side (default: 5 for d <= 6400, 3 above; 3 with --quick)")
    p.add_argument("--quick", action="store_true", help="d = 3072 only, 3 runs")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), metavar="CASE",
                   help=f"which cases to run (default: all; choices: {' '.join(CASES)})")
    p.add_argument("--no-write", action="store_true", help="print only")
    a = p.parse_args(argv)
    dims = a.d or ([3072] if a.quick else [3072, 6400, 11008, 16384])
    reps_for = (lambda d: a.reps) if a.reps else (lambda d: 3 if a.quick or d > 6400 else 5)
    if not _ext.load():
        print(f"warning: kncore._C unavailable ({_ext.load_error()}); timing the reference path", file=sys.stderr)

    peak32, peak64 = matmul_peak(torch.float32), matmul_peak(torch.float64)
    peak_tf32 = float("nan")
    if CUDA:
        with tf32():
            peak_tf32 = matmul_peak(torch.float32)
    print(f"matmul peak: fp32 {peak32:.0f} GFLOP/s, fp64 {peak64:.0f} GFLOP/s, tf32 {peak_tf32:.0f} GFLOP/s "
          f"({DEV}, {torch.get_num_threads()} threads)", flush=True)
    peak = {"fp32": peak32, "bf16->fp64": peak64, "bf16->fp32": peak32, "masked": peak32, "tf32": peak_tf32}
    label = {"fp32": "fp32", "bf16->fp64": "bf16>fp64", "bf16->fp32": "bf16>fp32", "masked": "masked", "tf32": "tf32"}
    cases = [c for c in CASES if c in a.cases and (c != "tf32" or CUDA)]
    if "tf32" in a.cases and not CUDA:
        print("tf32 case skipped: TF32 is a CUDA tensor-core mode", flush=True)
    rows_out = []
    for d in dims:
        reps = reps_for(d)
        check_fp64 = d <= 6400
        for case in cases:
            kept = a.rows
            errs = {}
            if case == "fp32":
                res, agree, errs = case_fp32(d, a.rows, reps, check_fp64)
            elif case == "tf32":
                res, agree, errs = case_tf32(d, a.rows, reps, check_fp64)
            elif case in ("bf16->fp64", "bf16->fp32"):
                acc = torch.float64 if case == "bf16->fp64" else torch.float32
                res, agree, errs = case_bf16(d, a.rows, reps, acc, check_fp64)
            else:
                res, agree, errs, kept = case_masked_fp32(d, a.rows, reps, check_fp64)
            useful = kept * d * (d + 1)  # FLOPs of the symmetric product (one triangle with its diagonal)
            full = 2 * kept * d * d
            base_name = next(iter(res))  # each case's first side is its torch peer
            base, base_cpu = res[base_name][0], res[base_name][2]
            for name, (med, mn, cpu, mib) in res.items():
                flops = useful if name.startswith("kncore") else full
                rows_out.append(dict(case=case, d=d, rows=a.rows, runs=reps, side=name, median_ms=med * 1e3,
                                     min_ms=mn * 1e3, speedup_vs_torch=base / med, cpu_ms=cpu * 1e3,
                                     cpu_speedup=base_cpu / cpu, extra_mib=mib,
                                     frac_of_peak=flops / med / 1e9 / peak[case],
                                     agreement=agree, err_vs_fp64=errs.get(name, float("nan"))))
                print(f"d={d:6d} {label[case]:9s} {name:34s} {med*1e3:9.1f} ms (min {mn*1e3:8.1f})  x{base/med:5.2f} "
                      f"(CPU time x{base_cpu/cpu:5.2f})  "
                      f"+{mib:7.1f} MiB  {rows_out[-1]['frac_of_peak']:.0%} of peak  agree {agree:.1e}", flush=True)

    try:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    header = (f"# bench_cov on {machine()} at {commit()}\n\n"
              f"Command: `python bench/bench_cov.py {shlex.join(argv if argv is not None else sys.argv[1:])}`  \n"
              f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
              f"rows per update {a.rows}; median of `runs` interleaved timed runs per side, after an untimed first "
              f"call (which measures memory, cold); load average at the end: {load}.  \n"
              f"Matmul peak measured in the same run: fp32 {peak32:.0f} GFLOP/s, fp64 {peak64:.0f} GFLOP/s"
              + (f", tf32 {peak_tf32:.0f} GFLOP/s. " if CUDA else ". ") +
              "`of peak` counts rows*d*(d+1) FLOPs for kncore (the symmetric product) and 2*rows*d^2 for the "
              "peers (what they compute), with rows = the kept rows in the `masked` case (mask keeps ~70%, seeded). "
              "Speed-ups are against each case's own torch row. CPU time (all threads of the process) is given "
              "too: on a shared machine it is less disturbed by other load than wall time.  \n"
              + ("" if CUDA else "**GPU: not measured** (no CUDA device on this machine).  \n") + "\n")
    table = ["| case | d | runs | side | median ms | min ms | speed-up vs torch | CPU ms | speed-up in CPU time | extra MiB | "
             "of peak | agreement (rel) | err vs fp64 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows_out:
        table.append(f"| {r['case']} | {r['d']} | {r['runs']} | {r['side']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{r['speedup_vs_torch']:.2f}x | {r['cpu_ms']:.0f} | {r['cpu_speedup']:.2f}x | "
                     f"{r['extra_mib']:.0f} | {r['frac_of_peak']:.0%} | "
                     f"{r['agreement']:.1e} | {r['err_vs_fp64']:.1e} |")
    md = header + "\n".join(table) + "\n"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows_out[0]))
    w.writeheader()
    w.writerows(rows_out)
    if not a.no_write:
        stem = RESULTS / f"bench_cov_{machine()}_{commit()}"
        write_atomic(stem.with_suffix(".csv"), buf.getvalue())
        write_atomic(stem.with_suffix(".md"), md)
        print(f"wrote {stem}.csv/.md")
    print(md)


if __name__ == "__main__":
    main()
