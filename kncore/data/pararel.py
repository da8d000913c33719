"""PARAREL (Elazar et al. 2021): paraphrased relation templates and LAMA
T-REx facts, built into *fact bags*: one fact filled into every paraphrase of
its relation (the unit the knowledge-neuron method attributes over).

A template has an ``[X]`` (subject) and a ``[Y]`` (object) slot. For a
decoder the object must be the next token, so only templates that end in
``[Y]`` (optionally followed by a period, which is stripped) are kept, and the
others are counted as dropped. For a masked LM ``[Y]`` becomes the mask token
and every template is kept.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import InputError
from ._io import DataError, ItemsView, default_data_dir, jsonl_fields


@dataclass
class PararelPattern:
    relation: str
    pattern: str
    lemma: str
    extended_lemma: str
    tense: str
    source: str = ""


@dataclass
class PararelFact:
    relation: str
    subject: str
    object: str
    uuid: str
    source: str = ""


@dataclass
class FactBag:
    """One fact and its prompts, one per usable template (duplicates removed)."""

    relation: str
    uuid: str
    subject: str
    object: str
    prompts: list
    patterns: list


@dataclass
class FactBags(ItemsView):
    """Fact bags, with the templates dropped (per reason) and, after
    :func:`single_token_bags`, the bags dropped (per reason)."""

    bags: list
    dropped_templates: Counter = dc_field(default_factory=Counter)
    dropped_bags: Counter = dc_field(default_factory=Counter)
    n_templates: int = 0
    ITEMS = "bags"


def _dir(data_dir) -> Path:
    return Path(data_dir if data_dir is not None else default_data_dir()) / "pararel"


def pararel_relations(data_dir=None) -> list[str]:
    """Relations that have both a pattern file and a fact file, sorted by number."""
    d = _dir(data_dir)
    if not (d / "patterns").is_dir() or not (d / "facts").is_dir():
        raise DataError(d, None, "no PARAREL patterns/ and facts/ folders here (set KNCORE_DATA or pass data_dir=)")
    pats = {p.stem for p in (d / "patterns").glob("*.jsonl")}
    facts = {p.stem for p in (d / "facts").glob("*.jsonl")}
    return sorted(pats & facts, key=lambda r: (len(r), r))


def _file(kind, relation, data_dir, path) -> Path:
    p = Path(path) if path is not None else _dir(data_dir) / kind / f"{relation}.jsonl"
    if not p.exists():
        raise DataError(p, None, f"no PARAREL {kind} file for relation {relation!r}")
    return p


def load_pararel_patterns(relation: str, data_dir=None, *, path=None) -> list[PararelPattern]:
    """The paraphrased templates of one relation (``"P36"``)."""
    out = []
    for f in jsonl_fields(_file("patterns", relation, data_dir, path)):
        pat = f("pattern")
        if pat.count("[X]") != 1 or pat.count("[Y]") != 1:
            raise f.error(f"pattern needs exactly one [X] and one [Y]: {pat!r}")
        out.append(PararelPattern(relation, pat, f("lemma", optional=True, default=""),
                                  f("extended_lemma", optional=True, default=""),
                                  f("tense", optional=True, default=""), f.source))
    return out


def load_pararel_facts(relation: str, data_dir=None, *, path=None) -> list[PararelFact]:
    """The facts (subject, object) of one relation."""
    return [PararelFact(relation, f("sub_label"), f("obj_label"),
                        f("uuid", optional=True, default=f"{relation}-{f.n}"), f.source)
            for f in jsonl_fields(_file("facts", relation, data_dir, path))]


def template_prompt(pattern: str, subject: str, *, mlm: bool = False, mask_token: str = "[MASK]") -> str | None:
    """The prompt for ``subject`` from one template, or None if a decoder cannot
    use the template (``[Y]`` is not at its end).

    Decoder: ``"The capital of [X] is [Y] ."`` -> ``"The capital of Canada is"``.
    Masked LM: ``[Y]`` -> ``mask_token``, the rest unchanged.
    """
    if mlm:
        return pattern.replace("[X]", subject).replace("[Y]", mask_token).strip()
    t = pattern.strip()
    if t.endswith("."):
        t = t[:-1].rstrip()
    if not t.endswith("[Y]"):
        return None
    head = t[: -len("[Y]")].rstrip()
    return head.replace("[X]", subject)


def build_fact_bags(patterns: Sequence[PararelPattern], facts: Iterable[PararelFact], *, mlm: bool = False,
                    mask_token: str = "[MASK]") -> FactBags:
    """Fill each fact into every usable template of its relation."""
    usable: dict[str, list[str]] = {}
    dropped = Counter()
    for p in patterns:
        if template_prompt(p.pattern, "x", mlm=mlm, mask_token=mask_token) is None:
            dropped["[Y] is not at the end of the template"] += 1
            continue
        usable.setdefault(p.relation, []).append(p.pattern)
    bags = []
    for f in facts:
        pats = usable.get(f.relation, [])
        prompts, kept = [], []
        for pat in pats:
            q = template_prompt(pat, f.subject, mlm=mlm, mask_token=mask_token)
            if q not in prompts:
                prompts.append(q)
                kept.append(pat)
        if prompts:
            bags.append(FactBag(f.relation, f.uuid, f.subject, f.object, prompts, kept))
    return FactBags(bags, dropped, Counter(), len(patterns))


def pararel_bags(relations: Sequence[str] | str | None = None, data_dir=None, *, mlm: bool = False,
                 mask_token: str = "[MASK]") -> FactBags:
    """Fact bags for some relations (default: every relation with patterns)."""
    if isinstance(relations, str):
        relations = [relations]
    rels = pararel_relations(data_dir) if relations is None else list(relations)
    pats, facts = [], []
    for r in rels:
        pats += load_pararel_patterns(r, data_dir)
        facts += load_pararel_facts(r, data_dir)
    return build_fact_bags(pats, facts, mlm=mlm, mask_token=mask_token)


def single_token_bags(lm, bags: FactBags | Sequence[FactBag]) -> FactBags:
    """Keep the bags whose object is one token of ``lm`` in every prompt (what
    the knowledge-neuron attribution needs); the others are counted by reason."""
    src = bags if isinstance(bags, FactBags) else FactBags(list(bags))
    keep, dropped = [], Counter(src.dropped_bags)
    for b in src.bags:
        try:
            ids = {tuple(lm.target_ids(q, b.object)) for q in b.prompts}
        except InputError:
            dropped["the tokenizer rejected a prompt or the object"] += 1
            continue
        if any(len(t) != 1 for t in ids):
            dropped["object is more than one token"] += 1
        elif len(ids) != 1:
            dropped["object tokenises differently across prompts"] += 1
        else:
            keep.append(b)
    return FactBags(keep, Counter(src.dropped_templates), dropped, src.n_templates)
