"""Records for the command line and the pipeline (:mod:`kncore.pipeline`):
prompts with targets (``attribute``), fact bags (``localise``) and known facts
(``trace``), read inline, from a named data set, or from a JSON (Lines) file of
objects. Each record is a dict with a ``key`` that names it in the run
directory's tables."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ._io import json_file, read_jsonl

# The data sets a ``--data`` name refers to (anything else is a file).
DATA_SETS = ("pararel", "blimp", "known", "counterfact", "zsre")


def read_records(path: Path) -> list[dict]:
    """A JSON list or JSON Lines file of objects."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--data {str(path)!r}: no such file (or a data set name: {', '.join(DATA_SETS)})")
    if path.suffix == ".jsonl":
        recs = [r for _, r in read_jsonl(path)]  # errors name the file's line, not the line's own "line 1"
    else:
        recs = json_file(path, lambda e: InputError(f"{path}: not valid JSON: {e}"))
    if isinstance(recs, dict):
        recs = [recs]
    if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
        raise InputError(f"{path}: expected a list of JSON objects")
    if not recs:
        raise InputError(f"{path}: no records")
    return recs


def record_key(r: dict, i: int) -> str:
    """A record's key: its ``key``/``id``/``uuid``/``case_id``/``known_id``, else its index."""
    for k in ("key", "id", "uuid", "case_id", "known_id"):
        if r.get(k) is not None:
            v = r[k]
            return f"{v:06d}" if isinstance(v, int) else str(v)
    return f"{i:06d}"


def record_field(r: dict, names, path, i, what) -> str:
    """The first non-empty string among ``names`` (a ``{"str": ...}`` dict counts), else one-line error."""
    for n in names:
        v = r.get(n)
        if isinstance(v, dict):
            v = v.get("str")
        if isinstance(v, str) and v.strip():
            return v
    raise InputError(f"{path} record {i}: no {what} (one of the fields {', '.join(names)})")


def first(items: list, limit: int | None) -> list:
    """The first ``limit`` items (all when ``limit`` is None)."""
    return items if limit is None else items[:limit]


def prompt_records(lm, data: str | None, *, prompts=None, targets=None, relations=None, limit: int | None = None,
                   data_dir=None) -> list[dict]:
    """(key, prompt, target[, relation]) records for ``attribute``: inline
    (``prompts``/``targets``), a data set (known, counterfact, pararel), or a file."""
    from . import load_counterfact, load_known

    if prompts:
        targets = targets or []
        if len(targets) != len(prompts):
            raise InputError(f"{len(prompts)} --prompt but {len(targets)} --target: give one target per prompt")
        return [{"key": f"{i:06d}", "prompt": p, "target": t} for i, (p, t) in enumerate(zip(prompts, targets))]
    data = data or "known"
    if data in DATA_SETS:
        if data == "known":
            recs = [{"key": f"{f.known_id:06d}", "prompt": f.prompt, "target": f.attribute}
                    for f in load_known(data_dir=data_dir)]
        elif data == "counterfact":
            recs = [{"key": f"{r.case_id if r.case_id is not None else i:06d}", "prompt": r.rewrite_prompt,
                     "target": r.target_true} for i, r in enumerate(load_counterfact(data_dir=data_dir))]
        elif data == "pararel":
            bags = pararel_fact_bags(lm, relations, limit=limit, data_dir=data_dir)
            return [{"key": f"{b['key']}/{j:02d}", "prompt": p, "target": t, "relation": b["group"]}
                    for b in bags for j, (p, t) in enumerate(zip(b["prompts"], b["targets"]))]
        else:
            raise InputError(f"'kncore attribute' reads prompt/target records; --data {data} is not one")
        return first(recs, limit)
    path = Path(data)
    recs = []
    for i, r in enumerate(read_records(path)):
        recs.append({"key": record_key(r, i), "prompt": record_field(r, ("prompt",), path, i, "prompt"),
                     "target": record_field(r, ("target", "attribute", "object", "obj_label"), path, i, "target"),
                     **({"relation": r["relation"]} if isinstance(r.get("relation"), str) else {})})
    return first(recs, limit)


