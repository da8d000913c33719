"""Triton kernels against eager PyTorch and torch.compile, on the GPU.

    flock /tmp/kncore-bench.lock .venv/bin/python bench/bench_kernels.py [--quick]

Kernels: the fused MLP capture (kernels/mlp_capture.py) and the IG-step expand /
reduce (kernels/ig_steps.py, in the index form kncore.attribution uses; the eager
peer is that module's own code), at LLaMA-2-7B (d 4096, d_ff 11008, SwiGLU) and
GPT-J (4096, 16384, gelu_new + bias) shapes in bf16, with 160 to 640 rows
(IG steps x prompts: 20 steps x 8, 16, 32 prompts). Each case runs the three
implementations on the same inputs in one process, checks the kernel against
an fp32 reference (the rule for a low-precision fast path: its error at most
2x that of eager PyTorch in the same dtype), and times
them with ``triton.testing.do_bench`` (median). It counts the FLOPs and bytes
each case needs at minimum and reports the kernel's time as a fraction of the
floor set by ceilings measured in the same run (a large bf16 matmul, a large
copy). Results: bench/results/bench_kernels_<machine>_<commit>.{csv,md}.

Without CUDA nothing is measured: the markdown file says "not measured on GPU".
``--smoke`` runs every code path on tiny shapes (the interpreter on CPU, a host
clock) and prints the table without writing results; it checks the script,
its figures mean nothing.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SMOKE = "--smoke" in sys.argv

import torch  # noqa: E402

if torch.cuda.is_available() and not SMOKE:
    os.environ.pop("TRITON_INTERPRET", None)  # time the compiled kernels, never the interpreter
elif SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(ROOT))
from bench._common import commit, machine, write_atomic  # noqa: E402

from kncore.ops._kernels import kernel_module  # noqa: E402

IG = kernel_module("ig_steps")
MC = kernel_module("mlp_capture")

SHAPES = {"llama2-7b": dict(d=4096, d_ff=11008, act="silu", gated=True, bias=False),
          "gpt-j": dict(d=4096, d_ff=16384, act="gelu_tanh", gated=False, bias=True)}
STEPS = 20
PROMPTS = (8, 16, 32)


# --------------------------------------------------------------------------- timing

def timer(fn) -> float:
    """Median milliseconds."""
    if SMOKE:
        fn()
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def peak_mib(fn) -> float:
    if not torch.cuda.is_available() or SMOKE:
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def ceilings(dev, dtype):
    """(bf16 matmul FLOP/s, copy bytes/s) measured now."""
    n = 256 if SMOKE else 8192
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    flops = 2 * n ** 3 / (timer(lambda: torch.mm(a, b)) * 1e-3)
    nbytes = (1 << 20) if SMOKE else (1 << 30)
    src = torch.empty(nbytes, device=dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    bw = 2 * nbytes / (timer(lambda: dst.copy_(src)) * 1e-3)
    return flops, bw


# --------------------------------------------------------------------------- cases

def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


@dataclass
class Case:
    kernel: str
    rows: int
    variant: str
    flop: int    # at minimum
    bytes: int   # at minimum (each input read once, each output written once)
    fast: Callable
    eager: Callable | None = None  # the PyTorch peer (None: a context row, timed alone)
    ref: Callable | None = None    # fp32/fp64 reference of the same numbers
    plain: Callable | None = None  # a plain low-precision run, for the 2x bar (default: eager)


def _first(t):
    return t[0] if isinstance(t, tuple) else t


def mlp_cases(dev, dtype, quick):
    from transformers.activations import ACT2FN  # (imports triton: after TRITON_INTERPRET is settled)

    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = SHAPES
    if SMOKE:
        shapes = {"smoke-gated": dict(d=40, d_ff=123, act="silu", gated=True, bias=False),
                  "smoke-gelu": dict(d=40, d_ff=123, act="gelu_tanh", gated=False, bias=True)}
    esz = torch.finfo(dtype).bits // 8
    for name, s in shapes.items():
        d, N = s["d"], s["d_ff"]
        r = lambda *shape: torch.randn(*shape, generator=g).to(dev, dtype)
        # nn.Linear layout, as the runtime passes it: weight [d_ff, d], used as weight.t()
        w = (r(N, d) / math.sqrt(d)).t()
        kw = dict(b=r(N) * 0.1 if s["bias"] else None, act=s["act"])
        if s["gated"]:
            kw["w_up"] = (r(N, d) / math.sqrt(d)).t()
        kw32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}
        hf_act = ACT2FN["silu" if s["act"] == "silu" else "gelu_new"]
        for P in ((8,) if quick or SMOKE else PROMPTS):
            M = P * STEPS
            x = r(M, d)
            # runtime: pre-activation + activation, what kncore.runtime asks for every MLP.
            mats = 2 if s["gated"] else 1
            # The runtime's peer is its own plain path: the HF modules (GPT-J's
            # gelu_new is eight elementwise kernels in eager PyTorch).
            # (each case's closures run before the generator moves on)
            yield Case(f"mlp_capture {name}", M, "runtime", 2 * M * d * N * mats,
                       esz * (M * d + mats * d * N + 2 * M * N),
                       fast=lambda: MC.mlp_capture(x, w, **kw, return_pre=True),
                       eager=lambda: _hf_mlp(x, w, kw, hf_act),
                       ref=lambda: MC.mlp_capture_ref(x.float(), w.float(), **kw32, return_pre=True),
                       plain=lambda: MC.mlp_capture_ref(x, w, **kw, return_pre=True))


def _hf_mlp(x, w, kw, hf_act):
    """What kncore.runtime's plain path computes: Linear(s) and the HF activation module."""
    pre = x @ w if kw["b"] is None else torch.addmm(kw["b"], x, w)
    h = hf_act(pre)
    if kw.get("w_up") is not None:
        h = h * (x @ kw["w_up"])
    return h, pre


