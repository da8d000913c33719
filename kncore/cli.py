"""The ``kncore`` command line: ``python -m kncore <command> ...``.

Every command that computes something writes a run directory
(:mod:`kncore.rundir`): re-running the same command after an interruption
resumes it, a different config pointed at the same ``--out`` is refused, and
``kncore report RUN`` turns it into an HTML page and a Markdown file. Under
``torchrun --nproc-per-node N -m kncore ...`` each process takes a shard of the
work (:mod:`kncore.distributed`) and rank 0 writes.

The backends (attribution, tracing, ROME, evaluation...) are imported inside
each command, so ``kncore --help`` and the commands whose backend is present
work while another is missing; a missing one fails with one line.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from . import validation as V
from .errors import InputError


EXAMPLES = """\
examples:
  kncore info
  kncore localise --data pararel --relations P36,P1376 --limit 20 --out runs/kn-capitals
  kncore localise --data blimp --paradigms determiner_noun_agreement_1 --limit 50 --out runs/kn-det
  kncore attribute --prompt "The capital of Canada is" --target " Ottawa" --out runs/ottawa
  kncore attribute --data prompts.jsonl --layers 10-20 --steps 20 --save-dense --out runs/attr
  kncore trace --data known --limit 50 --out runs/trace
  kncore trace --prompt "The Eiffel Tower is in" --subject "The Eiffel Tower" --out runs/eiffel
  kncore stats --data pydoc --layers 5 --n-samples 500 --out runs/stats
  kncore edit --data counterfact --limit 10 --out runs/edit
  kncore eval --data counterfact --limit 100 --out runs/eval
  kncore edit-seq --batches 3 --edits-per-batch 10 --out runs/seq
  kncore report runs/kn-capitals            # writes runs/kn-capitals/report.html and report.md
  kncore bench ig                           # runs bench/bench_ig.py
  torchrun --nproc-per-node 4 -m kncore localise --data pararel --out runs/kn-all --device cuda

