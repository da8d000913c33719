"""Benchmark kncore.ops.rank1_update_ (W += u v^T with a bit-exact undo record).

Peers, in the same process on the same inputs (W restored before every run):
  * bare ``W.addr_(u, v)``: the update with no way back (the target: <= 1.5x);
  * ``orig = W.clone(); W.addr_(u, v)``: ROME's way to undo (``weights_copy``).
The delta's size sets how many elements the undo cannot recompute, and so the
record's form (sparse for small edits, dense int8 codes for ROME-sized ones in
fp32), so it is swept: RMS(u v^T) / RMS(W) = --scales (real ROME edits on
SmolLM2: 0.14-0.18). Reported: median (and min) of interleaved runs, ratio to
the bare addr_, the record's form, size and miss rate, a first edit with fresh
record memory, extra resident memory, undo time, and the bytes moved (read +
write W) as a fraction of a large copy's bandwidth.

    python bench/bench_rank1.py                 # 4096 x 11008, fp32 and bf16
    python bench/bench_rank1.py --quick

Results: bench/results/bench_rank1_<machine>_<commit>.{csv,md}.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench._common import commit, machine, write_atomic, run_once, extra_mib, switched_off  # noqa: E402

from kncore import _ext  # noqa: E402
from kncore.ops.rank1_update import rank1_pool_release, rank1_update_  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def copy_bandwidth() -> float:
    """GB/s of a large device copy (read + write), the ceiling of this memory-bound op."""
    x = torch.randn(64 * 2**20, device=DEV)
    y = torch.empty_like(x)
    y.copy_(x)
    ts = [run_once(lambda: y.copy_(x))[0] for _ in range(5)]  # wall
    return 2 * x.numel() * 4 / min(ts) / 1e9


def case(m, n, dtype, scale, reps):
    W0 = (torch.randn(m, n, device=DEV) * 0.05).to(dtype)
    rms_w = W0.float().pow(2).mean().sqrt().item()
    # bf16-representable factors, so the peers' bf16 addr_ sees the very same numbers
    u = (torch.randn(m, device=DEV) * (scale * rms_w) ** 0.5).to(dtype)
    v = (torch.randn(n, device=DEV) * (scale * rms_w) ** 0.5).to(dtype)
    W = W0.clone()
    sides = {
        "torch W.addr_(u, v)": lambda: W.addr_(u, v),
        "clone + addr_ (ROME's undo copy)": lambda: (W.clone(), W.addr_(u, v))[0],
        "kncore rank1_update_": lambda: rank1_update_(W, u.float(), v.float()),
    }
    if dtype == torch.float32 and W.device.type == "cpu" and _ext.load() and torch.ops.kncore.rank1_avx512():
        # the same op with its fp32 AVX-512 rows switched off: what a CPU without them runs
        sides["kncore rank1_update_ (portable rows)"] = lambda: switched_off("rank1", lambda: rank1_update_(W, u.float(), v.float()))
    # same numbers as torch's addr_, and an undo that gives back W's bytes
    bits = torch.int16 if W.element_size() == 2 else torch.int32
    mine = W0.clone()
    rec = rank1_update_(mine, u.float(), v.float())
    theirs = W0.clone().addr_(u, v)
    mismatch = int((mine.view(bits) != theirs.view(bits)).sum())
    # in units of the rounding of the sum: |ours - addr_| / ((|w| + |u v|) eps); one rounding is <= 0.5
    scale_ = (W0.float().abs() + torch.outer(u.float(), v.float()).abs()) * torch.finfo(dtype).eps
    max_ulp = float(((mine.float() - theirs.float()).abs() / scale_).max())
    outer = (W0.float() + torch.outer(u.float(), v.float())).to(dtype)
    equal_outer = bool(torch.equal(mine.view(bits), outer.view(bits)))
    rec.undo(mine)
    exact = bool(torch.equal(mine.view(bits), W0.view(bits)))
    # elements undo cannot recompute: in the dense form those with a nonzero code
    dense = rec.code.numel() > 0
    misses = int((rec.code != 0).sum()) if dense else rec.exc_idx.numel() + rec.row_idx.numel() * n
    miss_rate = misses / W.numel()
    del mine, theirs, outer

    def reset(k, out):
        if k.startswith("kncore"):
            out.undo(W)
        else:
            W.copy_(W0)

    mem = {}
    for k, f in sides.items():  # warm up, then the memory high-water mark in an untimed run
        reset(k, f())
        mem[k], out = extra_mib(f)
        reset(k, out)
    times = {k: [] for k in sides}
    cpu = {k: [] for k in sides}
    undo_t = []
    for _ in range(reps):
        for k, f in sides.items():
            t, c, out = run_once(f)
            times[k].append(t)
            cpu[k].append(c)
            if k.startswith("kncore"):
                t0 = time.perf_counter()
                out.undo(W)
                undo_t.append(time.perf_counter() - t0)
            else:
                W.copy_(W0)
            del out
    # a first edit: the dense form's record buffer is fresh memory (page faults),
    # not one the pool kept from an earlier record
    cold = []
    for _ in range(3):
        rank1_pool_release()
        t, _, out = run_once(sides["kncore rank1_update_"])
        out.undo(W)
        del out
        cold.append(t)
    res = {k: (statistics.median(v), min(v), statistics.median(cpu[k]), mem[k]) for k, v in times.items()}
    return res, dict(mismatch=mismatch, max_ulp=max_ulp, equal_outer=equal_outer, exact=exact, miss_rate=miss_rate,
                     form="dense" if dense else "sparse", cold_ms=statistics.median(cold) * 1e3,
                     record_mib=rec.nbytes / 2**20,
                     w_mib=W.numel() * W.element_size() / 2**20, undo_ms=statistics.median(undo_t) * 1e3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=2, default=[4096, 11008])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--scales", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 0.15],
                   help="RMS(u v^T) / RMS(W) of the edit")
    p.add_argument("--reps", type=int, default=None, help="timed runs per side (default 9, 5 with --quick)")
    p.add_argument("--quick", action="store_true", help="scale 1e-2 only, 5 runs")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    reps = a.reps or (5 if a.quick else 9)
    scales = [1e-2] if a.quick else a.scales
    if not _ext.load():
        print(f"warning: kncore._C unavailable ({_ext.load_error()}); timing the reference path", file=sys.stderr)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s ({DEV}, {torch.get_num_threads()} threads)", flush=True)
    m, n = a.shape
    rows = []
    for dt_name in a.dtypes:
        dtype = getattr(torch, dt_name)
        for scale in scales:
            res, info = case(m, n, dtype, scale, reps)
            base, base_cpu = res["torch W.addr_(u, v)"][0], res["torch W.addr_(u, v)"][2]
            moved = 2 * m * n * torch.empty((), dtype=dtype).element_size()
            for side, (med, mn, cpu, mib) in res.items():
                rows.append(dict(dtype=dt_name, shape=f"{m}x{n}", delta_rms_ratio=scale, side=side,
                                 median_ms=med * 1e3, min_ms=mn * 1e3, ratio_vs_addr=med / base, cpu_ms=cpu * 1e3,
                                 cpu_ratio_vs_addr=cpu / base_cpu, extra_mib=mib,
                                 frac_of_copy_bw=moved / med / 1e9 / bw,
                                 record_mib=info["record_mib"] if side.startswith("kncore") else
                                 (info["w_mib"] if side.startswith("clone") else 0.0),
                                 record_form=info["form"] if side.startswith("kncore") else "",
                                 miss_rate=info["miss_rate"] if side.startswith("kncore") else float("nan"),
                                 first_edit_ms=info["cold_ms"] if side.startswith("kncore") else float("nan"),
                                 undo_ms=info["undo_ms"] if side.startswith("kncore") else float("nan"),
                                 undo_exact=info["exact"], mismatch_vs_torch=info["mismatch"],
                                 max_ulp_vs_torch=info["max_ulp"], equal_to_outer=info["equal_outer"]))
                r = rows[-1]
                print(f"{dt_name:9s} delta {scale:g}  {side:34s} {med*1e3:8.2f} ms (min {mn*1e3:7.2f})  "
                      f"{med/base:5.2f}x addr_ (CPU time {cpu/base_cpu:5.2f}x)  +{mib:6.1f} MiB  "
                      f"record {r['record_mib']:6.1f} MiB  "
                      f"{r['frac_of_copy_bw']:.0%} of copy bw", flush=True)
            print(f"    {info['form']} record, misses {info['miss_rate']:.3%}, first edit (fresh record buffer) "
                  f"{info['cold_ms']:.1f} ms, undo {info['undo_ms']:.1f} ms, exact={info['exact']}, "
                  f"elements differing from torch's addr_: {info['mismatch']} (max {info['max_ulp']:.2f} eps of abs(w)+abs(uv)), "
                  f"equal to W + outer(u, v): {info['equal_outer']}", flush=True)
    try:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    header = (f"# bench_rank1 on {machine()} at {commit()}\n\n"
              f"Command: `python bench/bench_rank1.py {' '.join(argv if argv is not None else sys.argv[1:])}`  \n"
              f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
              f"median of {reps} interleaved runs, W restored before each; load average at the end: {load}.  \n"
              "`record`: the undo record's form (sparse: index + value per miss; dense: an int8 code per element, "
              "its buffer reused from the pool after the first edit); `misses`: elements that fl(W_new - delta) "
              "does not give back; `first edit ms`: a call with the pool emptied (fresh record memory).  \n"
              f"Copy bandwidth measured in the same run: {bw:.0f} GB/s; `of copy bw` = 2 x W bytes / time. "
              "CPU time (all threads of the process) is given too: on a shared machine it is less disturbed by "
              "other load than wall time. `differs from addr_`: elements whose bits differ from torch's addr_, "
              "which fuses the multiply-add (ours rounds u*v first, as `W + torch.outer(u, v)` and ROME's "
              "`w += upd_matrix` do; `equal to W + outer`).  \n"
              + ("" if CUDA else "**GPU: not measured** (no CUDA device on this machine).  \n") + "\n")
    table = ["| dtype | delta RMS / W RMS | side | median ms | min ms | x addr_ | CPU ms | x addr_ in CPU time | "
             "RSS growth MiB | record | record MiB | misses | first edit ms | undo ms | undo exact | "
             "differs from addr_ (max, eps of abs(w)+abs(uv)) | equal to W + outer | of copy bw |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['dtype']} | {r['delta_rms_ratio']:g} | {r['side']} | {r['median_ms']:.2f} | "
                     f"{r['min_ms']:.2f} | {r['ratio_vs_addr']:.2f} | {r['cpu_ms']:.1f} | {r['cpu_ratio_vs_addr']:.2f} | "
                     f"{r['extra_mib']:.0f} | {r['record_form']} | {r['record_mib']:.1f} | "
                     f"{r['miss_rate']:.3%} | {r['first_edit_ms']:.1f} | {r['undo_ms']:.1f} | {r['undo_exact']} | {r['mismatch_vs_torch']} "
                     f"({r['max_ulp_vs_torch']:.2f}) | {r['equal_to_outer']} | "
                     f"{r['frac_of_copy_bw']:.0%} |")
    md = header + "\n".join(table) + "\n"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    if not a.no_write:
        stem = RESULTS / f"bench_rank1_{machine()}_{commit()}"
        write_atomic(stem.with_suffix(".csv"), buf.getvalue())
        write_atomic(stem.with_suffix(".md"), md)
        print(f"wrote {stem}.csv/.md")
    print(md)


if __name__ == "__main__":
    main()
