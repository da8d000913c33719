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
import importlib
import json
import logging
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from .lm import InputError


EXAMPLES = """\
examples:
  kncore info
  kncore localise --data pararel --relations P36,P1376 --limit 20 --out runs/kn-capitals
  kncore localise --data blimp --paradigms determiner_noun_agreement_1 --limit 50 --out runs/kn-det
  kncore attribute --prompt "The capital of Canada is" --target " Ottawa" --out runs/ottawa
  kncore attribute --data prompts.jsonl --layers 10-20 --steps 20 --save-dense --out runs/attr
  kncore trace --data known --limit 50 --out runs/trace
  kncore trace --prompt "The Eiffel Tower is in" --subject "The Eiffel Tower" --out runs/eiffel
  kncore stats --data pydoc --layers 5 --n-samples 2000 --out runs/stats
  kncore edit --data counterfact --limit 10 --out runs/edit
  kncore eval --data counterfact --limit 100 --out runs/eval
  kncore report runs/kn-capitals            # writes runs/kn-capitals/report.html and report.md
  kncore bench ig                           # runs bench/bench_ig.py
  torchrun --nproc-per-node 4 -m kncore localise --data pararel --out runs/kn-all --device cuda

Run directories resume: re-run the same command after Ctrl-C or a crash.
Models: an embedded name (smollm2-135m), a local Hugging Face folder, or
tiny-<gpt2|gptj|llama|bert>[:seed] (random, for tests).
"""

_DATA_NAMES = ("pararel", "blimp", "known", "counterfact", "zsre")
# Options that never change results: left out of the run's config, so they can
# differ between the first run and a resumed one.
_NOT_CONFIG = {"out", "device", "debug", "progress", "chunk", "func", "command", "data_dir", "max_tensor_gb",
               "batch_size", "max_tokens", "open", "stats_cache", "batch_tokens"}


class BackendMissing(RuntimeError):
    """A command's backend module is not part of this build."""


class _Fail(Exception):
    """An error already reported on another rank."""


