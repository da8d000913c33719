"""``kncore plan`` and ``--profile``: the command-line side of :mod:`kncore.planner`."""
from __future__ import annotations

import argparse
import functools
import importlib
import inspect
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
# they are defined; a stage's figures include the stages it calls. A function
# reached under two names (kncore.tracing.trace is kncore.tracing.core.trace)
# is listed under both, with one stage name: only the outermost call counts.
STAGES = (
    ("kncore.attribution", "_ig_chunk", "IG chunks"),
    ("kncore.attribution", "_base_pass", "attribute: base pass"),
    ("kncore.attribution", "_step_pass", "attribute: step rows, backward, reduction"),
    ("kncore.tracing", "trace", "trace: one prompt"),
    ("kncore.tracing.core", "trace", "trace: one prompt"),
    ("kncore.tracing.core", "_walk", "trace: walks"),
    ("kncore.rome.stats", "_compute", "stats: layer statistics"),
    ("kncore.rome.editing", "_edit_one", "edit: one request"),
    ("kncore.rome.templates", "context_templates", "edit: context templates"),
    ("kncore.rome.editing", "compute_keys", "edit: keys"),
    ("kncore.rome.editing", "left_vector", "edit: C^-1 k"),
    ("kncore.rome.editing", "optimise_delta", "edit: optimise v"),
)


def _plan_chunk(c: dict, out=None):
    """The plan of one ``attribution.ig_chunk`` call: the same function on the
    meta device, over items of the same lengths (no gap_tol refinement)."""
    from . import planner as P
    lengths = [len(it.ids) for it in c["items"]]

    def plan():
        P.attribute_chunk(P.meta_lm(c["lm"]), lengths, c["layers"], c["site"], c["scheme"], c["steps"])
    return plan


def _plan_trace(c: dict, out=None):
    """The plan of one ``tracing.trace`` call: its runs and grid walk on the meta device."""
    from . import planner as P
    from .tracing.core import DEFAULT_MAX_TOKENS, check_args
    lm = c["lm"]
    T = len(lm.tokenize(c["prompt"]))
    b, e = lm.subject_span(c["prompt"], c["subject"])
    kinds = check_args(c["kinds"], c["samples"], c["window"], c["seed"])
    mt = DEFAULT_MAX_TOKENS if c["max_tokens"] is None else c["max_tokens"]
    return lambda: P.trace_run(P.meta_lm(lm), T, b, e, kinds, c["samples"], c["window"], mt)


def _plan_edit(c: dict, out=None):
    """The plan of one ROME request (``rome.editing._edit_one``): ``kncore.plan``'s
    edit job over the request's own rows (its templates, prompt, target and KL
    prompts, tokenised as the run did)."""
    from . import planner as P
    from .rome.editing import build_rows
    lm, req, hp = c["lm"], c["req"], c["hp"]
    rows = build_rows(lm, req, c["templates"], hp.fact_token, hp.kl_prompts)
    n = rows.prompt_len[0]
    return lambda: P.plan_edit(P.meta_lm(lm), tokens=n, subject_end=min(n, rows.lookup[0] + 1),
                               target_tokens=len(rows.target), hparams=hp, layer=c["layer"], rows=rows).flops


def _plan_stats(c: dict, out):
    """The plan of one ``rome.stats._compute`` call: the texts it read (this rank's
    share of the first ``n_texts``, encoded and chunked as the run did), batched by
    the run's own schedule on the meta device (:func:`kncore.planner.stats_schedule`)."""
    from . import distributed as dist
    from . import planner as P
    from .rome.stats import _chunks, _encode, take
    lm = c["lm"]
    n_texts = next(iter(out.values())).n_texts
    r, w = dist.rank(), dist.world()
    texts = (t for i, t in enumerate(take(c["corp"], n_texts)) if i % w == r)
    chunks = [[len(ids) for ids in _encode(lm, ch, c["max_len"])] for ch in _chunks(texts, c["chunk_texts"])]
    return lambda: P.stats_schedule(P.meta_lm(lm), c["layers"], chunks, c["batch_tokens"], c["dtype"]).flops


# Stages timed and planned but not printed: an IG chunk is its two stages.
HIDDEN = {"IG chunks"}
# stage name -> (bound arguments of a call, its result -> a function that plans that call on
# the meta device, after the run; it returns the planned FLOPs, or None when
# they are the FLOPs counted while it runs the engine's own functions)
PLANS = {"IG chunks": _plan_chunk, "trace: one prompt": _plan_trace, "edit: one request": _plan_edit,
         "stats: layer statistics": _plan_stats}


def _device_name(device) -> str:
    import torch
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


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


def cached_matmul_peak(device) -> tuple[float, bool]:
    """(:func:`matmul_peak` of ``device``, whether it came from the cache):
    measured once per machine, device and thread count, and kept in
    ``$KNCORE_CACHE/matmul_peak.json``. An unreadable cache is measured again
    and rewritten."""
    import torch

    from .atomic import atomic_write_text
    from .loading import cache_root
    path = cache_root() / "matmul_peak.json"
    key = f"{_device_name(device)} | {torch.device(device).type} | threads {torch.get_num_threads()} | " \
          f"torch {torch.__version__}"
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    v = table.get(key)
    if isinstance(v, (int, float)) and v > 0:
        return float(v), True
    table[key] = matmul_peak(device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True))
    except OSError:  # a read-only cache: the figure is still good for this run
        pass
    return table[key], False


