"""``kncore plan`` and ``--profile``: the command-line side of :mod:`kncore.planner`."""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import statistics
import sys
import time

from . import validation as V
from .errors import InputError

EXAMPLE = ("examples:\n  kncore plan llama-2-7b\n"
           "  kncore plan gpt-j-6b --jobs attribute,trace --prompts 100 --tokens 12 --dtype bfloat16\n"
           "  kncore plan path/to/config.json --json")


def add_plan_command(add) -> None:
    """Register ``plan`` with the CLI's ``add(name, func, help, parents, example)``."""
    p = add("plan", cmd_plan, "FLOPs, bytes, peak memory and predicted GPU time of each job, from the config alone",
            parents=(), example=EXAMPLE)
    p.add_argument("model", help="a shipped name (gpt2-xl, gpt-j-6b, llama-2-7b, llama-2-13b, mistral-7b, "
                                 "llama-3-8b), a config.json or a folder holding one")
    p.add_argument("--jobs", default="attribute,trace,stats,edit")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="the dtype the jobs run in (default: the config's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g = p.add_argument_group("attribute")
    g.add_argument("--prompts", type=V.arg("prompts"), default=1)
    g.add_argument("--tokens", type=V.arg("tokens"), default=16, help="tokens per prompt (attribute, trace, edit)")
    g.add_argument("--target-tokens", type=V.arg("target_tokens"), default=1)
    g.add_argument("--steps", type=V.arg("steps"), default=20)
    g.add_argument("--layers", default="all", help="attributed layers: all, or e.g. 0-5,7")
    g.add_argument("--scheme", default="riemann-left")
    g.add_argument("--site", default="act", choices=("act", "pre_act"))
    g.add_argument("--batch-size", type=V.arg("batch_size"), help="items per chunk (default: auto, for the memory below)")
    g.add_argument("--memory-gb", type=V.arg("memory_gb"), default=80.0,
                   help="GPU memory the 'auto' batch is planned for (default: %(default)s)")
    g = p.add_argument_group("trace")
    g.add_argument("--subject", default="0:3", help="subject tokens b:e (default: %(default)s)")
    g.add_argument("--kinds", default="hidden,mlp,attn")
    g.add_argument("--samples", type=V.arg("samples"), default=10)
    g.add_argument("--window", type=V.arg("window"), default=10)
    g = p.add_argument_group("stats")
    g.add_argument("--stats-layers", help="layers (default: the edit layer)")
    g.add_argument("--texts", type=V.arg("texts"), default=100000, help="texts (default: %(default)s, ROME's)")
    g.add_argument("--text-tokens", type=V.arg("text_tokens"), help="tokens per text (default: the truncation length)")
    g = p.add_argument_group("edit")
    g.add_argument("--hparams", help="ROME hyper-parameters (default: the model's shipped file)")


def _layers(spec: str | None):
    if spec in (None, "all"):
        return None
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def cmd_plan(args) -> int:
    from . import planner as P
    from .attribution import AUTO_MEMORY_FRACTION
    try:
        b, e = (int(x) for x in args.subject.split(":"))
    except ValueError:
        raise InputError(f"--subject {args.subject!r}: give token positions b:e, e.g. 0:3") from None
    ml = P.meta_lm(args.model, args.dtype)
    budget = int((args.memory_gb * 1e9 - P._weights_bytes(ml)) * AUTO_MEMORY_FRACTION["cuda"])
    attr = dict(prompts=args.prompts, tokens=args.tokens, target_tokens=args.target_tokens, steps=args.steps,
                layers=_layers(args.layers), scheme=args.scheme, site=args.site,
                batch_size=args.batch_size or "auto", memory_bytes=max(1, budget))
    stats_layers = _layers(args.stats_layers)
    if stats_layers is None and ml.adapter.causal:
        stats_layers = P.edit_hparams(ml, args.hparams).layers[:1]
    edit = dict(tokens=args.tokens, hparams=args.hparams)
    plan = P.plan(args.model, jobs=args.jobs.split(","), dtype=args.dtype, attribute=attr,
                  trace=dict(tokens=args.tokens, subject=(b, e), kinds=tuple(args.kinds.split(",")),
                             samples=args.samples, window=args.window),
                  stats=dict(layers=stats_layers, texts=args.texts, text_tokens=args.text_tokens), edit=edit)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(plan)
    return 0


