"""Registers, spills and shared memory of every Triton kernel, compiled for sm_80 and sm_90 on the CPU.

    .venv/bin/python bench/bench_kernels_compile.py [--workers 2] [--kernel NAME...] [--no-write]

Compiles what dispatch can launch (kncore.kernels.aot.cases: every autotune
configuration after pruning, every dtype, every flag set: the cases
tests/test_kernels_compile.py compiles) with Triton's compiler and the
ptxas of the Triton wheel, in fresh processes with an empty Triton cache. No
GPU is needed; the figures are the compiler's, not run times. Results:
bench/results/bench_kernels_compile_<machine>_<commit>.{csv,md}. Exits 1 when
a case fails to compile, spills or needs more shared memory than its target.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import commit, machine, write_atomic  # noqa: E402

COLUMNS = ["kernel", "config", "variant", "target", "registers", "spill_stores", "spill_loads", "stack",
           "shared", "seconds", "problems"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kernel", nargs="+", help="only these kernel functions (e.g. _expand_kernel); implies --no-write")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    import triton

    from kncore.ops._kernels import kernel_module

    A = kernel_module("aot")
    t0 = time.perf_counter()
    rows = A.compile_all(workers=args.workers, kernels=args.kernel)
    wall = time.perf_counter() - t0
    for r in rows:
        r["problems"] = "; ".join(A.problems(r)) or ""
    bad = [r for r in rows if r["problems"]]

    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    head = (f"# bench_kernels_compile on {machine('cpu')} at {commit()}\n\n"
            f"Command: `python bench/bench_kernels_compile.py {' '.join(argv or sys.argv[1:])}`  \n"
            f"Triton {triton.__version__}, ptxas of the Triton wheel (sm_80: `{Path(A.ptxas_path(80)).name}`, "
            f"sm_90: `{Path(A.ptxas_path(90)).name}`); {len(rows)} compiles in {wall:.0f} s wall with "
            f"{args.workers} worker processes (load average at the end: "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}).  \n"
            "Compiled on the CPU, nothing run: registers, spills and stack are ptxas -v's, shared = Triton's "
            "dynamic allocation + ptxas' static bytes, against 163 KiB (sm_80) and 227 KiB (sm_90) a block. "
            "Shapes: LLaMA-2-7B (d 4096, d_ff 11008, 640 rows); `variant` is the dtype (fp32 with IEEE or "
            "tf32 dots) and the flag set: `llama` gated SiLU, no bias, pre and up stored (backward); `gpt2` "
            "gelu_tanh with bias on a Conv1D weight; `all-flags` gated with both biases, the neuron "
            "scale and its rows; `relu-none` no optional input. Time on a GPU: not measured "
            "on GPU.\n\n"
            f"**{len(bad)} of {len(rows)} cases fail** (compile error, spills, or shared memory over the "
            "target's).\n\n")
    md = [head, "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    print(text)
    if not (args.no_write or args.kernel):
        stem = RESULTS / f"bench_kernels_compile_{machine('cpu')}_{commit()}"
        write_atomic(stem.with_suffix(".csv"), buf.getvalue())
        write_atomic(stem.with_suffix(".md"), text)
        print(f"wrote {stem}.{{csv,md}}")
    return 1 if bad else 0


RESULTS = ROOT / "bench" / "results"

if __name__ == "__main__":
    sys.exit(main())