# -- shared plumbing ----------------------------------------------------------------------
def _backend(module: str, command: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            raise BackendMissing(f"'kncore {command}' needs {module}, which this build does not have yet") from None
        raise


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _device(spec: str):
    import torch

    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise InputError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {spec!r} asked for but this torch sees no CUDA device")
    return dev


def load_model(name: str, device=None, dtype: str | None = None):
    """``--model``: an embedded name, a local HF folder, or ``tiny-<arch>[:seed]``."""
    from . import loading

    m = re.fullmatch(r"tiny-(\w+)(?::(\d+))?", name)
    if m:
        from .testing import ARCHS, tiny_lm
        if m.group(1) not in ARCHS:
            raise InputError(f"unknown tiny model {name!r}; use tiny-<{'|'.join(ARCHS)}>[:seed]")
        lm = tiny_lm(m.group(1), seed=int(m.group(2) or 0), dtype=loading._dtype(dtype))
        if device is not None:
            lm.model.to(device)
        return lm
    try:
        return loading.load(name, device=device, dtype=dtype)
    except ValueError as e:
        if isinstance(e, InputError):
            raise
        raise InputError(str(e)) from None


def parse_layers(spec: str | None, n_layers: int) -> list[int] | None:
    """``"all"``/None, or ``"3"``, ``"0-5,7"``: layer numbers, checked against the model."""
    if spec is None or spec == "all":
        return None
    out = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if not m:
            raise InputError(f"bad --layers {spec!r}: use e.g. 5, 0-5 or 0-5,7")
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if a > b:
            raise InputError(f"bad layer range {part!r} in --layers")
        out += range(a, b + 1)
    bad = [L for L in out if not 0 <= L < n_layers]
    if bad:
        raise InputError(f"--layers {spec!r}: layer {bad[0]} outside 0..{n_layers - 1}")
    return sorted(set(out))


def _csv(s: str | None) -> list[str] | None:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


class Progress:
    """A tqdm bar (ETA and throughput) on rank 0 only."""

    def __init__(self, total: int, unit: str, desc: str, enabled: bool):
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, smoothing=0.1)

    def __call__(self, n: int = 1, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Job:
    """What every computing command shares: the model, the run directory and
    the process group. Only rank 0 opens (and writes) the run directory."""

    def __init__(self, args, command: str):
        from . import distributed as D

        self.args, self.command, self.D = args, command, D
        dev = _device(args.device)
        dev = D.init(dev) or dev
        self.rank, self.world = D.rank(), D.world()
        _seed(args.seed)
        self.lm = load_model(args.model, device=dev, dtype=args.dtype)
        self.rd = None
        self.out = Path(args.out or f"runs/{command}")

    @property
    def progress_on(self) -> bool:
        return self.args.progress and self.rank == 0

    def config(self, **extra) -> dict:
        cfg = {k: v for k, v in vars(self.args).items() if k not in _NOT_CONFIG}
        data = cfg.get("data")
        if data and data not in _DATA_NAMES and Path(data).exists():
            cfg["data"] = str(Path(data).resolve())  # the same file from another working directory
        cfg.update(extra)
        return cfg

    def open(self, **extra):
        """Open the run directory on rank 0; every rank learns whether that worked."""
        from .rundir import DEFAULT_TENSOR_LIMIT, RunDir

        err = None
        if self.rank == 0:
            try:
                limit = int(self.args.max_tensor_gb * 2**30) if self.args.max_tensor_gb else DEFAULT_TENSOR_LIMIT
                self.rd = RunDir.open(self.out, self.config(**extra), self.lm, command=self.command,
                                      extra={"device": str(self.lm.device), "world": self.world,
                                             "argv": sys.argv[1:]}, tensor_limit=limit)
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                err = e
        self.sync(err)
        return self.rd

    def sync(self, err: Exception | None = None):
        """Raise on every rank when one rank (rank 0) failed, instead of hanging."""
        msg = self.D.broadcast_object(None if err is None else f"{err}") if self.world > 1 else None
        if err is not None:
            raise err
        if msg is not None:
            raise _Fail(msg)

    def run(self, items, work, *, table: str, unit: str, desc: str, weight=None):
        """Resumable, sharded loop over ``(key, payload)`` items (see :func:`kncore.rundir.run_items`)."""
        from .rundir import run_items

        done = self.rd.done_keys(table) if self.rank == 0 else set()
        todo = [p for k, p in items if k not in done]
        total = sum(weight(p) for p in todo) if weight else len(todo)
        if self.rank == 0 and done:
            print(f"kncore {self.command}: resuming {self.out} ({desc}): {len(items) - len(todo)} of {len(items)} "
                  f"items already done", file=sys.stderr)
        bar = Progress(total, unit, desc, self.progress_on)
        wmap = {k: (weight(p) if weight else 1) for k, p in items}
        try:
            n = run_items(self.rd, items, work, table=table, chunk=self.args.chunk,
                          progress=lambda keys: bar(sum(wmap[k] for k in keys)))
        finally:
            bar.close()
        return n

    def done(self, summary: dict | None = None):
        if self.rank == 0:
            if summary:
                self.rd.update_manifest(summary=summary)
            self.rd.close()
            print(f"kncore {self.command}: results in {self.out}  (kncore report {self.out})")
        self.D.barrier()


# -- data ---------------------------------------------------------------------------------------
def _read_records(path: Path) -> list[dict]:
    """A JSON list or JSON Lines file of objects."""
    if not path.is_file():
        raise InputError(f"--data {str(path)!r}: no such file (or a data set name: {', '.join(_DATA_NAMES)})")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            recs = json.loads(text)
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON{' Lines' if path.suffix == '.jsonl' else ''}: {e}") from None
    if isinstance(recs, dict):
        recs = [recs]
    if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
        raise InputError(f"{path}: expected a list of JSON objects")
    if not recs:
        raise InputError(f"{path}: no records")
    return recs


def _rec_key(r: dict, i: int) -> str:
    for k in ("key", "id", "uuid", "case_id", "known_id"):
        if r.get(k) is not None:
            v = r[k]
            return f"{v:06d}" if isinstance(v, int) else str(v)
    return f"{i:06d}"


def _field(r: dict, names, path, i, what):
    for n in names:
        v = r.get(n)
        if isinstance(v, dict):
            v = v.get("str")
        if isinstance(v, str) and v.strip():
            return v
    raise InputError(f"{path} record {i}: no {what} (one of the fields {', '.join(names)})")


def _limit(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


def prompt_records(args, lm) -> list[dict]:
    """(key, prompt, target) records for ``attribute``: inline, a file, or a data set."""
    if args.prompt:
        targets = args.target or []
        if len(targets) != len(args.prompt):
            raise InputError(f"{len(args.prompt)} --prompt but {len(targets)} --target: give one target per prompt")
        return [{"key": f"{i:06d}", "prompt": p, "target": t} for i, (p, t) in enumerate(zip(args.prompt, targets))]
    data = args.data or "known"
    if data in _DATA_NAMES:
        D = _backend("kncore.data", "attribute")
        if data == "known":
            recs = [{"key": f"{f.known_id:06d}", "prompt": f.prompt, "target": f.attribute}
                    for f in D.load_known(data_dir=args.data_dir)]
        elif data == "counterfact":
            recs = [{"key": f"{r.case_id if r.case_id is not None else i:06d}", "prompt": r.rewrite_prompt,
                     "target": r.target_true} for i, r in enumerate(D.load_counterfact(data_dir=args.data_dir))]
        elif data == "pararel":
            bags = _pararel_bags(args, lm)
            recs = [{"key": f"{b['key']}/{j:02d}", "prompt": p, "target": t, "relation": b["group"]}
                    for b in bags for j, (p, t) in enumerate(zip(b["prompts"], b["targets"]))]
            return recs
        else:
            raise InputError(f"'kncore attribute' reads prompt/target records; --data {data} is not one")
        return _limit(recs, args.limit)
    path = Path(data)
    recs = []
    for i, r in enumerate(_read_records(path)):
        recs.append({"key": _rec_key(r, i), "prompt": _field(r, ("prompt",), path, i, "prompt"),
                     "target": _field(r, ("target", "attribute", "object", "obj_label"), path, i, "target"),
                     **({"relation": r["relation"]} if isinstance(r.get("relation"), str) else {})})
    return _limit(recs, args.limit)


def _pararel_bags(args, lm) -> list[dict]:
    D = _backend("kncore.data", args.command)
    rels = _csv(args.relations)
    bags = D.pararel_bags(rels, args.data_dir, mlm=lm.is_mlm, mask_token=lm.tokenizer.mask_token or "[MASK]")
    bags = D.single_token_bags(lm, bags)
    per: dict = {}
    out = []
    for b in bags:
        if args.limit is not None and per.get(b.relation, 0) >= args.limit:
            continue
        per[b.relation] = per.get(b.relation, 0) + 1
        out.append({"key": f"{b.relation}/{b.uuid}", "group": b.relation, "subject": b.subject,
                    "prompts": list(b.prompts), "targets": [b.object] * len(b.prompts)})
    if not out:
        raise InputError(f"no PARAREL fact bags with single-token objects for relations {rels or 'all'}")
    return out


def fact_bags(args, lm) -> list[dict]:
    """Fact bags for ``localise``: each {key, group, subject, prompts, targets}.

    PARAREL: one fact in every paraphrase of its relation (group = relation;
    ``--limit`` bags per relation). BLiMP: the prompts of one class of a
    paradigm (group = paradigm; ``--limit`` prompts per class). A file: JSON
    (Lines) records with ``prompts`` (a list), ``target`` or ``targets``, and
    optionally ``key``, ``relation``/``group`` and ``subject``.
    """
    data = args.data or "pararel"
    if data == "pararel":
        return _pararel_bags(args, lm)
    if data == "blimp":
        D = _backend("kncore.data", "localise")
        paradigms = _csv(args.paradigms) or ["determiner_noun_agreement_1"]
        out = []
        for par in paradigms:
            for cls, items in sorted(D.blimp_prompts(lm, par, args.data_dir).by_class().items()):
                items = _limit(items, args.limit)
                out.append({"key": f"{par}/{cls}", "group": par, "subject": cls,
                            "prompts": [it.prompt_good for it in items],
                            "targets": [it.target_good for it in items]})
        return out
    if data in _DATA_NAMES:
        raise InputError(f"'kncore localise' needs fact bags (pararel, blimp or a file); not --data {data}")
    path = Path(data)
    out = []
    for i, r in enumerate(_read_records(path)):
        prompts = r.get("prompts")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"{path} record {i}: 'prompts' must be a non-empty list of strings")
        targets = r.get("targets")
        if targets is None:
            targets = [_field(r, ("target", "object", "obj_label"), path, i, "target")] * len(prompts)
        if not isinstance(targets, list) or len(targets) != len(prompts):
            raise InputError(f"{path} record {i}: 'targets' must list one target per prompt")
        out.append({"key": _rec_key(r, i), "group": str(r.get("relation") or r.get("group") or "all"),
                    "subject": str(r.get("subject", "")), "prompts": prompts, "targets": targets})
    return _limit(out, args.limit)


def trace_records(args) -> list[dict]:
    """known_1000-style records (prompt, subject, attribute) for ``trace``
    (all of them: ``--limit`` is applied after the noise scale is measured
    over every subject, as ROME does)."""
    if args.prompt:
        if not args.subject or len(args.subject) != len(args.prompt):
            raise InputError("give one --subject per --prompt")
        tg = args.target or [None] * len(args.prompt)
        if len(tg) != len(args.prompt):
            raise InputError("give one --target per --prompt (or none: the model's top-1 token)")
        return [{"key": f"{i:06d}", "prompt": p, "subject": s, "attribute": t}
                for i, (p, s, t) in enumerate(zip(args.prompt, args.subject, tg))]
    data = args.data or "known"
    if data == "known":
        D = _backend("kncore.data", "trace")
        return [{"key": f"{f.known_id:06d}", "prompt": f.prompt, "subject": f.subject, "attribute": f.attribute}
                for f in D.load_known(data_dir=args.data_dir)]
    if data in _DATA_NAMES:
        raise InputError(f"'kncore trace' reads known_1000-style records; not --data {data}")
    path = Path(data)
    out = []
    for i, r in enumerate(_read_records(path)):
        prompt = _field(r, ("prompt",), path, i, "prompt")
        subject = _field(r, ("subject",), path, i, "subject")
        if subject not in prompt:
            raise InputError(f"{path} record {i}: subject {subject!r} is not in the prompt {prompt!r}")
        tgt = next((r[k] for k in ("attribute", "target") if isinstance(r.get(k), str)), None)
        out.append({"key": _rec_key(r, i), "prompt": prompt, "subject": subject, "attribute": tgt})
    return out


def edit_cases(args, lm) -> list[tuple[str, object]]:
    """(key, :class:`kncore.evaluation.EditCase`) pairs for ``edit`` and ``eval``.

    Inline (``--prompt --subject --target-new [--target]``), CounterFact
    (default), zsRE, PARAREL (``--relations``; Niu et al.'s edit sets), or a
    file: CounterFact's layout (ROME's or EasyEdit's) or kncore's edit-case JSON.
    Symmetry and synonymy probes are added where the relation allows
    (``--no-extra-probes`` leaves them out).
    """
    E = _backend("kncore.evaluation", args.command)
    know = None if args.no_extra_probes else E.edit_knowledge(args.data_dir)
    if args.prompt:
        n = len(args.prompt)
        if not (args.subject and args.target_new) or not (n == len(args.subject) == len(args.target_new)):
            raise InputError("an inline edit needs one --subject and one --target-new per --prompt")
        tt = args.target or [None] * n
        if len(tt) != n:
            raise InputError("give one --target (the true answer) per --prompt, or none")
        cases = []
        for i, (p, sub, new, true) in enumerate(zip(args.prompt, args.subject, args.target_new, tt)):
            full = p.replace("{}", sub, 1) if "{}" in p else p
            cases.append(E.EditCase.from_dict({"case_id": i, "subject": sub, "prompt": full, "target_new": new,
                                               "target_true": true}, f"--prompt {i}"))
    else:
        D = _backend("kncore.data", args.command)
        data = args.data or "counterfact"
        if data == "counterfact":
            cases = [E.counterfact_case(r, know) for r in D.load_counterfact(data_dir=args.data_dir)]
        elif data == "zsre":
            cases = [E.zsre_case(r, know) for r in D.load_zsre(data_dir=args.data_dir)]
        elif data == "pararel":
            rels = _csv(args.relations) or ["P36"]
            cases = [c for r in rels for c in E.pararel_cases(r, args.data_dir, know=know, limit=args.limit)]
        elif data in _DATA_NAMES:
            raise InputError(f"'kncore {args.command}' reads edit cases (counterfact, zsre, pararel or a file), "
                             f"not --data {data}")
        else:
            path = Path(data)
            first = _read_records(path)[0]
            if "requested_rewrite" in first or ("target_new" in first and "ground_truth" in first):
                cases = [E.counterfact_case(r, know) for r in D.load_counterfact(path)]
            else:
                cases = E.load_edit_cases(path)
    out, seen = [], set()
    for i, c in enumerate(cases):
        key = f"{c.case_id:06d}" if isinstance(c.case_id, int) else str(c.case_id if c.case_id is not None else i)
        if key in seen:
            key = f"{key}#{i}"
        seen.add(key)
        out.append((key, c))
    return out if args.data == "pararel" else _limit(out, args.limit)


# -- commands -----------------------------------------------------------------------------------
def cmd_info(args) -> int:
    info = _backend("kncore.info", "info")
    return int(info.main(["--json"] if args.json else []) or 0)


def _attr_kwargs(args, layers):
    return dict(steps=args.steps, layers=layers, scheme=args.scheme, site=args.site,
                batch_size=args.batch_size if args.batch_size else "auto", progress=False,
                multi_token=args.multi_token)


def cmd_attribute(args) -> int:
    A = _backend("kncore.attribution", "attribute")
    S = _backend("kncore.selection", "attribute")
    job = Job(args, "attribute")
    lm = job.lm
    layers = parse_layers(args.layers, lm.n_layers)
    recs = prompt_records(args, lm)
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
        att = A.attribute(lm, [r["prompt"] for r in chunk], [r["target"] for r in chunk], **_attr_kwargs(args, layers))
        coarse = S.select_coarse(att, adaptive_threshold=args.adaptive_threshold)
        arows, krows = [], []
        for i, (r, ks) in enumerate(zip(chunk, coarse)):
            arows.append({"key": r["key"], "relation": r.get("relation"), "prompt": r["prompt"], "target": r["target"],
                          "base_prob": float(att.base_probs[i]), "max_gap": float(att.completeness_gap[i].max()),
                          "n_coarse": len(ks)})
            krows += [{"key": r["key"], "relation": r.get("relation"), "layer": l, "neuron": n, "score": s}
                      for (l, n), s in zip(ks.neurons, ks.scores)]
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
    """Niu et al.'s pipeline over fact bags: (1) IG and coarse neurons of every
    prompt, R1^2 of each bag's attribution vectors; (2) refinement per relation
    or paradigm (adaptive p); (3) probability change of each bag's prompts when
    its knowledge neurons are suppressed or enhanced."""
    A = _backend("kncore.attribution", "localise")
    S = _backend("kncore.selection", "localise")
    I = _backend("kncore.interventions", "localise")
    Loc = _backend("kncore.localisation", "localise")
    job = Job(args, "localise")
    lm = job.lm
    layers = parse_layers(args.layers, lm.n_layers)
    p = _sharing_p(args.p)
    bags = fact_bags(args, lm)
    job.open(n_bags=len(bags))
    items = [(b["key"], b) for b in bags]
    n_prompts = lambda b: len(b["prompts"])  # noqa: E731

    def coarse_work(chunk):
        # one attribution call for every prompt of the chunk's bags (batched together)
        flat = [(b, j, q, t) for b in chunk for j, (q, t) in enumerate(zip(b["prompts"], b["targets"]))]
        att = A.attribute(lm, [f[2] for f in flat], [f[3] for f in flat], **_attr_kwargs(args, layers))
        coarse = S.select_coarse(att, adaptive_threshold=args.adaptive_threshold)
        prow, crow, brow = [], [], []
        for i, ((b, j, q, t), ks) in enumerate(zip(flat, coarse)):
            prow.append({"key": b["key"], "j": j, "relation": b["group"], "prompt": q, "target": t,
                         "base_prob": float(att.base_probs[i]), "max_gap": float(att.completeness_gap[i].max()),
                         "n_coarse": len(ks)})
            crow += [{"key": b["key"], "j": j, "relation": b["group"], "layer": l, "neuron": n, "score": s}
                     for (l, n), s in zip(ks.neurons, ks.scores)]
        start = 0
        for b in chunk:
            vec = att.scores[start:start + n_prompts(b)]
            start += n_prompts(b)
            r1 = None
            if len(vec) >= 2 and bool((vec.flatten(1).norm(dim=1) > 0).all()):
                r1 = Loc.r1_squared(vec)
            brow.append({"key": b["key"], "relation": b["group"], "subject": b["subject"], "n_prompts": len(vec),
                         "r1_sq": r1})
        return {"bags": brow, "prompts": prow, "coarse": crow}

    job.run(items, coarse_work, table="bags", unit="prompt", desc="IG + coarse", weight=n_prompts)

    # 2. refine per relation / paradigm (cheap; rank 0)
    err = None
    if job.rank == 0:
        try:
            _refine(job, S, Loc, bags, p)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank
            err = e
    job.sync(err)

    # 3. probability change when the fact's neurons are suppressed or enhanced
    kns = None
    if job.rank == 0:
        kns = {}
        for r in job.rd.read("kn").to_pylist():
            kns.setdefault(r["key"], []).append((r["layer"], r["neuron"]))
    kns = job.D.broadcast_object(kns)

    def effect_work(chunk):
        rows = []
        for b in chunk:
            neurons = kns.get(b["key"])
            if not neurons:
                continue  # no knowledge neurons: nothing to intervene on
            tid = [lm.target_ids(q, t)[0] for q, t in zip(b["prompts"], b["targets"])]
            before = _target_probs(lm, b["prompts"], tid)
            for mode in ("suppress", "enhance"):
                with I.patch_neurons(lm, neurons, mode=mode, factor=args.enhance_factor):
                    after = _target_probs(lm, b["prompts"], tid)
                rows += [{"key": b["key"], "relation": b["group"], "prompt": q, "intervention": mode,
                          "n_kn": len(neurons), "p_before": x, "p_after": y}
                         for q, x, y in zip(b["prompts"], before, after)]
        return {"effect": rows}

    job.run(items, effect_work, table="effect", unit="prompt", desc="suppress/enhance", weight=n_prompts)
    summary = _localise_summary(job) if job.rank == 0 else None
    job.done(summary)
    return 0


def _sharing_p(s: str):
    if s == "adaptive":
        return s
    try:
        p = float(s)
    except ValueError:
        p = -1.0
    if not 0 <= p < 1:
        raise InputError(f"--p must be a number in [0, 1) or 'adaptive', got {s!r}")
    return p


def _target_probs(lm, prompts, tids, batch: int = 32) -> list[float]:
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        pr = lm.next_token_probs(prompts[i:i + batch])
        out += pr.gather(1, torch.tensor(tids[i:i + batch], device=pr.device)[:, None])[:, 0].tolist()
    return out


def _refine(job, S, Loc, bags, p):
    """Refine each relation's (paradigm's) bags at once: the adaptive p is chosen per relation.
    One commit per relation: its ``localisation`` row (Niu et al.'s table) and its ``kn`` rows."""
    rd = job.rd
    done = rd.done_keys("localisation")
    groups: dict = {}
    for b in bags:
        groups.setdefault(b["group"], []).append(b)
    todo = [g for g in groups if g not in done]
    if not todo:
        return
    coarse: dict = {}
    for r in rd.read("coarse").to_pylist():
        coarse.setdefault((r["key"], r["j"]), []).append((r["layer"], r["neuron"], r["score"]))
    r1: dict = {}
    for r in rd.read("bags").to_pylist():
        if r["r1_sq"] is not None:
            r1.setdefault(r["relation"], []).append(r["r1_sq"])
    for g in todo:
        facts = []
        for b in groups[g]:
            sets = []
            for j in range(len(b["prompts"])):
                ns = coarse.get((b["key"], j), [])
                sets.append(S.KNSet(tuple((l, n) for l, n, _ in ns), tuple(s for _, _, s in ns)))
            facts.append(sets)
        ref = S.refine(facts, p)
        row = Loc.localisation_row(g, ref)
        row.update(key=g, r1_sq=(sum(r1[g]) / len(r1[g])) if r1.get(g) else None, converged=ref.converged,
                   layer_counts=Loc.layer_counts(ref, job.lm.n_layers))
        kn_rows = []
        for b, ks in zip(groups[g], ref.sets):
            kn_rows += [{"key": b["key"], "relation": g, "subject": b["subject"], "target": b["targets"][0],
                         "layer": l, "neuron": n, "count": c, "n_prompts": len(b["prompts"]), "score": s}
                        for (l, n), c, s in zip(ks.neurons, ks.counts, ks.scores or [None] * len(ks))]
        rd.commit({"localisation": [row], "kn": kn_rows},
                  keys={"localisation": [g], "kn": [b["key"] for b in groups[g]]})


def _localise_summary(job) -> dict:
    """Run-wide figures: facts, prompts, mean KNs per fact and tau (Niu et al.'s
    table, over all relations), mean R1^2, and the mean relative probability
    change of suppression and enhancement."""
    import numpy as np

    rd = job.rd
    loc = rd.read("localisation").to_pylist()
    n_facts = sum(r["n_facts"] for r in loc)
    out = {"facts": n_facts, "prompts": rd.read("prompts").num_rows,
           "mean_kn_per_fact": rd.read("kn").num_rows / max(1, n_facts),
           "mean_tau": float(np.mean([r["tau"] for r in loc])) if loc else None,
           "facts_with_kn": len(rd.read("kn").column("key").unique()) if rd.read("kn").num_rows else 0}
    r1 = [r["r1_sq"] for r in rd.read("bags").to_pylist() if r["r1_sq"] is not None]
    out["mean_r1_sq"] = float(np.mean(r1)) if r1 else None
    eff = rd.read("effect")
    if eff.num_rows:
        pb = np.asarray(eff.column("p_before").to_pylist())
        pa = np.asarray(eff.column("p_after").to_pylist())
        it = np.asarray(eff.column("intervention").to_pylist())
        lo = np.minimum(pa, pb)
        for mode in ("suppress", "enhance"):
            m = (it == mode) & (lo > 0)
            if m.any():  # the paper's relative change: (after - before) / min(before, after)
                out[f"{mode}_mean_change_pct"] = float(100 * ((pa[m] - pb[m]) / lo[m]).mean())
    return out


def cmd_trace(args) -> int:
    T = _backend("kncore.tracing", "trace")
    job = Job(args, "trace")
    lm = job.lm
    kinds = _csv(args.kinds)
    recs = trace_records(args)
    noise = args.noise
    try:
        noise = float(noise)
    except ValueError:
        pass
    # ROME: the noise is k times the std of the embeddings of every subject of the data set.
    scale = T.resolve_noise(lm, noise, [r["subject"] for r in recs] if isinstance(noise, str) else None)
    recs = _limit(recs, args.limit)
    job.open(noise_scale=round(scale, 9))

    def work(chunk):
        rows, status = [], []
        for r in chunk:
            target = r["attribute"] if args.target_mode == "attribute" else None
            st = "traced"
            if args.target_mode == "known" and r["attribute"] is not None:
                # ROME traces a known fact only when the model's top-1 token is the attribute.
                top = lm.top_k(r["prompt"], 1)[0][0]
                if top.strip() != r["attribute"].strip():
                    st = "wrong_prediction"
            res = None
            if st == "traced":
                try:
                    res = T.trace(lm, r["prompt"], r["subject"], target=target, kinds=kinds, samples=args.samples,
                                  noise=scale, window=args.window, seed=args.trace_seed,
                                  max_tokens=args.max_tokens)
                except InputError as e:
                    st = f"error: {e}"
            status.append({"key": r["key"], "prompt": r["prompt"], "subject": r["subject"],
                           "attribute": r["attribute"], "status": st,
                           "answer": res.answer if res else None, "high": res.high if res else None,
                           "low": res.low if res else None})
            if res is not None:
                for k in res.kinds:
                    rows.append({"key": r["key"], "prompt": r["prompt"], "subject": r["subject"], "target": res.answer,
                                 "kind": k, "tokens": list(res.tokens), "subject_start": res.subject_range[0],
                                 "subject_end": res.subject_range[1], "target_position": res.target_position,
                                 "scores": res.scores[k].tolist(), "low_score": res.low, "high_score": res.high,
                                 "window": res.window, "samples": res.samples, "input_ids": list(res.input_ids),
                                 "target_id": res.target, "noise": res.noise, "seed": res.seed})
        return {"records": status, "trace": rows}

    job.run([(r["key"], r) for r in recs], work, table="records", unit="prompt", desc="trace")
    summary = None
    if job.rank == 0:
        st = job.rd.read("records").column("status").to_pylist()
        summary = {"records": len(st), "traced": st.count("traced"),
                   "wrong_prediction": st.count("wrong_prediction"), "noise_scale": scale}
    job.done(summary)
    return 0


def cmd_stats(args) -> int:
    R = _backend("kncore.rome", "stats")
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

    try:
        # layer_stats shards the texts over ranks, all-reduces the sums, and
        # resumes from its own checkpoints in the cache folder.
        res = R.layer_stats(lm, layers, args.data or "pydoc", n_samples=args.n_samples, dtype=args.stats_dtype,
                            cache_dir=args.stats_cache, progress=prog if job.progress_on else False,
                            batch_tokens=args.batch_tokens)
    finally:
        bar.close()
    if job.rank == 0:
        rows = []
        for L, st in sorted(res.items()):
            C = st.second_moment.double()
            rows.append({"key": f"layer{L:03d}", "layer": L, "n_tokens": st.n_tokens, "n_texts": st.n_texts,
                         "trace": float(C.diagonal().sum()), "mean_norm": float(st.mean.double().norm()),
                         "file": str(st.path) if st.path else None})
        done = job.rd.done_keys("stats")
        rows = [r for r in rows if r["key"] not in done]
        if rows:
            job.rd.append("stats", rows)
    job.done({"layers": layers, "n_texts": max((s.n_texts for s in res.values()), default=0)})
    return 0


def _edit_rows(keys, rows, method):
    out = []
    for k, r in zip(keys, rows):
        r = dict(r, key=k, method=method)
        r["case_id"] = None if r.get("case_id") is None else str(r["case_id"])
        out.append(r)
    return out


def cmd_edit(args) -> int:
    R = _backend("kncore.rome", "edit")
    E = _backend("kncore.evaluation", "edit")
    job = Job(args, "edit")
    lm = job.lm
    hp = R.load_hparams(args.hparams) if args.hparams else R.hparams_for(lm)
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
        stats = R.layer_stats(lm, hp.layers, hp.mom2_dataset, n_samples=hp.mom2_n_samples, dtype=hp.mom2_dtype,
                              cache_dir=args.stats_cache, progress=job.progress_on)

    def work(chunk):
        keys = [k for k, _ in chunk]
        rows = E.evaluate_edits(lm, [c for _, c in chunk], lambda case: R.edit(lm, case.request(), hp, stats=stats))
        return {"edit_eval": _edit_rows(keys, rows, "rome")}

    job.run([(k, (k, c)) for k, c in cases], work, table="edit_eval", unit="edit", desc="ROME edit + eval")
    summary = E.summarise_edits(job.rd.read("edit_eval").to_pylist()) if job.rank == 0 else None
    job.done(summary)
    return 0


def _hparams_dict(hp) -> dict:
    import dataclasses
    return {f.name: getattr(hp, f.name) for f in dataclasses.fields(hp) if f.name != "ignored"}


def cmd_eval(args) -> int:
    E = _backend("kncore.evaluation", "eval")
    job = Job(args, "eval")
    lm = job.lm
    if (args.data or "counterfact") == "blimp":
        D = _backend("kncore.data", "eval")
        items = []
        for par in _csv(args.paradigms) or D.blimp_paradigms(args.data_dir):
            prompts = _limit(list(D.blimp_prompts(lm, par, args.data_dir)), args.limit)
            items += [(f"{par}/{x.pair_id}", x) for x in prompts]
        job.open()

        def pair_work(chunk):
            rows = E.minimal_pair_scores(lm, chunk, method=args.method)
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
        rows = E.evaluate_edits(lm, [c for _, c in chunk], None)
        rows = [{k: v for k, v in r.items() if not k.endswith("_post")} for r in rows]
        return {"metrics": _edit_rows([k for k, _ in chunk], rows, "none")}

    job.run([(k, (k, c)) for k, c in cases], work, table="metrics", unit="case", desc="eval")
    summary = E.summarise_edits(job.rd.read("metrics").to_pylist()) if job.rank == 0 else None
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
    demo = _backend("kncore.demo", "demo")
    return int(demo.main(args) or 0)


# -- parser -----------------------------------------------------------------------------------------
def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--model", default="smollm2-135m",
                   help="embedded name, local HF folder, or tiny-<arch>[:seed] (default: %(default)s)")
    g.add_argument("--data", help="a data set name (pararel, blimp, known, counterfact, zsre) or a file")
    g.add_argument("--data-dir", help="folder of the named data sets (default: $KNCORE_DATA or ../shared/data)")
    g.add_argument("--out", help="run directory (default: runs/<command>); re-run to resume")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--limit", type=int, help="only the first N items (per relation for localise)")
    g.add_argument("--chunk", type=int, default=8, help="items per commit to the run directory (default: %(default)s)")
    g.add_argument("--max-tensor-gb", type=float, help="refuse dense tensors above this size (default 2)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    g.add_argument("--profile", action="store_true", help="time and FLOP/s of each stage")
    return p


def _ig_options(p):
    g = p.add_argument_group("integrated gradients")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--layers", default="all", help="all, or e.g. 0-5,7")
    g.add_argument("--scheme", default="riemann-left",
                   choices=("riemann-left", "linspace", "midpoint", "trapezoid", "gauss"))
    g.add_argument("--site", default="act", choices=("act", "pre_act"))
    g.add_argument("--multi-token", default="teacher", choices=("teacher", "greedy", "forbid"))
    g.add_argument("--batch-size", type=int, help="items per IG batch (default: from free memory)")
    g.add_argument("--adaptive-threshold", type=float, default=0.2,
                   help="coarse neurons: score > t x max (default: %(default)s, Dai et al.)")


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kncore", description="Knowledge neurons, causal tracing and ROME, fast.",
                                  epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    common = _common()

    def add(name, func, help, parents=(common,), example=""):
        sp = sub.add_parser(name, help=help, description=help, parents=list(parents),
                            epilog=example, formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=func, command=name)
        return sp

    p = add("info", cmd_info, "versions, devices and the compiled extension", parents=(),
            example="examples:\n  kncore info\n  kncore info --json")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = add("localise", cmd_localise, "localise knowledge neurons of a corpus of fact bags, with statistics",
            example="examples:\n  kncore localise --data pararel --relations P36 --limit 20 --out runs/p36\n"
                    "  kncore localise --data blimp --paradigms determiner_noun_agreement_1 --limit 50\n"
                    "  torchrun --nproc-per-node 2 -m kncore localise --data pararel --relations P36")
    _ig_options(p)
    g = p.add_argument_group("localise")
    g.add_argument("--relations", help="PARAREL relations, e.g. P36,P1376 (default: all)")
    g.add_argument("--paradigms", help="BLiMP paradigms (default: determiner_noun_agreement_1)")
    g.add_argument("--p", default="adaptive", help="sharing threshold in [0, 1) or 'adaptive' (default)")
    g.add_argument("--enhance-factor", type=float, default=2.0, help="enhance multiplies activations by this")

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
    g.add_argument("--kinds", default="hidden,mlp,attn")
    g.add_argument("--samples", type=int, default=10)
    g.add_argument("--noise", default="3sd", help="a number or k x the subjects' embedding std: '3sd'")
    g.add_argument("--window", type=int, default=10)
    g.add_argument("--trace-seed", type=int, default=1, help="ROME's noise seed")
    g.add_argument("--target-mode", default="known", choices=("known", "attribute", "top1"),
                   help="known: trace only when top-1 is the attribute (ROME); attribute: trace its "
                        "probability anyway; top1: the model's own top-1")
    g.add_argument("--max-tokens", type=int, help="row-positions per forward (memory knob)")

    p = add("stats", cmd_stats, "ROME layer statistics (second moment of MLP keys) over a text corpus",
            example="examples:\n  kncore stats --layers 5 --n-samples 2000\n"
                    "  kncore stats --data texts.jsonl --layers 5,6 --out runs/stats")
    g = p.add_argument_group("stats")
    g.add_argument("--layers", help="layers, e.g. 5 or 4-6")
    g.add_argument("--n-samples", type=int, default=1000, help="texts (default: %(default)s)")
    g.add_argument("--stats-dtype", default="float32", choices=("float32", "float64"))
    g.add_argument("--batch-tokens", type=int, default=4096)
    g.add_argument("--stats-cache", help="cache folder of the statistics (default: kncore's cache, where "
                                         "'kncore edit' finds them)")

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
    g.add_argument("--edit-layer", type=int, help="edit this layer instead of the hparams' one")
    g.add_argument("--stats-cache", help="where ROME's layer statistics are cached (default: kncore's cache)")

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
    p.add_argument("--max-rows", type=int, default=30, help="rows shown per table (default: %(default)s)")
    p.add_argument("--open", action="store_true", help="open the HTML page in a browser")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = add("bench", cmd_bench, "run benchmarks from bench/ (no name: list them)", parents=(),
            example="examples:\n  kncore bench\n  kncore bench ig -- --quick")
    p.add_argument("names", nargs="*")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    from .planner_cli import add_plan_command
    add_plan_command(add)

    p = add("demo", cmd_demo, "a short tour on the embedded model", example="example:\n  kncore demo")
    p.add_argument("--quick", action="store_true", help="a smaller tour (fewer prompts, smaller statistics corpus)")
    p.add_argument("--fresh", action="store_true", help="delete an earlier demo run directory first")
    return top


def main(argv=None) -> int:
    """Entry point of ``python -m kncore``; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `kncore bench NAME -- ARGS`: what follows `--` goes to the benchmark.
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if hasattr(args, "rest"):
        args.rest = list(args.rest or []) + extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
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
    except _Fail as e:
        if args.debug:
            raise
        print(f"kncore: error (on rank 0): {e}", file=sys.stderr)
        return 1
    except (InputError, BackendMissing) as e:
        if args.debug:
            raise
        print(f"kncore: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, InputError) else 1
    except Exception as e:  # noqa: BLE001 - one line unless --debug
        if args.debug:
            raise
        print(f"kncore: error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        from . import distributed as D
        D.finalize()
