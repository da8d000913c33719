"""Causal tracing over a data set (known_1000 format) and ROME's summary.

Layout of an output directory::

    OUT/config.json           settings, model fingerprint and the resolved noise scale
    OUT/records/<id>.json     one record: its fields, status, and the trace (if traced)

Each record file is written to a temp name and renamed, so an interrupted run
leaves only whole records; running the same call again skips them and
finishes the rest, giving the same files as an uninterrupted run. A directory
made with other settings (or another model) is refused. Every file carries
the SHA-256 of its content (:mod:`kncore.atomic`): a damaged record is named,
set aside and traced again; a damaged config.json is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..atomic import CorruptFile, read_json_checked, set_aside, write_json_checked
from ..lm import LM, InputError
from .core import KINDS, TraceResult, check_args, resolve_noise, trace

FORMAT = 1
GROUPS = ("First subject token", "Middle subject tokens", "Last subject token",
          "First subsequent token", "Further tokens", "Last token")
_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _done(path: Path) -> bool:
    """Whether a record file exists and checks out; a damaged one is set aside (to be traced again)."""
    if not path.exists():
        return False
    try:
        read_json_checked(path)
        return True
    except CorruptFile as e:
        logging.getLogger("kncore").warning("%s; set aside as %s and traced again", e, set_aside(path))
        return False


def _records(records) -> list[dict]:
    if isinstance(records, (str, Path)):
        p = Path(records)
        if not p.is_file():
            raise InputError(f"records file {str(p)!r} does not exist")
        with open(p) as f:
            records = json.load(f)
    if isinstance(records, dict) or not isinstance(records, Sequence):
        raise InputError("records must be a list of dicts (known_1000 format) or the path of one")
    out, seen = [], set()
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise InputError(f"record {i} is a {type(r).__name__}, not a dict")
        for key in ("prompt", "subject", "attribute"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise InputError(f"record {i} has no {key!r} string")
        rid = str(r.get("known_id", i))
        if not _ID.match(rid):
            raise InputError(f"record {i}: id {rid!r} is not usable as a file name")
        if rid in seen:
            raise InputError(f"record id {rid!r} appears twice")
        seen.add(rid)
        out.append({**r, "_id": rid})
    if not out:
        raise InputError("no records given")
    return out


@torch.no_grad()
def _clean_top1(lm: LM, prompt: str) -> int:
    ids = lm.tokenize(prompt)
    pos = lm.target_position(ids)
    out = lm.run(torch.tensor([ids], device=lm.device), logits=torch.tensor([pos], device=lm.device))
    return int(out.logits[0].float().argmax())


def trace_corpus(lm: LM, records, out_dir, *, kinds: Iterable[str] = KINDS, samples: int = 10, noise="3sd",
                 noise_subjects: Sequence[str] | None = None, window: int = 10, seed: int = 1,
                 limit: int | None = None, progress: bool = True, max_tokens: int | None = None) -> list[dict]:
    """Trace every record of a known_1000-style data set into ``out_dir``, resumably.

    Records need ``prompt``, ``subject`` and ``attribute`` (``known_id`` names
    the file; the index is used without it). As in ROME, a record is traced
    only when the model's clean top-1 token, decoded and stripped, equals the
    attribute; the others are stored with status ``"wrong_prediction"``. With
    ``noise="<k>sd"`` and no ``noise_subjects``, the std is taken over the
    subjects of all records, as ROME does. ``limit`` traces only the first
    ``limit`` records. Returns :func:`load_corpus` of the directory.
    """
    kinds = check_args(kinds, samples, window, seed)
    all_recs = _records(records)
    recs = all_recs
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InputError(f"limit must be an integer >= 0, got {limit!r}")
        recs = recs[:limit] if limit else recs[:0]
    out = Path(out_dir)
    (out / "records").mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    if noise_subjects is None and isinstance(noise, str):
        noise_subjects = [r["subject"] for r in all_recs]
    subjects_hash = None
    if isinstance(noise, str):
        subjects_hash = hashlib.sha256(json.dumps(list(noise_subjects)).encode()).hexdigest()[:16]
    config = {"format": FORMAT, "model": str(lm.name), "fingerprint": lm.fingerprint(), "kinds": list(kinds),
              "samples": int(samples), "noise": noise, "noise_subjects": subjects_hash, "window": int(window),
              "seed": int(seed)}
    if cfg_path.exists():
        try:
            old = read_json_checked(cfg_path, required=False)  # no checksum: written by an older kncore
        except CorruptFile as e:
            raise CorruptFile(e.path, e.problem, f"use a new directory, or delete {out} to start over") from None
        # the model's name or path is a label: its identity is the fingerprint
        diff = sorted(k for k in config if k != "model" and old.get(k) != config[k])
        if diff:
            raise InputError(f"{out} was made with other settings ({', '.join(diff)}): "
                             f"use a new directory or the same settings")
        scale = old["noise_scale"]
    else:
        scale = resolve_noise(lm, noise, noise_subjects)
        write_json_checked(cfg_path, {**config, "noise_scale": scale})

    todo = [r for r in recs if not _done(out / "records" / f"{r['_id']}.json")]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(recs), initial=len(recs) - len(todo), desc="causal trace", unit="fact")
    try:
        for r in todo:
            fields = {k: v for k, v in r.items() if k != "_id"}
            top = _clean_top1(lm, r["prompt"])
            answer = lm.tokenizer.decode([top])
            entry = {"id": r["_id"], "record": fields, "answer": answer}
            if answer.strip() != r["attribute"].strip():
                entry.update(status="wrong_prediction", trace=None)
            else:
                res = trace(lm, r["prompt"], r["subject"], target=top, kinds=kinds, samples=samples, noise=scale,
                            window=window, seed=seed, max_tokens=max_tokens)
                entry.update(status="ok", trace=res.to_dict())
            write_json_checked(out / "records" / f"{r['_id']}.json", entry)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return load_corpus(out, ids=[r["_id"] for r in recs])


def load_corpus(out_dir, ids: Sequence[str] | None = None) -> list[dict]:
    """The records of a :func:`trace_corpus` directory (all, or ``ids`` in that
    order), each ``{"id", "record", "answer", "status", "trace"}`` with
    ``trace`` a :class:`TraceResult` (None for skipped records)."""
    rec_dir = Path(out_dir) / "records"
    if not rec_dir.is_dir():
        raise InputError(f"{out_dir} is not a trace_corpus directory (no records/)")
    if ids is None:
        paths = sorted(rec_dir.glob("*.json"), key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.stem))
    else:
        paths = [rec_dir / f"{i}.json" for i in ids]
    out = []
    for p in paths:
        if not p.exists():
            continue
        try:
            d = read_json_checked(p, required=False)
        except CorruptFile as e:
            raise CorruptFile(e.path, e.problem, "run trace_corpus again on this directory to trace it again") from None
        if d.get("trace") is not None:
            d["trace"] = TraceResult.from_dict(d["trace"])
        out.append(d)
    return out


@dataclass
class AIE:
    """ROME's average over traced facts, by token group (:data:`GROUPS`).

    ``mean[kind]`` and ``std[kind]`` are ``[6, n_layers]`` (numpy) over the
    group's rows of every fact (the middle subject tokens and the further
    tokens each count once per token); ``low`` and ``high`` are the mean
    corrupted and clean probabilities; :meth:`effect` is ``mean - low``.
    A group no fact has (e.g. middle tokens when every subject is two tokens
    long) is NaN.
    """

    kinds: tuple
    mean: dict
    std: dict
    low: float
    high: float
    count: int
    window: int
    model: str = ""

    def effect(self, kind: str) -> np.ndarray:
        """Average indirect effect, ``[6, n_layers]``."""
        return self.mean[kind] - self.low

    @property
    def total_effect(self) -> float:
        return self.high - self.low

    def plot(self, path, model_name: str | None = None):
        """ROME's line plot of the AIE per group over layers (.png/.pdf/.svg)."""
        from .plots import plot_aie
        return plot_aie(self, path, model_name=model_name)


