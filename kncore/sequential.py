"""Sequential editing as a run: N batches of edits applied one after the
other, each scored on every fact edited so far, in a resumable run directory
(``kncore edit-seq``).

Models collapse after a few hundred sequential edits (Gupta et al. 2024,
"Model editing at scale leads to gradual and catastrophic forgetting"); this
pipeline measures how. For batch b = 0, 1, ... (MEMIT by default, EMMET or
ROME; :mod:`kncore.rome`), on the model the earlier batches left:

1. the batch is applied through the rank-k op (``Edit`` steps);
2. efficacy (ES), paraphrase (PS) and neighbourhood (NS) success, ROME's
   CounterFact criteria (P(new) > P(true) per token; neighbours keep
   P(true) > P(new)), on the cumulative set of facts edited so far and on the
   batch alone (:func:`kncore.evaluation.edits.score_cases`);
3. fluency: MEMIT's weighted bi/tri-gram entropy of greedy generations from a
   fixed set of prompts (the first generation prompt of the run's first
   records), the same prompts after every batch
   (:mod:`kncore.evaluation.fluency`);
4. one commit to the run directory: the metric rows, the generations, and the
   batch's update factors (safetensors: for each rank-k step its layer, left
   and right factors), with the SHA-256 of the edited weights after the batch.

A row ``base`` holds the unedited model's figures on every fact of the run
and the SHA-256 of its weights. A resumed run checks that hash, then
re-applies each committed batch's saved factors through the same op and
checks the weights' SHA-256 against the one recorded, so it continues from
bit-identical weights, and the batches it computes give the tables an
uninterrupted run gives. A batch is never recomputed once committed.

Input is checked before anything changes: an empty batch, two requests for
the same subject and relation with different targets (in one batch or in two:
the earlier fact's score would be measured against a target the run itself
overwrote), a layer outside the model, a bad hyper-parameter file each give
one line; a failure later (a singular system, Ctrl-C) takes back every update
this process applied, so the model is left as it was, while the committed
batches stay on disk for the next run to resume from.
"""
from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field

import torch

from .errors import InputError

log = logging.getLogger("kncore")

METHODS = ("MEMIT", "EMMET", "ROME")
TABLE = "sequential"
GEN_TABLE = "seq_generations"
PLOT = "collapse"
BASE = "base"
METRICS = ("ES", "PS", "NS", "S")


def batch_key(b: int) -> str:
    return f"b{b:04d}"


# -- hyper-parameters and input checks ------------------------------------------------------------
def hparams_class(method: str):
    from .rome.hparams import ROMEHparams
    from .rome.memit import METHODS as BATCH

    method = str(method).upper()
    if method == "ROME":
        return ROMEHparams
    if method in BATCH:
        return BATCH[method]
    raise InputError(f"unknown editor {method!r}; use one of {', '.join(m.lower() for m in METHODS)}")


def load_hparams(lm, method: str, hparams=None, layers=None):
    """The editor's hparams (the model's shipped file when None), with ``layers``
    replacing the file's; checked against the model."""
    from .rome.hparams import hparams_for, load_hparams as _load

    cls = hparams_class(method)
    hp = hparams_for(lm, cls) if hparams is None else _load(hparams, cls)
    if layers is not None:
        hp = hp.replace(layers=[int(L) for L in layers])
    hp.validate()
    hp.check_model(lm)
    return hp


def _raw(case) -> dict:
    """A case's ROME request with its relation (for the conflict check)."""
    d = case.request() if hasattr(case, "request") else dict(case)
    rel = getattr(case, "relation", None)
    if rel is not None:
        d["relation_id"] = rel
    return d


def check_batches(lm, batches, hp) -> list[list]:
    """Parse every batch (:func:`kncore.rome.memit.check_batch`) and refuse an
    empty batch or one fact rewritten to two targets anywhere in the run."""
    from .rome.memit import _relation, check_batch

    if not batches:
        raise InputError("no batches to edit")
    out, seen = [], {}
    for b, batch in enumerate(batches):
        if not batch:
            raise InputError(f"batch {b} of {len(batches)} is empty")
        raws = [_raw(c) for c in batch]
        reqs = check_batch(lm, raws, hp)
        for i, (raw, r) in enumerate(zip(raws, reqs)):
            k = (r.subject, _relation(raw, r))
            if k in seen and seen[k][2] != r.target:
                b0, i0, t0 = seen[k]
                raise InputError(f"batch {b0} request {i0} and batch {b} request {i} rewrite the same subject "
                                 f"{r.subject!r} and relation {k[1]!r} to different targets {t0!r} and "
                                 f"{r.target!r}")
            seen.setdefault(k, (b, i, r.target))
        out.append(reqs)
    return out