# ---------------------------------------------------------------------------
# --profile
# ---------------------------------------------------------------------------
# (module, function, stage name): the stages of the CLI jobs, timed where
# they are defined; a stage's figures include the stages it calls.
STAGES = (
    ("kncore.attribution", "_base_pass", "attribute: base pass"),
    ("kncore.attribution", "_step_pass", "attribute: step rows, backward, reduction"),
    ("kncore.tracing.core", "trace", "trace: one prompt"),
    ("kncore.tracing.core", "_walk", "trace: walks"),
    ("kncore.rome.stats", "_compute", "stats: layer statistics"),
    ("kncore.rome.templates", "context_templates", "edit: context templates"),
    ("kncore.rome.editing", "compute_keys", "edit: keys"),
    ("kncore.rome.editing", "left_vector", "edit: C^-1 k"),
    ("kncore.rome.editing", "optimise_delta", "edit: optimise v"),
)


def matmul_peak(device, d: int = 768, rows: int = 1024, reps: int = 3) -> float:
    """Measured FLOP/s of an fp32 [rows, d] x [d, 4d] matmul on the device (an MLP's shape)."""
    import torch
    a = torch.randn(rows, d, device=device)
    w = torch.randn(d, 4 * d, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ w
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ w
        sync()
        ts.append(time.perf_counter() - t0)
    return 2 * rows * d * 4 * d / statistics.median(ts)


class Profile:
    """Wall time and FLOPs (torch's FlopCounterMode, on the real run) of each stage."""

    def __init__(self):
        self.rows: dict = {}
        self.saved = []
        self.fc = None

    def _wrap(self, name, fn):
        import torch
        @functools.wraps(fn)
        def timed(*a, **kw):
            f0 = self.fc.get_total_flops()
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    torch.cuda.synchronize()
                r = self.rows.setdefault(name, [0, 0.0, 0])
                r[0] += 1
                r[1] += time.perf_counter() - t0
                r[2] += self.fc.get_total_flops() - f0
        return timed

    def __enter__(self):
        from torch.utils.flop_counter import FlopCounterMode
        for mod, fn, name in STAGES:
            m = importlib.import_module(mod)
            orig = getattr(m, fn)
            self.saved.append((m, fn, orig))
            setattr(m, fn, self._wrap(name, orig))
        self.fc = FlopCounterMode(display=False)
        self.fc.__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.total = time.perf_counter() - self.t0
        self.fc.__exit__(*exc)
        for m, fn, orig in reversed(self.saved):
            setattr(m, fn, orig)

    def report(self, peak: float, file=None) -> None:
        file = file or sys.stderr  # the stream of the moment, not of import time
        print(f"\nprofile (FLOPs counted by torch's FlopCounterMode on this run; measured fp32 matmul peak "
              f"{peak / 1e9:.1f} GFLOP/s):", file=file)
        print(f"{'stage':44s} {'calls':>6s} {'seconds':>9s} {'GFLOP':>10s} {'GFLOP/s':>9s} {'of peak':>8s}",
              file=file)
        rows = list(self.rows.items()) + [("whole command", [1, self.total, self.fc.get_total_flops()])]
        for name, (n, s, f) in rows:
            rate = f / s if s > 0 else 0.0
            print(f"{name:44s} {n:6d} {s:9.3f} {f / 1e9:10.3f} {rate / 1e9:9.2f} {rate / peak:8.1%}", file=file)


def profiled(func, args):
    """Run a CLI job under :class:`Profile` and print the table to stderr."""
    import torch
    dev = "cuda" if (getattr(args, "device", "cpu") in ("auto", "cuda") or str(args.device).startswith("cuda")) \
        and torch.cuda.is_available() else "cpu"
    peak = matmul_peak(dev)
    with Profile() as prof:
        rc = func(args)
    prof.report(peak)
    return rc