Run directories resume: re-run the same command after Ctrl-C or a crash.
Models: an embedded name (smollm2-135m), a local Hugging Face folder, or
tiny-<gpt2|gptj|llama|bert>[:seed] (random, for tests).
"""

from . import pipeline
from .data import records
# load_model is kncore.cli's public name of kncore.jobs.load_model (scripts import it from here)
from .jobs import BackendMissing, Job, Progress, RankFailed, backend, load_model, parse_layers, split_list  # noqa: F401


# -- inputs -------------------------------------------------------------------------------------
def edit_cases(args, lm=None) -> list[tuple[str, object]]:
    """(key, :class:`kncore.evaluation.EditCase`) pairs for ``edit`` and ``eval``.

    Inline (``--prompt --subject --target-new [--target]``), CounterFact
    (default), zsRE, PARAREL (``--relations``; Niu et al.'s edit sets), or a
    file: CounterFact's layout (ROME's or EasyEdit's) or kncore's edit-case JSON.
    Symmetry and synonymy probes are added where the relation allows
    (``--no-extra-probes`` leaves them out).
    """
    evaluation = backend("kncore.evaluation", args.command)
    if args.prompt:
        cases = pipeline.inline_edit_cases(args.prompt, args.subject, args.target_new, args.target)
    else:
        know = None if args.no_extra_probes else evaluation.edit_knowledge(args.data_dir)
        cases = pipeline.edit_cases(args.data or "counterfact", relations=split_list(args.relations), know=know,
                                    limit=args.limit, data_dir=args.data_dir, command=args.command)
    out = pipeline.keyed_cases(cases)
    return out if args.data == "pararel" else records.first(out, args.limit)


# -- commands -----------------------------------------------------------------------------------
def cmd_info(args) -> int:
    info = backend("kncore.info", "info")
    return int(info.main(["--json"] if args.json else []) or 0)


def _attr_kwargs(args, layers):
    return dict(steps=args.steps, layers=layers, scheme=args.scheme, site=args.site,
                batch_size=args.batch_size if args.batch_size else "auto", progress=False,
                multi_token=args.multi_token)


def _inline_texts(args, *names) -> None:
    """Inline ``--prompt``/``--target``/``--subject``... (repeatable options): each one a non-empty string."""
    for name in names:
        for v in getattr(args, name.replace("-", "_")) or []:
            V.text(f"--{name}", v)


def cmd_attribute(args) -> int:
    attribution = backend("kncore.attribution", "attribute")
    selection = backend("kncore.selection", "attribute")
    _inline_texts(args, "prompt", "target")
    job = Job(args, "attribute")
    lm = job.lm
    layers = parse_layers(args.layers, lm.n_layers)
    recs = records.prompt_records(lm, args.data, prompts=args.prompt, targets=args.target,
                                                relations=split_list(args.relations), limit=args.limit,
                                                data_dir=args.data_dir)
    n_layers = len(layers) if layers else lm.n_layers
    if args.save_dense:
        from .rundir import DEFAULT_TENSOR_LIMIT
        need = len(recs) * n_layers * lm.d_ff * 4
        limit = int(args.max_tensor_gb * 2**30) if args.max_tensor_gb else DEFAULT_TENSOR_LIMIT
        if need > limit:
            raise InputError(f"--save-dense: {len(recs)} prompts x {n_layers} layers x {lm.d_ff} neurons in float32 "
                             f"is {need / 2**30:.2f} GiB, above the limit of {limit / 2**30:.2f} GiB; "
                             f"raise --max-tensor-gb or use --layers")
    job.open()

    def work(chunk):
        att = attribution.attribute(lm, [r["prompt"] for r in chunk], [r["target"] for r in chunk],
                                    **_attr_kwargs(args, layers))
        coarse = selection.select_coarse(att, adaptive_threshold=args.adaptive_threshold)
        arows, krows = [], []
        for i, (r, ks) in enumerate(zip(chunk, coarse)):
            arows.append(pipeline.prompt_row(att, i, ks, key=r["key"], relation=r.get("relation"),
                                             prompt=r["prompt"], target=r["target"]))
            krows += pipeline.coarse_rows(ks, key=r["key"], relation=r.get("relation"))
        tensors = None
        if args.save_dense:
            tensors = {"scores": {r["key"]: att.scores[i].clone() for i, r in enumerate(chunk)}}
        return {"attribution": arows, "kn": krows}, tensors

    job.run([(r["key"], r) for r in recs], work, table="attribution", unit="prompt", desc="attribute")
    summary = None
    if job.rank == 0:
        tab = job.rd.read("attribution")
        nc = tab.column("n_coarse").to_pylist()
        summary = {"prompts": tab.num_rows, "mean_coarse_neurons": sum(nc) / max(1, len(nc)),
                   "layers": layers or "all"}
    job.done(summary)
    return 0


def cmd_localise(args) -> int:
    """Niu et al.'s pipeline over fact bags (:mod:`kncore.pipeline`): (1) IG and
    coarse neurons of every prompt, R1^2 of each bag's attribution vectors;
    (2) refinement per relation or paradigm (adaptive p); (3) probability
    change of each bag's prompts when its knowledge neurons are suppressed or
    enhanced."""
    interventions = backend("kncore.interventions", "localise")
    job = Job(args, "localise")
    lm = job.lm
    layers = parse_layers(args.layers, lm.n_layers)
    p = pipeline.sharing_p(args.p)
    bags = records.fact_bags(lm, args.data, relations=split_list(args.relations),
                                          paradigms=split_list(args.paradigms), limit=args.limit,
                                          data_dir=args.data_dir)
    job.open(n_bags=len(bags))
    items = [(b["key"], b) for b in bags]
    n_prompts = lambda b: len(b["prompts"])  # noqa: E731

    def coarse_work(chunk):
        # one attribution call for every prompt of the chunk's bags (batched together)
        return pipeline.attribute_bags(lm, chunk, adaptive_threshold=args.adaptive_threshold,
                                       **_attr_kwargs(args, layers))

    job.run(items, coarse_work, table="bags", unit="prompt", desc="IG + coarse", weight=n_prompts)

    # 2. refine per relation / paradigm (cheap; rank 0)
    job.on_rank0(lambda: pipeline.refine_groups(job.rd, bags, p, lm.n_layers))

    # 3. probability change when the fact's neurons are suppressed or enhanced
    kns = pipeline.read_kns(job.rd) if job.rank == 0 else None
    kns = job.dist.broadcast_object(kns)

    def effect_work(chunk):
        rows = []
        for b in chunk:
            neurons = kns.get(b["key"])
            if not neurons:
                continue  # no knowledge neurons: nothing to intervene on
            tid = [lm.target_ids(q, t)[0] for q, t in zip(b["prompts"], b["targets"])]
            before = pipeline.target_probs(lm, b["prompts"], tid)
            for mode in pipeline.INTERVENTIONS:
                with interventions.patch_neurons(lm, neurons, mode=mode, factor=args.enhance_factor):
                    after = pipeline.target_probs(lm, b["prompts"], tid)
                rows += [{"key": b["key"], "relation": b["group"], "prompt": q, "intervention": mode,
                          "n_kn": len(neurons), "p_before": x, "p_after": y}
                         for q, x, y in zip(b["prompts"], before, after)]
        return {"effect": rows}

    job.run(items, effect_work, table="effect", unit="prompt", desc="suppress/enhance", weight=n_prompts)
    summary = pipeline.localise_summary(job.rd) if job.rank == 0 else None
    job.done(summary)
    return 0


def cmd_trace(args) -> int:
    """Causal tracing of each record. Arguments wrong for every record (``--kinds``,
    ``--samples``, ``--window``, ``--noise``, an inline prompt without its subject)
    are refused before the run; a record that fails on its own data is recorded
    with its error in the ``records`` table, counted in the summary, and the
    command fails (USER_ERROR) when no record could be traced."""
    tracing = backend("kncore.tracing", "trace")
    _inline_texts(args, "prompt", "subject", "target")
    recs = records.trace_records(args.data, prompts=args.prompt, subjects=args.subject, targets=args.target,
                                 data_dir=args.data_dir)
    if args.prompt:
        for r in recs:
            V.subject_in_prompt(r["prompt"], r["subject"], "--subject: ")
    job = Job(args, "trace")
    lm = job.lm
    kinds, noise = split_list(args.kinds), V.noise_spec(args.noise)
    # The noise is k times the std of the embeddings of every subject of the data set
    # (ROME); for inline prompts, of the whole embedding matrix, as kncore.trace does.
    scale = tracing.resolve_noise(lm, noise, [r["subject"] for r in recs]
                                  if isinstance(noise, str) and not args.prompt else None)
    recs = records.first(recs, args.limit)
    job.open(noise_scale=round(scale, 9))

    def work(chunk):
        rows, status = [], []
        for r in chunk:
            target = r["attribute"] if args.target_mode == "attribute" else None
            res = None
            try:
                V.subject_in_prompt(r["prompt"], r["subject"])
                st = "traced"
                if args.target_mode == "known" and r["attribute"] is not None:
                    # ROME traces a known fact only when the model's top-1 token is the attribute.
                    top = lm.top_k(r["prompt"], 1)[0][0]
                    if top.strip() != r["attribute"].strip():
                        st = "wrong_prediction"
                if st == "traced":
                    res = tracing.trace(lm, r["prompt"], r["subject"], target=target, kinds=kinds,
                                        samples=args.samples, noise=scale, window=args.window, seed=args.trace_seed,
                                        max_tokens=args.max_tokens)
            except InputError as e:
                st = f"error: {_one_line(e)}"
            status.append(pipeline.trace_record_row(r, st, res))
            if res is not None:
                rows += pipeline.trace_rows(r["key"], res)
        return {"records": status, "trace": rows}

    job.run([(r["key"], r) for r in recs], work, table="records", unit="prompt", desc="trace")
    summary, failed = None, None
    if job.rank == 0:
        tab = job.rd.read("records")
        st, keys = tab.column("status").to_pylist(), tab.column("key").to_pylist()
        errors = [(k, s) for k, s in zip(keys, st) if s.startswith("error")]
        summary = {"records": len(st), "traced": st.count("traced"), "wrong_prediction": st.count("wrong_prediction"),
                   "errors": len(errors), "noise_scale": scale}
        if errors:
            first_err = f"record {errors[0][0]}: {errors[0][1][len('error: '):]}"
            if len(errors) == len(st):
                failed = f"no record could be traced ({len(errors)} errors; first: {first_err})"
            else:
                print(f"kncore trace: {len(errors)} of {len(st)} records failed (first: {first_err}); their "
                      f"errors are in the records table", file=sys.stderr)
    job.done(summary)
    failed = job.dist.broadcast_object(failed) if job.world > 1 else failed
    if failed:
        raise InputError(failed)
    return 0


def cmd_stats(args) -> int:
    rome = backend("kncore.rome", "stats")
    if not args.probes and (args.until or args.check_every or args.n_probes):
        raise InputError("--until, --check-every and --n-probes need --probes (the facts whose keys measure "
                         "convergence), e.g. --probes counterfact")
    if args.layers is None:
        raise InputError("'kncore stats' needs --layers (e.g. --layers 5); ROME edits use one layer")
    job = Job(args, "stats")
    lm = job.lm
    layers = parse_layers(args.layers, lm.n_layers)
    if layers is None:
        raise InputError("'kncore stats' needs --layers (e.g. --layers 5); ROME edits use one layer")
    job.open()
    bar = Progress(-(-(args.n_samples or 0) // job.world), "text", "layer stats", job.progress_on)
    t0, seen = time.time(), [0]

    def prog(info):
        bar(info["texts"] - seen[0], tok_s=f"{info['tokens'] / max(1e-9, time.time() - t0):.0f}")
        seen[0] = info["texts"]

    probes = None
    if args.probes:  # convergence checks on the keys of these facts' subjects
        cases = pipeline.edit_cases(args.probes, data_dir=args.data_dir, command="stats")[:args.n_probes]
        probes = rome.probe_keys_for(lm, [c.request() for c in cases], layers)
    try:
        # layer_stats shards the texts over ranks, all-reduces the sums, and
        # resumes from its own checkpoints in the cache folder.
        res = rome.layer_stats(lm, layers, args.data or "pydoc", n_samples=args.n_samples, dtype=args.stats_dtype,
                               cache_dir=args.stats_cache, progress=prog if job.progress_on else False,
                               batch_tokens=args.batch_tokens, probe_keys=probes, check_every=args.check_every,
                               until=args.until, tol=args.tol)
    finally:
        bar.close()
    if job.rank == 0:
        rows = []
        for L, st in sorted(res.items()):
            C = st.second_moment.double()
            rows.append({"key": f"layer{L:03d}", "layer": L, "n_tokens": st.n_tokens, "n_texts": st.n_texts,
                         "trace": float(C.diagonal().sum()), "mean_norm": float(st.mean.double().norm()),
                         "file": str(st.path) if st.path else None,
                         "probe_change": (st.convergence or {}).get("change_at_stop"),
                         "converged": (st.convergence or {}).get("stopped")})
        done = job.rd.done_keys("stats")
        rows = [r for r in rows if r["key"] not in done]
        if rows:
            job.rd.append("stats", rows)
    job.done({"layers": layers, "n_texts": max((s.n_texts for s in res.values()), default=0)})
    return 0


def cmd_edit(args) -> int:
    rome = backend("kncore.rome", "edit")
    evaluation = backend("kncore.evaluation", "edit")
    _inline_texts(args, "prompt", "subject", "target-new", "target")
    hp = rome.load_hparams(args.hparams) if args.hparams else None  # a bad file is refused before the model loads
    job = Job(args, "edit")
    lm = job.lm
    hp = hp or rome.hparams_for(lm)
    if args.edit_layer is not None:
        hp.layers = [args.edit_layer]
        hp.validate()
    hp.check_model(lm)
    cases = edit_cases(args, lm)
    job.open(hparams=_hparams_dict(hp))
    stats = None
    if hp.mom2_adjustment:
        # Once, before the loop, on every rank together: layer_stats shards its
        # corpus over the ranks and all-reduces, so no rank may skip it.
        stats = rome.layer_stats(lm, hp.layers, hp.mom2_dataset, n_samples=hp.mom2_n_samples, dtype=hp.mom2_dtype,
                                 cache_dir=args.stats_cache, progress=job.progress_on)

    def work(chunk):
        keys = [k for k, _ in chunk]
        rows = evaluation.evaluate_edits(lm, [c for _, c in chunk],
                                         lambda case: rome.edit(lm, case.request(), hp, stats=stats))
        return {"edit_eval": pipeline.edit_rows(keys, rows, "rome")}

    job.run([(k, (k, c)) for k, c in cases], work, table="edit_eval", unit="edit", desc="ROME edit + eval")
    summary = evaluation.summarise_edits(job.rd.read("edit_eval").to_pylist()) if job.rank == 0 else None
    job.done(summary)
    return 0


def cmd_edit_seq(args) -> int:
    return backend("kncore.sequential", "edit-seq").cmd(args)


def _hparams_dict(hp) -> dict:
    import dataclasses
    return {f.name: getattr(hp, f.name) for f in dataclasses.fields(hp) if f.name != "ignored"}


def cmd_eval(args) -> int:
    evaluation = backend("kncore.evaluation", "eval")
    _inline_texts(args, "prompt", "subject", "target-new", "target")
    job = Job(args, "eval")
    lm = job.lm
    if (args.data or "counterfact") == "blimp":
        data = backend("kncore.data", "eval")
        items = []
        for par in split_list(args.paradigms) or data.blimp_paradigms(args.data_dir):
            prompts = records.first(list(data.blimp_prompts(lm, par, args.data_dir)), args.limit)
            items += [(f"{par}/{x.pair_id}", x) for x in prompts]
        job.open()

        def pair_work(chunk):
            rows = evaluation.minimal_pair_scores(lm, chunk, method=args.method)
            return {"pairs": [dict(r, key=f"{x.paradigm}/{x.pair_id}") for x, r in zip(chunk, rows)]}

        job.run(items, pair_work, table="pairs", unit="pair", desc="minimal pairs")
        summary = None
        if job.rank == 0:
            rows = job.rd.read("pairs").to_pylist()
            summary = {"pairs": len(rows), "accuracy": sum(r["correct"] for r in rows) / max(1, len(rows))}
        job.done(summary)
        return 0
    cases = edit_cases(args, lm)
    job.open()

    def work(chunk):
        rows = evaluation.evaluate_edits(lm, [c for _, c in chunk], None)
        rows = [{k: v for k, v in r.items() if not k.endswith("_post")} for r in rows]
        return {"metrics": pipeline.edit_rows([k for k, _ in chunk], rows, "none")}

    job.run([(k, (k, c)) for k, c in cases], work, table="metrics", unit="case", desc="eval")
    summary = evaluation.summarise_edits(job.rd.read("metrics").to_pylist()) if job.rank == 0 else None
    job.done(summary)
    return 0


def cmd_report(args) -> int:
    from . import report

    html, md = report.write(report.check_run(args.run), args.out, max_rows=args.max_rows)
    print(f"wrote {html} and {md}")
    if args.open:
        import webbrowser
        webbrowser.open(html.resolve().as_uri())
    return 0


def _bench_dir() -> Path:
    for d in (Path(__file__).resolve().parents[1] / "bench", Path.cwd() / "bench"):
        if d.is_dir():
            return d
    raise InputError("no bench/ folder found: benchmarks run from a kncore source checkout")


def cmd_bench(args) -> int:
    d = _bench_dir()
    have = sorted(p.stem[len("bench_"):] for p in d.glob("bench_*.py"))
    if not args.names:
        print("benchmarks: " + (", ".join(have) if have else "(none yet)"))
        print("run one: kncore bench NAME [-- extra args]")
        return 0
    for name in args.names:
        if name not in have:
            raise InputError(f"no benchmark {name!r}; have: {', '.join(have) or 'none'}")
    rc = 0
    for name in args.names:
        print(f"== bench_{name}.py", flush=True)
        rc = rc or subprocess.call([sys.executable, str(d / f"bench_{name}.py"), *args.rest])
    return rc


def cmd_demo(args) -> int:
    demo = backend("kncore.demo", "demo")
    return int(demo.main(args) or 0)


# -- parser -----------------------------------------------------------------------------------------
# User errors (a bad argument, a bad input, a run directory made with another config)
# exit with this code, with one line on stderr; failures of kncore itself exit with 1.
USER_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block is one ``--help`` away)."""

    def error(self, message):
        self.exit(USER_ERROR, f"kncore: error: {message} (see {self.prog} --help)\n")


def _trace_kinds(text: str) -> str:
    """``--kinds``: the names :func:`kncore.trace` restores (checked as the API checks them;
    kept as given, so that the run's config reads as before)."""
    V.choices("kinds", text, TRACE_KINDS)
    return text


def _noise(text: str) -> str:
    """``--noise``: checked as :func:`kncore.trace` checks it; kept as given (see ``_trace_kinds``)."""
    V.noise_spec(text)
    return text


# kncore.tracing.KINDS, spelled here so that the parser needs no torch (a test checks they agree)
TRACE_KINDS = ("hidden", "mlp", "attn")


def common_options() -> argparse.ArgumentParser:
    """The options every computing command shares (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--model", default="smollm2-135m",
                   help="embedded name, local HF folder, or tiny-<arch>[:seed] (default: %(default)s)")
    g.add_argument("--data", help="a data set name (pararel, blimp, known, counterfact, zsre) or a file")
    g.add_argument("--data-dir", help="folder of the named data sets (default: $KNCORE_DATA or ../shared/data)")
    g.add_argument("--out", help="run directory (default: runs/<command>); re-run to resume")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--seed", type=V.arg("seed"), default=0)
    g.add_argument("--limit", type=V.arg("limit"), help="only the first N items (per relation for localise)")
    g.add_argument("--chunk", type=V.arg("chunk"), default=8, help="at most N items per commit to the run directory; a "
                   "commit also comes after ~30 s of work, so a kill loses at most that (default: %(default)s)")
    g.add_argument("--max-tensor-gb", type=V.arg("max_tensor_gb"),
                   help="refuse dense tensors above this size (default 2)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    # SUPPRESS: when not given here, `kncore --debug CMD` (the top-level flag) stands
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    g.add_argument("--profile", action="store_true", help="time and FLOP/s of each stage")
    return p


def _ig_options(p):
    g = p.add_argument_group("integrated gradients")
    g.add_argument("--steps", type=V.arg("steps"), default=20)
    g.add_argument("--layers", default="all", help="all, or e.g. 0-5,7")
    g.add_argument("--scheme", default="riemann-left",
                   choices=("riemann-left", "linspace", "midpoint", "trapezoid", "gauss"))
    g.add_argument("--site", default="act", choices=("act", "pre_act"))
    g.add_argument("--multi-token", default="teacher", choices=("teacher", "greedy", "forbid"))
    g.add_argument("--batch-size", type=V.arg("batch_size"), help="items per IG batch (default: from free memory)")
    g.add_argument("--adaptive-threshold", type=V.arg("adaptive_threshold"), default=0.2,
                   help="coarse neurons: score > t x max (default: %(default)s, Dai et al.)")


def build_parser() -> argparse.ArgumentParser:
    top = Parser(prog="kncore", description="Knowledge neurons, causal tracing and ROME, fast.",
                                  epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    common = common_options()

    def add(name, func, help, parents=(common,), example=""):
        sp = sub.add_parser(name, help=help, description=help, parents=list(parents),
                            epilog=example, formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=func, command=name)
        return sp

    p = add("info", cmd_info, "versions, devices and the compiled extension", parents=(),
            example="examples:\n  kncore info\n  kncore info --json")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = add("localise", cmd_localise, "localise knowledge neurons of a corpus of fact bags, with statistics",
            example="examples:\n  kncore localise --data pararel --relations P36 --limit 20 --out runs/p36\n"
                    "  kncore localise --data blimp --paradigms determiner_noun_agreement_1 --limit 50\n"
                    "  torchrun --nproc-per-node 2 -m kncore localise --data pararel --relations P36")
    _ig_options(p)
    g = p.add_argument_group("localise")
    g.add_argument("--relations", help="PARAREL relations, e.g. P36,P1376 (default: all)")
    g.add_argument("--paradigms", help="BLiMP paradigms (default: determiner_noun_agreement_1)")
    g.add_argument("--p", default="adaptive", type=V.checked(pipeline.sharing_p),
                   help="sharing threshold in [0, 1) or 'adaptive' (default)")
    g.add_argument("--enhance-factor", type=V.arg("enhance_factor"), default=2.0,
                   help="enhance multiplies activations by this")

    p = add("attribute", cmd_attribute, "integrated-gradients scores of every MLP neuron for prompts",
            example='examples:\n  kncore attribute --prompt "The capital of Canada is" --target " Ottawa"\n'
                    "  kncore attribute --data prompts.jsonl --save-dense --out runs/attr")
    _ig_options(p)
    g = p.add_argument_group("attribute")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--target", action="append", help="its target (repeatable)")
    g.add_argument("--relations", help="PARAREL relations when --data pararel")
    g.add_argument("--save-dense", action="store_true", help="also store every score as safetensors")

    p = add("trace", cmd_trace, "causal tracing (ROME) of known facts",
            example='examples:\n  kncore trace --data known --limit 20\n'
                    '  kncore trace --prompt "The Eiffel Tower is in" --subject "The Eiffel Tower"')
    g = p.add_argument_group("trace")
    g.add_argument("--prompt", action="append")
    g.add_argument("--subject", action="append")
    g.add_argument("--target", action="append")
    g.add_argument("--kinds", default="hidden,mlp,attn", type=V.checked(_trace_kinds))
    g.add_argument("--samples", type=V.arg("samples"), default=10)
    g.add_argument("--noise", default="3sd", type=V.checked(_noise),
                   help="a number or k x the subjects' embedding std: '3sd'")
    g.add_argument("--window", type=V.arg("window"), default=10)
    g.add_argument("--trace-seed", type=V.arg("trace_seed"), default=1, help="ROME's noise seed")
    g.add_argument("--target-mode", default="known", choices=("known", "attribute", "top1"),
                   help="known: trace only when top-1 is the attribute (ROME); attribute: trace its "
                        "probability anyway; top1: the model's own top-1")
    g.add_argument("--max-tokens", type=V.arg("max_tokens"), help="row-positions per forward (memory knob)")

    p = add("stats", cmd_stats, "ROME layer statistics (second moment of MLP keys) over a text corpus",
            example="examples:\n  kncore stats --layers 5 --n-samples 500\n"
                    "  kncore stats --data texts.jsonl --layers 5,6 --out runs/stats\n"
                    "  kncore stats --layers 2-5 --probes counterfact --n-probes 20 --until converged --tol 0.01")
    g = p.add_argument_group("stats")
    g.add_argument("--layers", help="layers, e.g. 5 or 4-6")
    g.add_argument("--n-samples", type=V.arg("n_samples"), default=100000,
                   help="texts (default: %(default)s, as kncore.rome.layer_stats; a smaller corpus gives "
                        "all its texts)")
    g.add_argument("--stats-dtype", default="float32", choices=("float32", "float64"))
    g.add_argument("--batch-tokens", type=V.arg("batch_tokens"), default=4096)
    g.add_argument("--stats-cache", help="cache folder of the statistics (default: kncore's cache, where "
                                         "'kncore edit' finds them)")
    g.add_argument("--probes", help="facts whose subjects' keys measure convergence: counterfact, zsre or a "
                                    "file of edit requests (CounterFact's layout)")
    g.add_argument("--n-probes", type=V.arg("n_probes"), help="the first N facts of --probes (default: all)")
    g.add_argument("--check-every", type=V.arg("check_every"), help="tokens between convergence checks "
                                                                    "(default: d_ff)")
    g.add_argument("--until", choices=("converged",), help="stop once C^-1 k of the probes changes by less than "
                                                           "--tol at two checks in a row (needs --probes)")
    g.add_argument("--tol", type=V.arg("tol"), default=0.01, help="relative change that counts as converged")

    def edit_options(p, what):
        g = p.add_argument_group(what)
        g.add_argument("--prompt", action="append", help="a prompt with {} (or the subject) in it (repeatable)")
        g.add_argument("--subject", action="append")
        g.add_argument("--target-new", action="append")
        g.add_argument("--target", action="append", help="the true answer (optional)")
        g.add_argument("--relations", help="PARAREL relations when --data pararel (default P36)")
        g.add_argument("--no-extra-probes", action="store_true", help="no symmetry/synonymy probes")
        return g

    p = add("edit", cmd_edit, "ROME edits of CounterFact-style cases, evaluated before and after",
            example="examples:\n  kncore edit --data counterfact --limit 10\n"
                    '  kncore edit --prompt "The capital of {} is" --subject Canada --target-new Rome\n'
                    "  kncore edit --data pararel --relations P36 --limit 20 --hparams my-rome.yaml")
    g = edit_options(p, "edit")
    g.add_argument("--hparams", help="ROME hyper-parameters: a shipped name or a YAML/JSON file "
                                     "(default: the model's shipped file)")
    g.add_argument("--edit-layer", type=V.arg("edit_layer"), help="edit this layer instead of the hparams' one")
    g.add_argument("--stats-cache", help="where ROME's layer statistics are cached (default: kncore's cache)")

    p = add("edit-seq", cmd_edit_seq, "sequential editing: N batches of CounterFact edits one after another, "
            "ES/PS/NS and generation entropy after each (the collapse curve)",
            example="examples:\n  kncore edit-seq --batches 3 --edits-per-batch 10 --out runs/seq\n"
                    "  kncore edit-seq --method emmet --batches 20 --edits-per-batch 50 --layers 2-5")
    g = p.add_argument_group("edit-seq")
    g.add_argument("--method", default="memit", choices=("memit", "emmet", "rome"))
    g.add_argument("--batches", type=V.arg("batches"), default=3)
    g.add_argument("--edits-per-batch", type=V.arg("edits_per_batch"), default=10)
    g.add_argument("--hparams", help="the editor's hyper-parameters: a shipped name or a YAML/JSON file "
                                     "(default: the model's shipped file)")
    g.add_argument("--layers", help="edit these layers instead of the hparams' (e.g. 2-5)")
    g.add_argument("--fluency-prompts", type=V.arg("fluency_prompts"), default=10,
                   help="generation prompts whose n-gram entropy is measured after each batch (default: %(default)s)")
    g.add_argument("--gen-len", type=V.arg("gen_len"), default=100,
                   help="tokens per greedy generation, prompt included (default: %(default)s, as MEMIT)")
    g.add_argument("--stats-cache", help="where the layer statistics are cached (default: kncore's cache)")

    p = add("eval", cmd_eval, "evaluate the unedited model: edit-case probes, or BLiMP minimal pairs",
            example="examples:\n  kncore eval --data counterfact --limit 100\n"
                    "  kncore eval --data blimp --paradigms determiner_noun_agreement_1")
    g = edit_options(p, "eval")
    g.add_argument("--paradigms", help="BLiMP paradigms when --data blimp (default: all)")
    g.add_argument("--method", default="auto", choices=("auto", "sentence", "target"),
                   help="BLiMP scoring (default: sentence for decoders, target for masked LMs)")

    p = add("report", cmd_report, "HTML and Markdown report of a run directory", parents=(),
            example="example:\n  kncore report runs/p36 --out reports/p36")
    p.add_argument("run", help="the run directory")
    p.add_argument("--out", help="where to write (default: the run directory)")
    p.add_argument("--max-rows", type=V.arg("max_rows"), default=30, help="rows shown per table (default: %(default)s)")
    p.add_argument("--open", action="store_true", help="open the HTML page in a browser")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = add("bench", cmd_bench, "run benchmarks from bench/ (no name: list them)", parents=(),
            example="examples:\n  kncore bench\n  kncore bench ig -- --quick")
    p.add_argument("names", nargs="*")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    from .planner_cli import add_plan_command
    add_plan_command(add)

    p = add("demo", cmd_demo, "a short tour on the embedded model", example="example:\n  kncore demo")
    p.add_argument("--quick", action="store_true", help="a smaller tour (fewer prompts, smaller statistics corpus)")
    p.add_argument("--fresh", action="store_true", help="delete an earlier demo run directory first")
    return top


def main(argv=None) -> int:
    """Entry point of ``python -m kncore``; returns the exit status: 0, 2 for a
    user error (one line on stderr), 1 for a failure of kncore, 130 on Ctrl-C."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `kncore bench NAME -- ARGS`: what follows `--` goes to the benchmark.
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (USER_ERROR, its line already printed)
        return e.code if isinstance(e.code, int) else USER_ERROR
    if hasattr(args, "rest"):
        args.rest = list(args.rest or []) + extra
    if not getattr(args, "func", None):
        parser.print_help()
        return USER_ERROR
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "profile", False):
            from .planner_cli import profiled
            return profiled(args.func, args) or 0
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("kncore: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BaseException as e:
        # A job that failed before its first commit leaves nothing behind: a run
        # directory exists only once the job has really started.
        Job.discard_unstarted()
        if args.debug or not isinstance(e, Exception):
            raise
        if isinstance(e, RankFailed):
            print(f"kncore: error (on rank 0): {e}", file=sys.stderr)
            return 1
        if isinstance(e, InputError):
            print(f"kncore: error: {_one_line(e)}", file=sys.stderr)
            return USER_ERROR
        if isinstance(e, BackendMissing):
            print(f"kncore: error: {e}", file=sys.stderr)
            return 1
        print(f"kncore: error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        Job.forget()
        from . import distributed
        distributed.finalize()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