# -- updates: apply, save, re-apply -------------------------------------------------------------------
@dataclass
class SavedStep:
    """A rank-k update re-applied from its saved factors (``W += left right^T`` in
    the logical [d_ff, d_model] orientation of the down-projection)."""

    requests: list
    layer: int
    left: torch.Tensor
    right: torch.Tensor
    weight: torch.Tensor | None = field(default=None, repr=False)
    record: object = field(default=None, repr=False)

    def describe(self) -> str:
        return f"{len(self.requests)} requests @L{self.layer} (re-applied)"


def apply_batch(lm, reqs: list, hp, stats: dict):
    """One batch through its editor (``hp.METHOD``); returns the :class:`kncore.rome.Edit`."""
    from . import rome

    if hp.METHOD == "ROME":
        return rome.edit(lm, reqs, hp, stats=stats or None)
    return rome.batch_edit(lm, [reqs], hp, method=hp.METHOD, stats=stats or None)


def factors(steps) -> tuple[dict, list[int]]:
    """The tensors to save for ``steps`` (``sNNN.left``/``sNNN.right``) and their layers."""
    tensors, layers = {}, []
    for i, s in enumerate(steps):
        tensors[f"s{i:03d}.left"] = s.left
        tensors[f"s{i:03d}.right"] = s.right
        layers.append(int(s.layer))
    return tensors, layers


def reapply(lm, tensors: dict, layers: list[int], reqs: list) -> list[SavedStep]:
    """Apply saved factors in their order through the rank-k op; on a failure the
    ones applied are taken back."""
    from .rome.editing import _orient, _rank1, _rank1_undo

    out = []
    try:
        for i, L in enumerate(layers):
            left = tensors[f"s{i:03d}.left"].to(lm.device)
            right = tensors[f"s{i:03d}.right"].to(lm.device)
            W, a, b = _orient(lm, L, left, right)
            W = W.data  # one version counter per update, as the editors do (LIFO undo)
            with torch.no_grad():
                rec = _rank1(W, a, b)
            out.append(SavedStep(reqs, L, left, right, W, rec))
    except BaseException:
        with torch.no_grad():
            for s in reversed(out):
                _rank1_undo(s.weight, s.record)
        raise
    return out


