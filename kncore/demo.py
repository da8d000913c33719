"""``make demo`` / ``python -m kncore demo``: a short tour of kncore on the
embedded SmolLM2-135M.

1. **Knowledge neurons** (integrated gradients, Dai et al. 2022) of two
   syntactic classes (determiner-noun agreement: ``these`` -> plural noun,
   ``this`` -> singular noun) and three facts (the capitals of Canada, France
   and Japan), each in six paraphrases, refined with Niu et al.'s adaptive
   sharing threshold per group (syntactic, factual).
2. **Suppress and enhance** each item's neurons and measure the probability of
   its targets, of the competing answers (the other grammatical number,
   another city) and of the other items' targets.
3. **Causal tracing** (Meng et al. 2022) of "The capital of Canada is".
4. A **ROME edit** (Canada's capital -> Rome), evaluated for reliability,
   generality, locality, bijective symmetry and synonymy, then undone; every
   weight is checked to be byte-identical afterwards.
5. The **report** (HTML and Markdown) of the run directory.

Everything goes into one run directory (default ``runs/demo``; tables in the
schemas of ``kncore localise``, ``trace`` and ``edit``, so
:func:`kncore.report.write` draws every figure) plus ``demo.json``, a summary
of the results. Re-running the same command resumes: finished steps are read
back, not recomputed. ``--fresh`` starts over; a different config pointed at
the same directory is refused. ``--quick`` is a reduced tour (three prompts
per item, six Gauss-Legendre IG steps, four trace samples, ROME statistics
from 100 texts; default directory ``runs/demo-quick``) for tests; ``--limit N``
keeps the first N prompts of each item.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .lm import InputError

MODEL = "smollm2-135m"
DEFAULT_OUT = "runs/demo"
DEMO_VERSION = 1  # bump when the built-in prompts or the steps change: old run directories are then refused


# -- what the demo asks ------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One fact or syntactic class: paraphrases that share an answer type.

    ``targets[j]`` is the answer of ``prompts[j]`` (one token);
    ``competitors[j]`` a competing answer (the other grammatical number,
    another city) whose probability is watched when the neurons are patched.
    """

    key: str
    group: str
    label: str
    subject: str
    prompts: tuple
    targets: tuple
    competitors: tuple


# SmolLM2-135M predicts each target among its top 5 tokens (probabilities from
# 0.02 to 0.65, checked when the demo runs; the nouns and their other number are
# single tokens). Prompt j of both classes uses the same verb.
_NOUNS = [("Please answer", "question", "questions"), ("She planted", "seed", "seeds"),
          ("Solve", "equation", "equations"), ("They sold", "product", "products"),
          ("Open", "function", "functions"), ("Look at", "example", "examples")]
# Templates under which SmolLM2 answers each capital top-1 (0.25-0.96).
CAPITAL_TEMPLATES = ("The capital of {} is", "The capital city of {} is", "The capital of {} is the city of",
                     "The government of {} is based in", "In {}, the capital is", "The national capital of {} is")
_CAPITALS = [("Canada", "Ottawa", "Toronto"), ("France", "Paris", "Lyon"), ("Japan", "Tokyo", "Kyoto")]


def items(n_prompts: int | None = None) -> list[Item]:
    """The demo's syntactic classes and facts (the first ``n_prompts`` prompts of each)."""
    n = slice(None, n_prompts)
    out = [Item("det/plural", "syntactic", "these -> plural noun", "these",
                tuple(f"{v} these" for v, _, _ in _NOUNS)[n], tuple(f" {p}" for _, _, p in _NOUNS)[n],
                tuple(f" {s}" for _, s, _ in _NOUNS)[n]),
           Item("det/singular", "syntactic", "this -> singular noun", "this",
                tuple(f"{v} this" for v, _, _ in _NOUNS)[n], tuple(f" {s}" for _, s, _ in _NOUNS)[n],
                tuple(f" {p}" for _, _, p in _NOUNS)[n])]
    for country, capital, other in _CAPITALS:
        k = len(CAPITAL_TEMPLATES[n])
        out.append(Item(f"capital/{country.lower()}", "factual", f"{country} -> {capital}", country,
                        tuple(t.format(country) for t in CAPITAL_TEMPLATES)[n], (f" {capital}",) * k,
                        (f" {other}",) * k))
    return out