def ig_cases(dev, dtype, quick):
    """The IG engine's form (kncore.attribution.expand_steps / reduce_steps): index rows."""
    g = torch.Generator(device="cpu").manual_seed(1)
    shapes = SHAPES if not SMOKE else {"smoke": dict(d=40, d_ff=123)}
    esz = torch.finfo(dtype).bits // 8
    for name, s in shapes.items():
        D, Fd = s["d"], s["d_ff"]
        r = lambda *shape: torch.randn(*shape, generator=g).to(dev, dtype)
        w_down = (r(D, Fd) / math.sqrt(Fd)).t()  # [d_ff, D] view of nn.Linear's [D, d_ff] weight
        bias = r(D) * 0.1
        for P in ((8,) if quick or SMOKE else PROMPTS):
            R = P * STEPS
            a = r(P, Fd)
            y = a @ w_down
            index = torch.arange(P, device=dev).repeat_interleave(STEPS)
            alphas = torch.linspace(0, 1, STEPS + 1, device=dev)[1:].repeat(P)
            grads = r(R, D) / STEPS  # already weighted, as the engine passes them
            yield Case(f"expand_steps {name}", R, "act site", 0, esz * (P * D + R * D + D) + 12 * R,
                       fast=lambda: IG.expand_steps(y, index, alphas, bias),
                       eager=lambda: IG.expand_steps_ref(y, index, alphas, bias),
                       ref=lambda: IG.expand_steps_ref(y.double(), index, alphas.double(), bias.double()))
            yield Case(f"reduce_steps {name}", R, "act site", 2 * P * D * Fd + R * D,
                       esz * (R * D + Fd * D + P * Fd) + 4 * P * Fd + 8 * R,
                       fast=lambda: IG.reduce_steps(grads, index, P, a, w_down),
                       # the engine's own code: fp32 sums and an fp32 copy of W_down
                       eager=lambda: IG.reduce_steps_ref(grads, index, P, a, w_down),
                       ref=lambda: a.double() * (torch.zeros(P, D, dtype=torch.float64, device=dev).index_add_(
                           0, index, grads.double()) @ w_down.double().t()),
                       plain=lambda: (a * (torch.zeros(P, D, dtype=dtype, device=dev).index_add_(0, index, grads)
                                           @ w_down.t())).float())
            # The literal steps the linearity trick avoids: m scaled copies of a, each projected.
            yield Case(f"literal steps {name}", R, "m copies x W", 2 * R * Fd * D, esz * (R * Fd + Fd * D + R * D),
                       fast=lambda: torch.addmm(bias, (alphas.to(dtype)[:, None] * a.index_select(0, index)), w_down))


def run(quick: bool):
    dev = "cuda" if torch.cuda.is_available() and not SMOKE else "cpu"
    dtype = torch.bfloat16
    peak_flops, peak_bw = ceilings(dev, dtype)
    rows = []
    for cases in (mlp_cases(dev, dtype, quick), ig_cases(dev, dtype, quick)):
        for c in cases:
            floor_s = max(c.flop / peak_flops, c.bytes / peak_bw)
            bound = "compute" if c.flop / peak_flops >= c.bytes / peak_bw else "memory"
            row = dict(kernel=c.kernel, rows=c.rows, variant=c.variant, flop=c.flop, bytes=c.bytes, bound=bound)
            if c.eager is None:  # context row: the work the trick removes
                t = timer(c.fast)
                rows.append(dict(row, impl="eager", ms=t, tflops=c.flop / t / 1e9, gbps=c.bytes / t / 1e6,
                                 frac_of_ceiling=floor_s * 1e3 / t, peak_mib=peak_mib(c.fast)))
                continue
            want = _first(c.ref())
            err_fast = _err(_first(c.fast()), want)
            err_eager = _err(_first(c.eager()), want)
            err_plain = err_eager if c.plain is None else _err(_first(c.plain()), want)
            if err_fast > 2 * err_plain:
                raise SystemExit(f"{c.kernel} rows={c.rows} {c.variant}: kernel error {err_fast:.3g} > 2x a plain "
                                 f"low-precision run's {err_plain:.3g}; not timing wrong numbers")
            compiled = torch.compile(c.eager, dynamic=False)
            compiled()  # compile outside the timing
            times = {"triton": timer(c.fast), "eager": timer(c.eager), "compile": timer(compiled)}
            mems = {"triton": peak_mib(c.fast), "eager": peak_mib(c.eager), "compile": peak_mib(compiled)}
            for impl, t in times.items():
                rows.append(dict(row, impl=impl, ms=t, tflops=c.flop / t / 1e9, gbps=c.bytes / t / 1e6,
                                 frac_of_ceiling=floor_s * 1e3 / t, peak_mib=mems[impl],
                                 x_vs_eager=times["eager"] / t, x_vs_compile=times["compile"] / t,
                                 max_err=err_fast if impl == "triton" else err_eager, err_bar=2 * err_plain))
            print(f"{c.kernel:28s} rows={c.rows:4d} {c.variant:9s} triton {times['triton']:.4f} ms  "
                  f"eager {times['eager']:.4f}  compile {times['compile']:.4f}  ({times['eager'] / times['triton']:.2f}x "
                  f"eager, {floor_s * 1e3 / times['triton']:.0%} of the {bound} floor)", flush=True)
    return rows, peak_flops, peak_bw