def group_rows(scores: torch.Tensor, subject_range, target_position: int) -> list[np.ndarray]:
    """The six groups of rows of one grid (ROME's ``read_knowlege``), tokens
    counted up to the target position (the last token for decoders)."""
    s = np.asarray(scores, dtype=np.float64)
    first_e, first_a = subject_range
    last_e, last_a = first_a - 1, target_position
    pick = lambda a, b: s[a:b] if a < b else s[:0]
    after = first_a <= last_a
    return [s[first_e:first_e + 1], pick(first_e + 1, last_e), s[last_e:last_e + 1],
            s[first_a:first_a + 1] if after else s[:0], pick(first_a + 1, last_a) if after else s[:0],
            s[last_a:last_a + 1]]


def average_indirect_effect(results, kinds: Sequence[str] | None = None) -> AIE:
    """ROME's summary of many traces: a :func:`trace_corpus` directory, its
    :func:`load_corpus` list, or a list of :class:`TraceResult`. Skipped
    (wrong-prediction) records are left out."""
    if isinstance(results, (str, Path)):
        results = load_corpus(results)
    traces = [r["trace"] if isinstance(r, dict) else r for r in results]
    traces = [t for t in traces if t is not None]
    if not traces:
        raise InputError("no traced facts to average")
    kinds = tuple(kinds or traces[0].kinds)
    shapes = {t.n_layers for t in traces}
    if len(shapes) != 1:
        raise InputError(f"traces come from models with different layer counts: {sorted(shapes)}")
    mean, std = {}, {}
    for k in kinds:
        parts: list[list] = [[] for _ in GROUPS]
        for t in traces:
            if k not in t.scores:
                raise InputError(f"kind {k!r} missing from the trace of {t.prompt!r}")
            for g, rows in enumerate(group_rows(t.scores[k], t.subject_range, t.target_position)):
                parts[g].append(rows)
        N = traces[0].n_layers
        m = np.full((len(GROUPS), N), np.nan)
        sd = np.full((len(GROUPS), N), np.nan)
        for g, rows in enumerate(parts):
            allrows = np.concatenate(rows) if rows else np.zeros((0, N))
            if len(allrows):
                m[g], sd[g] = allrows.mean(0), allrows.std(0)
        mean[k], std[k] = m, sd
    return AIE(kinds=kinds, mean=mean, std=std, low=float(np.mean([t.low for t in traces])),
               high=float(np.mean([t.high for t in traces])), count=len(traces),
               window=traces[0].window, model=traces[0].model)