def weights_sha256(lm, layers) -> str:
    """SHA-256 of the bytes of the down-projection weights of ``layers`` (what the editors change)."""
    h = hashlib.sha256()
    for L in sorted(set(int(x) for x in layers)):
        W = lm.adapter.down_module(L).weight.detach().contiguous().cpu()
        h.update(f"{L}:{tuple(W.shape)}:{W.dtype};".encode())
        h.update(W.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- metrics ---------------------------------------------------------------------------------------------
def metric_row(key: str, batch: int, n_edits: int, scope: str, case_rows: list, entropy: float,
               sha: str, layers: list[int]) -> dict:
    """One row of the ``sequential`` table: ROME's criteria over ``case_rows``."""
    from .evaluation import summarise_edits

    s = summarise_edits(case_rows)
    row = {"key": key, "batch": batch, "n_edits": n_edits, "scope": scope, "n_cases": len(case_rows)}
    for m in METRICS:
        v = s.get(m)
        row[m] = float(v) if v is not None else math.nan
    row.update({"entropy": float(entropy), "weights_sha256": sha, "step_layers": list(layers)})
    return row


def fluency_prompts(records, k: int) -> list[str]:
    """The first generation prompt of each of the first ``k`` records that have one
    (MEMIT's fluency prompts); the rewrite prompt where a record has none."""
    out = []
    for r in records:
        gp = getattr(r, "generation_prompts", None) or []
        out.append(gp[0] if gp else r.rewrite_prompt)
        if len(out) == k:
            break
    return out


# -- the run -----------------------------------------------------------------------------------------
def run(lm, rd, batches: list, hp, *, prompts: list[str], gen_len: int = 100, stats=None, cache_dir=None,
        eval_batch_size: int = 32, progress=None, stats_progress: bool = False):
    """Apply ``batches`` (lists of :class:`kncore.evaluation.EditCase`) one after
    the other, committing each to ``rd`` (:class:`kncore.rundir.RunDir`); batches
    committed earlier are re-applied from their saved factors and checked.

    ``prompts``: the fluency prompts; ``gen_len``: tokens per generation, prompt
    included. ``stats``: as :func:`kncore.rome.batch_edit` takes them; None
    computes or loads them (cached under ``cache_dir``; ``stats_progress``
    shows a bar). Returns the :class:`kncore.rome.Edit` holding every update
    applied (``undo()`` restores the model bit for bit)."""
    from .evaluation.edits import score_cases
    from .evaluation.fluency import generation_entropy
    from .rome.editing import Edit, _resolve_stats
    from .rome.templates import context_templates

    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InputError("fluency needs at least one non-empty generation prompt")
    if int(gen_len) < 2:
        raise InputError(f"gen_len must be >= 2 tokens, got {gen_len}")
    reqs = check_batches(lm, batches, hp)
    longest = max(len(lm.tokenize(p)) for p in prompts)
    if longest >= gen_len:
        raise InputError(f"a fluency prompt is {longest} tokens, not shorter than gen_len {gen_len}: raise gen_len")
    lm.fingerprint()  # computed once, on the unedited weights (statistics and templates are keyed by it)
    if stats is None and hp.mom2_adjustment:
        from .rome.stats import layer_stats
        stats = layer_stats(lm, hp.layers, hp.mom2_dataset, n_samples=hp.mom2_n_samples, dtype=hp.mom2_dtype,
                            cache_dir=cache_dir, progress=stats_progress)
    all_stats = _resolve_stats(lm, hp, stats, cache_dir)
    context_templates(lm, hp)  # generated by the unedited model, as in an uninterrupted run
    layers = sorted(hp.layers)
    base_sha = weights_sha256(lm, layers)
    done = rd.done_keys(TABLE)
    old = {r["key"]: r for r in rd.read(TABLE).to_pylist()} if done else {}
    every = [c for b in batches for c in b]
    if BASE in done:
        if old[BASE]["weights_sha256"] != base_sha:
            raise InputError(f"run directory {rd.path} was made from weights whose edited layers hash to "
                             f"{old[BASE]['weights_sha256'][:12]}..., these hash to {base_sha[:12]}...: "
                             "use another --out")
    else:
        ent, texts = generation_entropy(lm, prompts, gen_len)
        rows = [metric_row(BASE, -1, 0, "unedited", score_cases(lm, every, batch_size=eval_batch_size), ent,
                           base_sha, [])]
        gens = [{"key": BASE, "batch": -1, "prompt": p, "text": t} for p, t in zip(prompts, texts)]
        rd.commit({TABLE: rows, GEN_TABLE: gens}, keys={TABLE: [BASE], GEN_TABLE: [BASE]})
        _plot(rd)
    result = Edit(lm, hp)
    n_edits = 0
    try:
        for b, (batch, rq) in enumerate(zip(batches, reqs)):
            key = batch_key(b)
            n_edits += len(batch)
            if key in done:
                row = old[key]
                tensors = rd.load_tensors(f"update_{key}")
                result.steps += reapply(lm, tensors, list(row["step_layers"]), rq)
                sha = weights_sha256(lm, layers)
                if sha != row["weights_sha256"]:
                    raise InputError(f"re-applying batch {b}'s saved update gives weights hashing to {sha[:12]}..., "
                                     f"not the {row['weights_sha256'][:12]}... recorded: the run was made with "
                                     "another kncore or device; use another --out")
                log.info("batch %d: re-applied its saved update; weights match (%s)", b, sha[:12])
                if progress:
                    progress(b, resumed=True)
                continue
            t0 = time.perf_counter()
            e = apply_batch(lm, rq, hp, all_stats)
            result.steps += e.steps
            t_edit = time.perf_counter() - t0
            tens, step_layers = factors(e.steps)
            sha = weights_sha256(lm, layers)
            cum = [c for bb in batches[:b + 1] for c in bb]
            cum_rows = score_cases(lm, cum, batch_size=eval_batch_size)
            ent, texts = generation_entropy(lm, prompts, gen_len)
            rows = [metric_row(key, b, n_edits, "cumulative", cum_rows, ent, sha, step_layers),
                    metric_row(key, b, n_edits, "batch", cum_rows[-len(batch):], ent, sha, step_layers)]
            gens = [{"key": key, "batch": b, "prompt": p, "text": t} for p, t in zip(prompts, texts)]
            rd.commit({TABLE: rows, GEN_TABLE: gens}, keys={TABLE: [key], GEN_TABLE: [key]},
                      tensors={f"update_{key}": tens},
                      info={"edit_seconds": t_edit, "total_seconds": time.perf_counter() - t0})
            _plot(rd)
            if progress:
                progress(b, resumed=False)
    except BaseException:
        if result.steps and result.active:
            result.undo()
        raise
    return result


# -- the collapse plot and its reading -------------------------------------------------------------------
def _series(rows: list[dict]):
    base = next((r for r in rows if r["key"] == BASE), None)
    cum = sorted((r for r in rows if r.get("scope") == "cumulative"), key=lambda r: r["n_edits"])
    return base, cum


def plot_collapse(rows: list[dict], title: str | None = None):
    """Metrics against the number of edits: cumulative ES, PS, NS (left axis) and
    generation entropy (right axis); the point at 0 edits is the unedited model
    on every fact of the run. Returns a matplotlib Figure."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    base, cum = _series(rows)
    pts = ([base] if base else []) + cum
    x = [r["n_edits"] for r in pts]
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, style in (("ES", "o-"), ("PS", "s-"), ("NS", "^-")):
        ax.plot(x, [r.get(m) for r in pts], style, label=m)
    ax.set_xlabel("facts edited")
    ax.set_ylabel("success rate (cumulative set)")
    ax.set_ylim(-0.02, 1.02)
    ax2 = ax.twinx()
    ax2.plot(x, [r.get("entropy") for r in pts], "k--", marker="x", label="n-gram entropy")
    ax2.set_ylabel("generation n-gram entropy (bits)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower left", fontsize=8)
    ax.set_title(title or "Sequential editing: metrics against the number of edits")
    fig.tight_layout()
    return fig


def _plot(rd) -> None:
    from .atomic import atomic_write

    rows = rd.read(TABLE).to_pylist()
    fig = plot_collapse(rows)
    import matplotlib.pyplot as plt

    rd.plots_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(rd.plots_dir / f"{PLOT}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def collapse_reading(rows: list[dict]) -> str:
    """One sentence on the table: where the cumulative metrics and the entropy went."""
    base, cum = _series(rows)
    if not cum:
        return "No batch has been applied yet."
    first, last = cum[0], cum[-1]

    def f(v):
        return "n/a" if v is None or v != v else f"{v:.2f}"

    parts = [f"After {last['n_edits']} edits in {len(cum)} batches, on every fact edited so far ES went "
             f"{f(first['ES'])} -> {f(last['ES'])}, PS {f(first['PS'])} -> {f(last['PS'])} and NS "
             f"{f(first['NS'])} -> {f(last['NS'])} from the first batch to the last"]
    if base:
        parts.append(f"generation n-gram entropy went {base['entropy']:.3g} (unedited) -> {last['entropy']:.3g} bits")
    s = "; ".join(parts)
    return s + "."


# -- the command -------------------------------------------------------------------------------------------
def cmd(args) -> int:
    """``kncore edit-seq``: see the module doc."""
    from pathlib import Path

    from . import pipeline
    from .data import load_counterfact
    from .data.records import DATA_SETS
    from .evaluation import counterfact_case
    from .jobs import Job, Progress, parse_layers

    method = args.method.upper()
    hparams_class(method)
    data = args.data or "counterfact"
    if data in DATA_SETS and data != "counterfact":
        raise InputError(f"'kncore edit-seq' reads CounterFact records (counterfact or a file in its layout), "
                         f"not --data {data}")
    records = load_counterfact(None if data == "counterfact" else Path(data), data_dir=args.data_dir)
    if args.limit is not None:
        records = records[: args.limit]
    need = args.batches * args.edits_per_batch
    if len(records) < need:
        raise InputError(f"{args.batches} batches of {args.edits_per_batch} need {need} records; "
                         f"the data has {len(records)}")
    records = records[:need]
    hp_file = args.hparams
    if hp_file:  # a bad file is refused before the model loads
        from .rome.hparams import load_hparams as _load
        _load(hp_file, hparams_class(method))
    job = Job(args, "edit-seq")
    if job.world > 1:
        raise InputError("'kncore edit-seq' runs in one process: each batch edits the model the last one left")
    lm = job.lm
    layers = parse_layers(args.layers, lm.n_layers) if args.layers else None
    hp = load_hparams(lm, method, hp_file, layers)
    cases = [c for _, c in pipeline.keyed_cases([counterfact_case(r) for r in records])]
    batches = [cases[i * args.edits_per_batch:(i + 1) * args.edits_per_batch] for i in range(args.batches)]
    prompts = fluency_prompts(records, args.fluency_prompts)
    check_batches(lm, batches, hp)  # before the run directory exists
    job.open(hparams=hp.to_dict())
    bar = Progress(args.batches, "batch", f"{method} sequential", job.progress_on)
    try:
        run(lm, job.rd, batches, hp, prompts=prompts, gen_len=args.gen_len, cache_dir=args.stats_cache,
            progress=lambda b, resumed: bar(1), stats_progress=job.progress_on)
    finally:
        bar.close()
    rows = job.rd.read(TABLE).to_pylist()
    base, cum = _series(rows)
    last = cum[-1]
    print(collapse_reading(rows), file=sys.stderr)
    job.done({"method": method, "batches": len(cum), "edits": last["n_edits"],
              **{f"{m}_cumulative": last[m] for m in METRICS}, "entropy_unedited": base["entropy"],
              "entropy_last": last["entropy"]})
    return 0


__all__ = ["run", "check_batches", "load_hparams", "apply_batch", "factors", "reapply", "weights_sha256",
           "plot_collapse", "collapse_reading", "fluency_prompts", "METHODS", "TABLE", "GEN_TABLE", "cmd"]