COLS = ["kernel", "rows", "variant", "impl", "ms", "tflops", "gbps", "bound", "frac_of_ceiling", "x_vs_eager",
        "x_vs_compile", "max_err", "err_bar", "peak_mib", "flop", "bytes"]


def _fmt(v):
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def report(rows, peak_flops, peak_bw, cmd):
    lines = [f"# bench_kernels on {machine()} at {commit()}", "", f"Command: `{cmd}`", "",
             f"Ceilings measured in this run: bf16 matmul {peak_flops / 1e12:.1f} TFLOP/s, "
             f"copy {peak_bw / 1e9:.0f} GB/s. `frac_of_ceiling` = time floor of the case's bound "
             "resource (FLOPs or bytes at minimum, over that ceiling) / measured time.", "",
             "| kernel | rows | variant | impl | ms (median) | TFLOP/s | GB/s | bound | of ceiling | x eager | x compile | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in
                                        ("kernel", "rows", "variant", "impl", "ms", "tflops", "gbps", "bound",
                                         "frac_of_ceiling", "x_vs_eager", "x_vs_compile", "peak_mib")) + " |")
    fused = [r for r in rows if r["impl"] == "triton" and r["kernel"].startswith("mlp_capture")]
    if fused:
        ok_speed = all(r["x_vs_eager"] >= 1.5 for r in fused)
        ok_frac = all(r["frac_of_ceiling"] >= 0.7 for r in fused)
        lines += ["", f"Targets (fused capture): >= 1.5x eager: {'met' if ok_speed else 'NOT met'} "
                      f"(min {min(r['x_vs_eager'] for r in fused):.2f}x); >= 70% of the bound ceiling: "
                      f"{'met' if ok_frac else 'NOT met'} (min {min(r['frac_of_ceiling'] for r in fused):.0%})."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 prompts (160 rows) only")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device; prints, writes nothing")
    args = ap.parse_args()
    cmd = "python bench/bench_kernels.py" + (" --quick" if args.quick else "") + (" --smoke" if args.smoke else "")
    stem = RESULTS / f"bench_kernels_{machine()}_{commit()}"
    if not torch.cuda.is_available() and not args.smoke:
        write_atomic(stem.with_suffix(".md"), "\n".join([
            f"# bench_kernels on {machine()} at {commit()}", "",
            f"Command: `{cmd}`", "",
            "**Not measured on GPU**: this machine has no CUDA device. The kernels target CUDA; "
            "no figures are recorded here, and none are estimated.", "",
            "Planned cases (run this script on a GPU): fused MLP capture and IG-step expand/reduce, "
            f"LLaMA-2-7B (4096/11008) and GPT-J (4096/16384) shapes in bf16, {STEPS} steps x "
            f"{'/'.join(map(str, PROMPTS))} prompts = {'/'.join(str(STEPS * p) for p in PROMPTS)} rows; "
            "triton vs eager vs torch.compile, against measured matmul and copy ceilings.", ""]))
        print(f"no CUDA: wrote {stem.with_suffix('.md')} (not measured on GPU)")
        return
    rows, pf, pb = run(args.quick)
    text = report(rows, pf, pb, cmd)
    if args.smoke:
        print("SMOKE RUN: tiny shapes, Triton interpreter, host clock; the figures mean nothing.\n")
        print(text)
        return
    buf = [",".join(COLS)]
    for r in rows:
        buf.append(",".join(_fmt(r.get(k, "")) for k in COLS))
    write_atomic(stem.with_suffix(".csv"), "\n".join(buf) + "\n")
    write_atomic(stem.with_suffix(".md"), text)
    print(f"wrote {stem}.csv and .md")


if __name__ == "__main__":
    main()