class Profile:
    """Wall time and FLOPs (torch's FlopCounterMode, on the real run) of each
    stage, and the planned FLOPs of the stages :data:`PLANS` can plan: each
    such call is replayed on the meta device after the run (by the engine's
    own functions for attribute and trace, so their inner stages get planned
    figures too)."""

    def __init__(self):
        self.rows: dict = {}      # name -> [calls, seconds, counted FLOPs]
        self.planned: dict = {}   # name -> planned FLOPs
        self.requests: list = []  # (name, planning function) of the calls to plan
        self.saved = []
        self.active: dict = {}    # name -> depth of its calls running now
        self.fc = None
        self.planning = None      # the counter of the meta-device replay, while it runs

    def _wrap(self, name, fn):
        import torch
        plan_of = PLANS.get(name)

        @functools.wraps(fn)
        def timed(*a, **kw):
            if self.active.get(name) or (self.planning is None and _on_meta(a)):
                # an inner call of the same stage (the outer one counts it), or
                # the planning batch_size="auto" does inside the run
                return fn(*a, **kw)
            self.active[name] = 1
            fc = self.planning or self.fc
            f0 = fc.get_total_flops()
            t0 = time.perf_counter()
            try:
                out = fn(*a, **kw)
                if self.planning is None and plan_of is not None:  # planned after the run, from the same arguments
                    self.requests.append((name, plan_of(_bind(fn, a, kw), out)))
                return out
            finally:
                self.active[name] = 0
                if self.planning is not None:
                    self.planned[name] = self.planned.get(name, 0) + fc.get_total_flops() - f0
                else:
                    if torch.cuda.is_available() and torch.cuda.is_initialized():
                        torch.cuda.synchronize()
                    r = self.rows.setdefault(name, [0, 0.0, 0])
                    r[0] += 1
                    r[1] += time.perf_counter() - t0
                    r[2] += fc.get_total_flops() - f0
        return timed

    def __enter__(self):
        from .planner import FlopCount
        for mod, fn, name in STAGES:
            m = importlib.import_module(mod)
            orig = getattr(m, fn)
            self.saved.append((m, fn, orig))
            setattr(m, fn, self._wrap(name, orig))
        self.fc = FlopCount()
        self.fc.__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.total = time.perf_counter() - self.t0
        self.fc.__exit__(*exc)
        try:
            if exc[0] is None:
                self._plan()
        finally:
            for m, fn, orig in reversed(self.saved):
                setattr(m, fn, orig)

    def _plan(self):
        """Replay the plan of every recorded call on the meta device (the
        stage wrappers still in place, counting into ``planned``)."""
        from .planner import FlopCount
        for name, plan in self.requests:
            self.planning = FlopCount(meta=True)
            with self.planning:
                val = plan()
                counted = self.planning.get_total_flops()
            self.planned[name] = self.planned.get(name, 0) + (counted if val is None else val)
        self.planning = None

    def report(self, peak: float, file=None) -> None:
        file = file or sys.stderr  # the stream of the moment, not of import time
        print(f"\nprofile (counted: FLOPs by torch's FlopCounterMode on this run; planned: kncore.plan's "
              f"FLOPs for the same calls, on the meta device; measured fp32 matmul peak "
              f"{peak / 1e9:.1f} GFLOP/s):", file=file)
        print(f"{'stage':44s} {'planned GFLOP':>13s} {'of plan':>8s} {'calls':>6s} {'seconds':>9s} "
              f"{'GFLOP':>10s} {'GFLOP/s':>9s} {'of peak':>8s}", file=file)
        plan_total = sum(self.planned.get(n, 0) for n in PLANS) if self.requests else None
        rows = [(n, r, self.planned.get(n)) for n, r in self.rows.items() if n not in HIDDEN]
        rows.append(("whole command", [1, self.total, self.fc.get_total_flops()], plan_total))
        for name, (n, s, f), pf in rows:
            rate = f / s if s > 0 else 0.0
            pl = f"{pf / 1e9:13.4f} {f / pf:8.1%}" if pf else f"{'-':>13s} {'-':>8s}"
            print(f"{name:44s} {pl} {n:6d} {s:9.3f} {f / 1e9:10.4f} {rate / 1e9:9.2f} {rate / peak:8.1%}", file=file)


def _on_meta(a) -> bool:
    """Whether a stage call runs on the meta device (its model comes first)."""
    import torch
    dev = getattr(a[0], "device", None) if a else None
    return isinstance(dev, torch.device) and dev.type == "meta"


def _bind(fn, a, kw) -> dict:
    b = inspect.signature(fn).bind(*a, **kw)
    b.apply_defaults()
    return dict(b.arguments)


def profiled(func, args):
    """Run a CLI job under :class:`Profile` and print the table to stderr."""
    import torch
    dev = "cuda" if (getattr(args, "device", "cpu") in ("auto", "cuda") or str(args.device).startswith("cuda")) \
        and torch.cuda.is_available() else "cpu"
    peak, _ = cached_matmul_peak(dev)
    with Profile() as prof:
        rc = func(args)
    prof.report(peak)
    return rc