def pararel_fact_bags(lm, relations: list[str] | None, *, limit: int | None = None, data_dir=None) -> list[dict]:
    """PARAREL fact bags with one-token objects, ``limit`` per relation."""
    from .pararel import pararel_bags, single_token_bags

    bags = pararel_bags(relations, data_dir, mlm=lm.is_mlm, mask_token=lm.tokenizer.mask_token or "[MASK]")
    bags = single_token_bags(lm, bags)
    per: dict = {}
    out = []
    for b in bags:
        if limit is not None and per.get(b.relation, 0) >= limit:
            continue
        per[b.relation] = per.get(b.relation, 0) + 1
        out.append({"key": f"{b.relation}/{b.uuid}", "group": b.relation, "subject": b.subject,
                    "prompts": list(b.prompts), "targets": [b.object] * len(b.prompts)})
    if not out:
        raise InputError(f"no PARAREL fact bags with single-token objects for relations {relations or 'all'}")
    return out


def fact_bags(lm, data: str | None, *, relations=None, paradigms=None, limit: int | None = None,
              data_dir=None) -> list[dict]:
    """Fact bags for ``localise``: each {key, group, subject, prompts, targets}.

    PARAREL: one fact in every paraphrase of its relation (group = relation;
    ``limit`` bags per relation). BLiMP: the prompts of one class of a
    paradigm (group = paradigm; ``limit`` prompts per class). A file: JSON
    (Lines) records with ``prompts`` (a list), ``target`` or ``targets``, and
    optionally ``key``, ``relation``/``group`` and ``subject``.
    """
    from .blimp import blimp_prompts

    data = data or "pararel"
    if data == "pararel":
        return pararel_fact_bags(lm, relations, limit=limit, data_dir=data_dir)
    if data == "blimp":
        out = []
        for par in paradigms or ["determiner_noun_agreement_1"]:
            for cls, items in sorted(blimp_prompts(lm, par, data_dir).by_class().items()):
                items = first(items, limit)
                out.append({"key": f"{par}/{cls}", "group": par, "subject": cls,
                            "prompts": [it.prompt_good for it in items],
                            "targets": [it.target_good for it in items]})
        return out
    if data in DATA_SETS:
        raise InputError(f"'kncore localise' needs fact bags (pararel, blimp or a file); not --data {data}")
    path = Path(data)
    out = []
    for i, r in enumerate(read_records(path)):
        prompts = r.get("prompts")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"{path} record {i}: 'prompts' must be a non-empty list of strings")
        targets = r.get("targets")
        if targets is None:
            targets = [record_field(r, ("target", "object", "obj_label"), path, i, "target")] * len(prompts)
        if not isinstance(targets, list) or len(targets) != len(prompts):
            raise InputError(f"{path} record {i}: 'targets' must list one target per prompt")
        out.append({"key": record_key(r, i), "group": str(r.get("relation") or r.get("group") or "all"),
                    "subject": str(r.get("subject", "")), "prompts": prompts, "targets": targets})
    return first(out, limit)


def trace_records(data: str | None, *, prompts=None, subjects=None, targets=None, data_dir=None) -> list[dict]:
    """known_1000-style records (prompt, subject, attribute) for ``trace``
    (all of them: a limit is applied after the noise scale is measured
    over every subject, as ROME does)."""
    from . import load_known

    if prompts:
        if not subjects or len(subjects) != len(prompts):
            raise InputError("give one --subject per --prompt")
        tg = targets or [None] * len(prompts)
        if len(tg) != len(prompts):
            raise InputError("give one --target per --prompt (or none: the model's top-1 token)")
        return [{"key": f"{i:06d}", "prompt": p, "subject": s, "attribute": t}
                for i, (p, s, t) in enumerate(zip(prompts, subjects, tg))]
    data = data or "known"
    if data == "known":
        return [{"key": f"{f.known_id:06d}", "prompt": f.prompt, "subject": f.subject, "attribute": f.attribute}
                for f in load_known(data_dir=data_dir)]
    if data in DATA_SETS:
        raise InputError(f"'kncore trace' reads known_1000-style records; not --data {data}")
    path = Path(data)
    out = []
    for i, r in enumerate(read_records(path)):
        prompt = record_field(r, ("prompt",), path, i, "prompt")
        subject = record_field(r, ("subject",), path, i, "subject")
        tgt = next((r[k] for k in ("attribute", "target") if isinstance(r.get(k), str)), None)
        out.append({"key": record_key(r, i), "prompt": prompt, "subject": subject, "attribute": tgt})
    return out


__all__ = ["DATA_SETS", "first", "read_records", "record_key", "record_field", "prompt_records", "pararel_fact_bags",
           "fact_bags", "trace_records"]