def edit_case():
    """The ROME edit (Canada's capital -> Rome) and its probes, built with
    :mod:`kncore.evaluation`'s EditKnowledge (symmetry: the reverse relation's
    templates; synonymy: Canada's former name)."""
    from . import evaluation

    prompt = CAPITAL_TEMPLATES[0].format("Canada")
    probes = [evaluation.Probe("reliability", prompt, "Rome", "Ottawa")]
    probes += [evaluation.Probe("generality", t.format("Canada"), "Rome", "Ottawa") for t in CAPITAL_TEMPLATES[1:]]
    probes += [evaluation.Probe("locality", CAPITAL_TEMPLATES[0].format(c), a, "Rome")
               for c, a in (("France", "Paris"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Russia", "Moscow"),
                            ("Spain", "Madrid"))]
    know = evaluation.EditKnowledge()
    know.reverse_templates["P1376"] = ["{} is the capital of", "{} is the capital city of"]
    know.add_facts("P1376", [("Rome", "Italy"), ("Ottawa", "Canada")])
    know.synonyms.append(evaluation.SynonymRule(["P36"], {"Canada": ["the Dominion of Canada"]}))
    probes += know.symmetry_probes("P36", "Canada", "Rome")
    probes += know.synonymy_probes("P36", "Canada", prompt, "Rome", "Ottawa")
    return evaluation.EditCase("canada-rome", "Canada", prompt, "Rome", "Ottawa", "P36", probes, "kncore demo")


@dataclass(frozen=True)
class Settings:
    """Sizes of the tour (``--quick`` shrinks them)."""

    n_prompts: int | None = None       # per item (None: all six)
    steps: int = 20                    # IG quadrature points (Dai et al.)
    scheme: str = "riemann-left"
    adaptive_threshold: float = 0.2    # coarse neurons: score > 0.2 x max (Dai et al., Niu et al.)
    p: str = "adaptive"                # sharing threshold (Niu et al.)
    enhance_factor: float = 2.0
    trace_samples: int = 10            # ROME's
    trace_window: int = 10
    stats_texts: int | None = None     # ROME statistics: texts of the hparams' corpus (None: the hparams' count)

    @classmethod
    def for_args(cls, args) -> "Settings":
        quick = bool(getattr(args, "quick", False))
        # Gauss-Legendre needs fewer steps for the same completeness: on SmolLM2, 4 Canada prompts x 30
        # layers, 8 Gauss steps gave a median gap of 2e-5 in half the time of 20 riemann-left steps (gap 0.04).
        s = cls(n_prompts=3, steps=6, scheme="gauss", trace_samples=4, stats_texts=100) if quick else cls()
        if getattr(args, "limit", None) is not None:
            if args.limit < 2:
                raise InputError("--limit: the demo needs at least 2 prompts per item (refinement compares them)")
            s = dataclasses.replace(s, n_prompts=min(args.limit, len(CAPITAL_TEMPLATES)))
        return s


# -- command line ---------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's own options (added to ``kncore demo``'s parser)."""
    g = p.add_argument_group("demo")
    g.add_argument("--quick", action="store_true",
                   help="a reduced tour: 3 prompts per item, 6 IG steps, 4 trace samples, ROME statistics "
                        "from 100 texts (about a minute)")
    g.add_argument("--fresh", action="store_true", help="delete the demo's run directory first and start over")


def build_parser() -> argparse.ArgumentParser:
    from .cli import common_options

    p = argparse.ArgumentParser(prog="python -m kncore.demo", parents=[common_options()],
                                description="A short tour of kncore on the embedded SmolLM2-135M.")
    add_arguments(p)
    return p


def main(args=None) -> int:
    """Run the tour. ``args``: the ``kncore demo`` namespace, or an argv list
    (``python -m kncore.demo [--quick] [--fresh] [--out DIR]``); returns 0."""
    if args is None or isinstance(args, (list, tuple)):
        args = build_parser().parse_args(args)
    _quiet()
    return Demo(args).run()


def _quiet() -> None:
    """No weight-loading bars or library chatter in the demo's output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# -- output helpers -------------------------------------------------------------------------
def _section(n: int, title: str) -> None:
    print(f"\n[{n}/5] {title}", flush=True)


def _table(header: list, rows: list, indent: str = "  ") -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, r in enumerate(cells):
        line = "  ".join(c.ljust(w) if i == 0 or not _numeric(c) else c.rjust(w) for i, (c, w) in
                         enumerate(zip(r, widths)))
        print(indent + line.rstrip())
        if k == 0:
            print(indent + "  ".join("-" * w for w in widths))
    sys.stdout.flush()


def _numeric(s: str) -> bool:
    return bool(s) and (s[0].isdigit() or (s[0] in "+-" and len(s) > 1 and s[1].isdigit()))


def _p(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else math.nan


def _layers_str(layers) -> str:
    return ",".join(str(L) for L in sorted(set(layers))) or "-"


def _weights_digest(lm) -> dict:
    """SHA-256 of every parameter's and buffer's bytes."""
    import torch

    out = {}
    for name, t in list(lm.model.named_parameters()) + list(lm.model.named_buffers()):
        x = t.detach().contiguous().cpu()
        out[name] = hashlib.sha256(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"").hexdigest()
    return out


class _StatsProgress:
    """``layer_stats``' progress callback: counts texts, and draws a bar on a terminal."""

    def __init__(self, bar: bool):
        self.want_bar, self.bar, self.texts = bar, None, 0

    def __call__(self, info: dict):
        if self.want_bar and self.bar is None:
            from tqdm.auto import tqdm
            self.bar = tqdm(unit="text", desc="  ROME statistics", leave=False, dynamic_ncols=True)
        if self.bar is not None:
            self.bar.update(info["texts"] - self.texts)
        self.texts = info["texts"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


# -- the tour -----------------------------------------------------------------------------------
class Demo:
    def __init__(self, args):
        self.args = args
        self.settings = Settings.for_args(args)
        self.items = items(self.settings.n_prompts)
        quick = bool(getattr(args, "quick", False))
        # the quick tour has its own default directory, so it never collides with the full one
        self.out = Path(getattr(args, "out", None) or (DEFAULT_OUT + "-quick" if quick else DEFAULT_OUT))
        self.tty = sys.stderr.isatty() and getattr(args, "progress", True)
        self.times: dict = {}

    # -- plumbing -----------------------------------------------------------------
    def config(self, hp) -> dict:
        s = self.settings
        case = edit_case()
        return {"demo": DEMO_VERSION, "quick": bool(getattr(self.args, "quick", False)), "seed": self.args.seed,
                "dtype": self.args.dtype, "settings": dataclasses.asdict(s),
                "items": [dataclasses.asdict(it) for it in self.items],
                "trace": {"prompt": case.prompt, "subject": case.subject, "kinds": ["hidden", "mlp", "attn"],
                          "noise": "3sd", "seed": 1},
                "edit": {"case": case.to_dict(), "hparams": {k: v for k, v in dataclasses.asdict(hp).items()
                                                             if k != "ignored"}}}

    def _clear(self) -> None:
        """``--fresh``: delete the run directory, but only one the demo made (or an empty one)."""
        if not (getattr(self.args, "fresh", False) and self.out.exists()):
            return
        man = self.out / "manifest.json"
        try:
            is_demo = man.is_file() and json.loads(man.read_text()).get("command") == "demo"
        except (OSError, ValueError, AttributeError):
            is_demo = False
        if not (is_demo or (self.out.is_dir() and not any(self.out.iterdir()))):
            raise InputError(f"--fresh: {self.out} is not a demo run directory; not deleting it "
                             f"(choose another --out)")
        shutil.rmtree(self.out)

    def _open(self, hp):
        from .rundir import RunDir, RunDirMismatch, config_diff

        fresh_dir = not (self.out / "manifest.json").exists()
        cfg = self.config(hp)
        try:
            rd = RunDir.open(self.out, cfg, self.lm, command="demo",
                             extra={"device": str(self.lm.device), "argv": sys.argv[1:]})
        except RunDirMismatch as e:
            old = RunDir.load(self.out).manifest
            what = [d.split(":")[0] for d in config_diff(old.get("config") or {}, cfg)]
            if old.get("command") != "demo":
                what.insert(0, f"command {old.get('command')!r}")
            if not what:  # the model fingerprint
                what = [str(e).split("refusing to mix results")[-1]]
            # `kncore demo` has --fresh (kncore.cli adds it); a namespace without it: `python -m kncore.demo` has it
            fresh = "--fresh" if hasattr(self.args, "fresh") else f"'python -m kncore.demo --fresh --out {self.out}'"
            raise InputError(f"{self.out} holds a run made with another config (differs in: {', '.join(what)}); "
                             f"start over with {fresh} or use another --out") from None
        return rd, fresh_dir

    def _resumed(self, name: str) -> bool:
        """Whether step ``name`` was finished by an earlier run (then its stored time is taken)."""
        if name not in self.rd.done_keys("stages"):
            return False
        row = next(r for r in self.rd.read("stages").to_pylist() if r["key"] == name)
        self.times[name] = (row["seconds"], True)
        return True

    @contextmanager
    def _stage(self, name: str):
        """Time a step; its time is stored so a resumed run still reports it.
        Yields False (and the body must skip the work) when an earlier run finished it."""
        if self._resumed(name):
            yield False
            return
        t0 = time.perf_counter()
        yield True
        dt = time.perf_counter() - t0
        self.rd.append("stages", [{"key": name, "seconds": round(dt, 2)}])
        self.times[name] = (dt, False)

    def _took(self, name: str) -> str:
        dt, resumed = self.times.get(name, (0.0, False))
        return f"{dt:.0f} s in an earlier run" if resumed else f"{dt:.0f} s"

    # -- main ---------------------------------------------------------------------
    def run(self) -> int:
        from . import jobs, rome

        t_start = time.perf_counter()
        model = getattr(self.args, "model", MODEL) or MODEL
        if model != MODEL:
            raise InputError(f"the demo's prompts were chosen for {MODEL}; --model {model!r} is not supported "
                             f"(use 'kncore localise/trace/edit' for other models)")
        self._clear()
        jobs.seed_everything(self.args.seed)
        from .loading import cache_root
        if not (cache_root() / MODEL / "kncore-cache.json").exists():
            print(f"first run: dequantising {MODEL}'s GGUF file once, cached under {cache_root()}", flush=True)
        t0 = time.perf_counter()
        self.lm = lm = jobs.load_model(MODEL, device=jobs.choose_device(self.args.device), dtype=self.args.dtype)
        t_load = time.perf_counter() - t0
        self.hp = rome.hparams_for(lm)
        self.rd, new = self._open(self.hp)
        s = self.settings
        n_prompts = sum(len(it.prompts) for it in self.items)
        print(f"kncore demo: {lm.name} ({lm.n_layers} layers x {lm.d_ff} MLP neurons, {lm.dtype}, {lm.device}) "
              f"loaded in {t_load:.0f} s")
        print(f"run directory: {self.out} ({'new' if new else 'resuming: finished steps are read back'})"
              + ("  [--quick]" if getattr(self.args, "quick", False) else ""))
        try:
            self.check_predictions()
            _section(1, f"Knowledge neurons: integrated gradients ({s.steps} {s.scheme} steps, all {lm.n_layers} "
                        f"layers) on {n_prompts} prompts, coarse > {s.adaptive_threshold} x max, adaptive "
                        f"sharing threshold tau")
            self.localise()
            _section(2, f"Suppress (x0) and enhance (x{s.enhance_factor:g}) each item's knowledge neurons "
                        f"(at the predicting position)")
            self.effects()
            _section(3, "Causal tracing (ROME): 'The capital of Canada is', subject 'Canada'")
            self.trace()
            _section(4, "ROME edit: the capital of Canada -> Rome, evaluated, then undone")
            self.edit()
            _section(5, "Report")
            summary = self.summary(time.perf_counter() - t_start, t_load)
            self.rd.update_manifest(summary=summary["flat"])
            from .report import write
            from .atomic import atomic_write_text
            atomic_write_text(self.out / "demo.json", json.dumps(summary["full"], indent=1, default=float) + "\n")
            self.plot_related()
            html, md = write(self.rd)
        finally:
            self.rd.close()
        wall = time.perf_counter() - t_start
        print(f"  HTML:     {html}\n  Markdown: {md}\n  summary:  {self.out / 'demo.json'}")
        steps = [k for k in ("localise", "effects", "trace", "stats", "edit") if k in self.times]
        now = ", ".join(f"{k} {self.times[k][0]:.0f} s" for k in steps if not self.times[k][1])
        before = ", ".join(f"{k} {self.times[k][0]:.0f} s" for k in steps if self.times[k][1])
        print(f"\ndone in {wall:.0f} s (model load {t_load:.0f} s" + (f", {now}" if now else "") + ")"
              + (f"; read back from an earlier run: {before} (--fresh recomputes)" if before else ""))
        return 0

    # -- 0. the model knows the answers -------------------------------------------------
    def check_predictions(self):
        """Every target and competitor is one token; warn when a target is not in the top 5."""
        lm = self.lm
        prompts = [q for it in self.items for q in it.prompts]
        probs = lm.next_token_probs(prompts)
        j = 0
        weak = []
        for it in self.items:
            for q, t, c in zip(it.prompts, it.targets, it.competitors):
                tid = lm.single_token(q, t)
                lm.single_token(q, c)
                rank = int((probs[j] > probs[j, tid]).sum()) + 1
                if rank > 5:
                    weak.append(f"{q!r} -> {t!r} (rank {rank})")
                j += 1
        if weak:
            print(f"  note: {len(weak)} target(s) outside the model's top 5: " + "; ".join(weak))

    # -- 1. knowledge neurons ---------------------------------------------------------------
    def bags(self) -> list[dict]:
        """The items as :mod:`kncore.pipeline` fact bags."""
        return [{"key": it.key, "group": it.group, "subject": it.subject, "prompts": list(it.prompts),
                 "targets": list(it.targets)} for it in self.items]

    def localise(self):
        from . import pipeline

        lm, rd, s = self.lm, self.rd, self.settings
        with self._stage("localise") as todo:
            if todo:
                done = rd.done_keys("bags")
                for it, bag in zip(self.items, self.bags()):
                    if it.key in done:
                        continue
                    t0 = time.perf_counter()
                    rows = pipeline.attribute_bags(lm, [bag], adaptive_threshold=s.adaptive_threshold, steps=s.steps,
                                                   scheme=s.scheme, progress=False)
                    rd.commit(rows, keys=[it.key])
                    dt = time.perf_counter() - t0
                    print(f"  IG {it.label:24} {len(it.prompts)} prompts  {dt:5.1f} s", flush=True)
                # Niu et al.'s refinement per group (one adaptive tau each), in ``kncore localise``'s schema
                pipeline.refine_groups(rd, self.bags(), s.p, lm.n_layers)
        self._print_kn()

    def kns(self) -> dict:
        from .pipeline import read_kns

        out: dict = {it.key: [] for it in self.items}
        out.update(read_kns(self.rd))
        return out

    def _print_kn(self):
        rd = self.rd
        loc = {r["key"]: r for r in rd.read("localisation").to_pylist()}
        prompts = rd.read("prompts").to_pylist()
        coarse_n = {}
        for r in prompts:
            coarse_n.setdefault(r["key"], []).append(r["n_coarse"])
        kns = self.kns()
        rows = []
        for it in self.items:
            pr = [r for r in prompts if r["key"] == it.key]
            rows.append([it.label, it.group, len(pr), _p(_mean(r["base_prob"] for r in pr)),
                         f"{_mean(coarse_n.get(it.key, [])):.1f}", len(kns[it.key]),
                         _layers_str(L for L, _ in kns[it.key]),
                         f"{_mean(r['median_gap'] for r in pr):.3f}"])
        _table(["item", "group", "prompts", "P(target)", "coarse/prompt", "KNs", "KN layers", "IG gap"], rows)
        for g, r in loc.items():
            print(f"  {g}: tau = {r['tau']:.2f} ({'converged' if r['converged'] else 'not converged'}), "
                  f"{r['kn']:.1f} KNs per item, R1^2 of attributions {_p(r.get('r1_sq'))}")
        print(f"  (IG gap: median over layers of |sum IG - (F(a) - F(0))| / |F(a) - F(0)|; "
              f"{self._took('localise')})")

    # -- 2. suppress / enhance ----------------------------------------------------------------
    def effects(self):
        from . import interventions

        lm, rd, s = self.lm, self.rd, self.settings
        with self._stage("effects") as todo:
            if todo:
                import torch

                kns = self.kns()
                prompts = [q for it in self.items for q in it.prompts]
                owner = [(it, j) for it in self.items for j in range(len(it.prompts))]
                tid = torch.tensor([[lm.single_token(q, t), lm.single_token(q, c)] for it in self.items
                                    for q, t, c in zip(it.prompts, it.targets, it.competitors)], device=lm.device)
                before = lm.next_token_probs(prompts).gather(1, tid).tolist()
                done = rd.done_keys("effect")
                for it in self.items:
                    if it.key in done:
                        continue
                    eff, rel = [], []
                    for mode in ("suppress", "enhance") if kns[it.key] else ():
                        with interventions.patch_neurons(lm, kns[it.key], mode=mode, factor=s.enhance_factor):
                            after = lm.next_token_probs(prompts).gather(1, tid).tolist()
                        for i, (q, (o, j)) in enumerate(zip(prompts, owner)):
                            base = {"key": it.key, "relation": it.group, "prompt": q, "intervention": mode,
                                    "n_kn": len(kns[it.key])}
                            if o is it:
                                eff.append(dict(base, target=o.targets[j], p_before=before[i][0], p_after=after[i][0]))
                                rel.append(dict(base, role="competitor", token=o.competitors[j],
                                                p_before=before[i][1], p_after=after[i][1]))
                            else:
                                rel.append(dict(base, role="other items", token=o.targets[j],
                                                p_before=before[i][0], p_after=after[i][0]))
                    rd.commit({"effect": eff, "effect_related": rel}, keys=[it.key])
        self._print_effects()

    def _print_effects(self):
        eff = self.rd.read("effect").to_pylist()
        rel = self.rd.read("effect_related").to_pylist()
        rows = []
        for it in self.items:
            mine = [r for r in eff if r["key"] == it.key]
            if not mine:
                rows.append([it.label, 0] + ["-"] * 9)
                continue
            row = [it.label, mine[0]["n_kn"]]
            for src, role in ((mine, None), (rel, "competitor"), (rel, "other items")):
                rr = [r for r in src if r["key"] == it.key and (role is None or r["role"] == role)]
                sup = [r for r in rr if r["intervention"] == "suppress"]
                row += [_p(_mean(r["p_before"] for r in sup)), _p(_mean(r["p_after"] for r in sup)),
                        _p(_mean(r["p_after"] for r in rr if r["intervention"] == "enhance"))]
            rows.append(row)
        print("  mean probability: before / with the item's neurons suppressed / enhanced")
        _table(["item", "KNs", "target", "supp.", "enh.", "competitor", "supp.", "enh.", "other items' targets",
                "supp.", "enh."], rows)
        from .report import effect_summary

        import pyarrow as pa
        summ = effect_summary(pa.Table.from_pylist(eff)) if eff else []
        if summ:
            print("  relative change of the target, (after - before) / min(before, after) as Niu et al., "
                  "with a one-sample t-test:")
            _table(["group", "intervention", "prompts", "mean change", "p-value", ""],
                   [[r["relation"], r["intervention"], r["n"], f"{r['mean_change_pct']:+.0f}%",
                     f"{r['p_value']:.2g}", r["significance"]] for r in summ])
        print(f"  (competitor: the other grammatical number / another city; {self._took('effects')})")

    def plot_related(self):
        """Bars of the relative change of targets, competitors and other items' targets (plots/)."""
        from .plots import plot_probability_changes, probability_change_stats

        eff = self.rd.read("effect").to_pylist()
        rel = self.rd.read("effect_related").to_pylist()
        labels = {it.key: it.label for it in self.items}
        for mode in ("suppress", "enhance"):
            path = self.rd.plots_dir / f"effect_by_item_{mode}.png"
            by: dict = {}
            for role, src in (("target", eff), ("competitor", rel), ("other items' targets", rel)):
                stats = []
                for it in self.items:
                    rr = [r for r in src if r["key"] == it.key and r["intervention"] == mode
                          and (src is eff or r["role"] == ("competitor" if role == "competitor" else "other items"))
                          and min(r["p_before"], r["p_after"]) > 0]
                    if not rr:
                        stats.append({"token": labels[it.key], "mean_change": 0.0, "significant": False})
                        continue
                    st = probability_change_stats([[r["p_before"]] for r in rr], [[r["p_after"]] for r in rr],
                                                  [labels[it.key]])[0]
                    stats.append(st)
                by[role] = stats
            if any(s["mean_change"] for v in by.values() for s in v):
                plot_probability_changes(by, path, title=f"{mode.capitalize()} each item's knowledge neurons: "
                                                          f"relative probability change (* p < 0.05)")

    # -- 3. causal tracing --------------------------------------------------------------------
    def trace(self):
        from . import pipeline, tracing

        lm, rd, s = self.lm, self.rd, self.settings
        case = edit_case()
        key = "canada"
        with self._stage("trace") as todo:
            if todo:
                res = tracing.trace(lm, case.prompt, case.subject, kinds=("hidden", "mlp", "attn"),
                                    samples=s.trace_samples, noise="3sd", window=s.trace_window, seed=1)
                rows = pipeline.trace_rows(key, res)
                rec = [pipeline.trace_record_row({"key": key, "prompt": case.prompt, "subject": case.subject,
                                                  "attribute": case.target_true}, "traced", res)]
                rd.commit({"records": rec, "trace": rows}, keys=[key])
        rows = rd.read("trace").to_pylist()
        r0 = rows[0]
        print(f"  P({r0['target'].strip()}): clean {r0['high_score']:.3f}, subject corrupted "
              f"(noise {r0['noise']:.3g}, {r0['samples']} samples) {r0['low_score']:.3g}")
        b, e = r0["subject_start"], r0["subject_end"]
        for r in rows:
            sc = r["scores"]
            t, L = max(((t, L) for t in range(len(sc)) for L in range(len(sc[0]))), key=lambda x: sc[x[0]][x[1]])
            last = sc[e - 1]
            Lsub = max(range(len(last)), key=last.__getitem__)
            what = {"hidden": "hidden state", "mlp": f"MLP outputs (window {r['window']})",
                    "attn": f"attention outputs (window {r['window']})"}[r["kind"]]
            print(f"  restoring {what:30}: best {sc[t][L]:.3f} at token {r['tokens'][t]!r} layer {L}; "
                  f"at the last subject token best at layer {Lsub} ({last[Lsub]:.3f})")
        print(f"  (ROME edits SmolLM2 at layer {self.hp.layers[0]}; {self._took('trace')})")

    # -- 4. ROME -----------------------------------------------------------------------------------
    def edit(self):
        from . import evaluation
        from . import rome

        lm, rd, hp = self.lm, self.rd, self.hp
        case = edit_case()
        key = "canada-rome"
        stats = None
        if key not in rd.done_keys("edit_eval"):
            if hp.mom2_adjustment:
                # Not a resumable stage: layer_stats keeps its own cache (and checkpoints).
                n = self.settings.stats_texts or hp.mom2_n_samples
                t0 = time.perf_counter()
                with _StatsProgress(self.tty) as prog:
                    stats = rome.layer_stats(lm, hp.layers, hp.mom2_dataset, n_samples=n, dtype=hp.mom2_dtype,
                                          progress=prog)
                st = stats[hp.layers[0]]
                dt = time.perf_counter() - t0
                self.times["stats"] = (dt, False)
                where = (f"computed in {dt:.0f} s, now cached" if prog.texts else
                         f"read from the cache{f' {st.path.parent}' if st.path else ''}")
                print(f"  statistics C = E[k k^T] at layer {hp.layers[0]}: {st.n_texts} texts of "
                      f"'{hp.mom2_dataset}', {st.n_tokens:,} tokens ({where})")
            with self._stage("edit") as todo:
                if todo:
                    self._edit_and_eval(case, key, stats, evaluation, rome)
        else:
            self._resumed("edit")
        self._print_edit()

    def _edit_and_eval(self, case, key, stats, evaluation, rome):
        lm, hp = self.lm, self.hp
        before = _weights_digest(lm)
        info: dict = {}

        @contextmanager
        def rome_edit(c):
            with rome.edit(lm, c.request(), hp, stats=stats) as e:
                during = _weights_digest(lm)
                info["changed"] = sorted(n for n in before if during[n] != before[n])
                info["p_target_opt"] = float(e.steps[-1].p_target)
                info["top_post"] = lm.top_k(c.prompt, 3)
                yield
        info["top_pre"] = lm.top_k(case.prompt, 3)
        row = evaluation.evaluate_edits(lm, [case], rome_edit, details=True)[0]
        after = _weights_digest(lm)
        same = [n for n in before if after[n] == before[n]]
        probes = []
        for d in row.pop("probes"):
            d = dict(d, key=key)
            if d.get("foil_prob_pre") is not None:
                d["success_pre"] = d["prob_pre"] > d["foil_prob_pre"]
                d["success_post"] = d["prob_post"] > d["foil_prob_post"]
            probes.append(d)
        top_tok, top_p = info["top_post"][0]
        row.update(key=key, method="rome", case_id=str(row.get("case_id")), layer=hp.layers[0],
                   top1_pre=info["top_pre"][0][0], top1_post=top_tok, top1_post_prob=top_p,
                   top3_pre=json.dumps(info["top_pre"]), top3_post=json.dumps(info["top_post"]),
                   p_target_optimised=info["p_target_opt"], weights_changed=info["changed"],
                   n_tensors=len(before), undo_byte_identical=len(same) == len(before))
        self.rd.commit({"edit_eval": [row], "edit_probes": probes}, keys=[key])

    def _print_edit(self):
        row = self.rd.read("edit_eval").to_pylist()[0]
        probes = self.rd.read("edit_probes").to_pylist()
        fmt = lambda top: ", ".join(f"{t!r} {p:.3f}" for t, p in json.loads(top))  # noqa: E731
        lead = f"  ROME at layer {row['layer']}: '{edit_case().prompt}' top-3 "
        print(f"{lead}before: {fmt(row['top3_pre'])}")
        print(f"{'':{len(lead)}} after: {fmt(row['top3_post'])}")
        rows = []
        for d in probes:
            ok = lambda v: "-" if v is None else ("yes" if v else "no")  # noqa: E731
            rows.append([d["kind"], d["prompt"], d["target"].strip(), (d.get("foil") or "").strip(),
                         _p(d["prob_pre"]), _p(d["prob_post"]), _p(d.get("foil_prob_post")),
                         f"{ok(d.get('success_pre'))} -> {ok(d.get('success_post'))}"])
        _table(["probe", "prompt", "target", "foil", "P before", "P after", "P(foil) after",
                "target > foil"], rows)
        kinds = list(dict.fromkeys(d["kind"] for d in probes))
        parts = []
        for k in kinds:
            kk = [d for d in probes if d["kind"] == k and d.get("success_post") is not None]
            parts.append(f"{k} {sum(bool(d['success_post']) for d in kk)}/{len(kk)}")
        print("  success after the edit (target more likely than foil): " + ", ".join(parts))
        changed = list(row["weights_changed"] or [])
        verdict = "all byte-identical" if row["undo_byte_identical"] else "NOT identical"
        print(f"  undo: the edit changed {len(changed)} of {row['n_tensors']} tensors ({', '.join(changed)}); "
              f"after undo {verdict} to the original (SHA-256 of every tensor)")
        print(f"  (edit and evaluation: {self._took('edit')})")

    # -- 5. summary ------------------------------------------------------------------------------
    def summary(self, wall: float, t_load: float) -> dict:
        rd = self.rd
        loc = {r["key"]: r for r in rd.read("localisation").to_pylist()}
        kns = self.kns()
        eff = rd.read("effect").to_pylist()
        prompts = rd.read("prompts").to_pylist()
        facts = {}
        for it in self.items:
            e = {m: [r for r in eff if r["key"] == it.key and r["intervention"] == m] for m in ("suppress", "enhance")}
            pr = [r for r in prompts if r["key"] == it.key]
            facts[it.key] = {"label": it.label, "group": it.group, "n_prompts": len(it.prompts),
                             "n_kn": len(kns[it.key]), "kn": [list(x) for x in kns[it.key]],
                             "kn_layers": sorted({L for L, _ in kns[it.key]}),
                             "p_target": _mean(r["base_prob"] for r in pr),
                             "ig_median_gap": _mean(r["median_gap"] for r in pr),
                             "ig_max_gap": max((r["max_gap"] for r in pr), default=math.nan),
                             **{f"p_target_{m}": _mean(r["p_after"] for r in e[m]) for m in e}}
        tr = rd.read("trace").to_pylist()
        ed = rd.read("edit_eval").to_pylist()[0]
        probes = rd.read("edit_probes").to_pylist()
        edit = {"layer": ed["layer"], "top1_pre": ed["top1_pre"], "top1_post": ed["top1_post"],
                "top1_post_prob": ed["top1_post_prob"], "weights_changed": list(ed["weights_changed"] or []),
                "n_tensors": ed["n_tensors"], "undo_byte_identical": bool(ed["undo_byte_identical"]),
                "success": {}, "prob_post": {}}
        for k in dict.fromkeys(d["kind"] for d in probes):
            kk = [d for d in probes if d["kind"] == k]
            edit["prob_post"][k] = _mean(d["prob_post"] for d in kk)
            withfoil = [d for d in kk if d.get("success_post") is not None]
            if withfoil:
                edit["success"][k] = sum(bool(d["success_post"]) for d in withfoil) / len(withfoil)
        full = {"model": self.lm.name, "quick": bool(getattr(self.args, "quick", False)),
                "settings": dataclasses.asdict(self.settings), "run_dir": str(self.out), "items": facts,
                "groups": {g: {"tau": r["tau"], "kn_per_item": r["kn"], "converged": r["converged"]}
                           for g, r in loc.items()},
                "trace": {r["kind"]: {"high": r["high_score"], "low": r["low_score"],
                                      "best": max(max(x) for x in r["scores"])} for r in tr},
                "edit": edit,
                "seconds": {"wall": round(wall, 1), "load": round(t_load, 1),
                            **{k: round(v[0], 1) for k, v in self.times.items()}},
                "resumed": sorted(k for k, v in self.times.items() if v[1])}
        flat = {"items": len(self.items), "prompts": len(prompts),
                "mean_kn_per_item": _mean(f["n_kn"] for f in facts.values()),
                **{f"tau_{g}": r["tau"] for g, r in loc.items()},
                **{f"kn_{k.split('/')[-1]}": f["n_kn"] for k, f in facts.items()},
                "trace_high": tr[0]["high_score"], "trace_low": tr[0]["low_score"],
                "edit_top1_post": ed["top1_post"], "edit_undo_byte_identical": edit["undo_byte_identical"],
                **{f"edit_success_{k}": v for k, v in edit["success"].items()}}
        return {"full": full, "flat": flat}


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except InputError as e:
        print(f"kncore demo: error: {e}", file=sys.stderr)
        sys.exit(2)
