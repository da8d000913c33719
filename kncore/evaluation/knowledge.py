"""The knowledge tables behind the symmetry and synonymy probes: symmetric
relations and their reverse templates, synonym rules, and the facts that
answer a reverse question (:class:`EditKnowledge`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .cases import Probe


# -- symmetric relations and synonyms -------------------------------------------
# Relations whose reverse is a relation in PARAREL: r(s, o) <=> partner(o, s).
SYMMETRIC_RELATIONS = {"P36": "P1376", "P1376": "P36", "P47": "P47", "P530": "P530", "P190": "P190"}
# Decoder templates of each relation with {} for the subject; PARAREL's own
# templates replace these when the data is present.
REVERSE_TEMPLATES = {"P36": ["The capital of {} is"], "P1376": ["{} is the capital of"],
                     "P47": ["{} shares border with"], "P530": ["{} maintains diplomatic relations with"],
                     "P190": ["{} is a twin city of"]}


@dataclass
class SynonymRule:
    """Synonyms for some relations (``"*"``: any).

    ``terms[word]`` lists words that say the same. With ``templates`` (``{}``
    for the subject) the synonym is the answer to those prompts: an edit to
    ``physics`` must make "{} is a famous" -> ``physicist`` (Niu et al.'s P101
    test). Without, the edit's own prompt is asked for a synonym of the new
    object, and a synonym of the subject in the prompt must still give the
    new object.
    """

    relations: list
    terms: dict
    templates: list | None = None

    def applies(self, relation) -> bool:
        return "*" in self.relations or relation in self.relations


BUILTIN_SYNONYMS = [
    # Niu et al.'s synonymy test: a field of work and the occupation it names.
    SynonymRule(["P101"], {
        "physics": ["physicist"], "mathematics": ["mathematician"], "astronomy": ["astronomer"],
        "chemistry": ["chemist"], "physiology": ["physiologist"], "psychology": ["psychologist"],
        "medicine": ["physician"], "geometry": ["geometer"], "sociology": ["sociologist"],
        "anatomy": ["anatomist"], "anthropology": ["anthropologist"], "philosophy": ["philosopher"],
        "theology": ["theologian"], "history": ["historian"], "biology": ["biologist"],
        "geography": ["geographer"], "economics": ["economist"], "logic": ["logician"],
        "photography": ["photographer"], "ecology": ["ecologist"], "linguistics": ["linguist"],
        "botany": ["botanist"], "zoology": ["zoologist"], "music": ["musician"], "surgery": ["surgeon"],
        "pharmacy": ["pharmacist"], "architecture": ["architect"], "sculpture": ["sculptor"],
        "painting": ["painter"], "poetry": ["poet"], "law": ["lawyer"], "politics": ["politician"]},
        ["{} is a famous"]),
    SynonymRule(["P101"], {"physics": ["physical science"], "mathematics": ["maths"],
                           "medicine": ["medical science"], "biology": ["life science"]}),
    SynonymRule(["P37", "P103", "P1412", "P364", "P407"], {"Persian": ["Farsi"], "Farsi": ["Persian"]}),
    SynonymRule(["*"], {"United States of America": ["USA", "United States"], "United Kingdom": ["UK", "Britain"],
                        "Netherlands": ["Holland"], "Czech Republic": ["Czechia"],
                        "Soviet Union": ["USSR"], "Myanmar": ["Burma"]}),
]


@dataclass
class EditKnowledge:
    """What the symmetry and synonymy probes are built from."""

    symmetric: dict = field(default_factory=lambda: dict(SYMMETRIC_RELATIONS))
    reverse_templates: dict = field(default_factory=lambda: {k: list(v) for k, v in REVERSE_TEMPLATES.items()})
    synonyms: list = field(default_factory=lambda: list(BUILTIN_SYNONYMS))
    # relation -> {subject: [objects]} and relation -> {object: [subjects]}: foils for symmetry probes
    facts: dict = field(default_factory=dict)
    inverse: dict = field(default_factory=dict)

    def add_json(self, path) -> "EditKnowledge":
        """Merge a user file: ``{"symmetric_relations": {"P36": "P1376"},
        "reverse_templates": {"P1376": ["{} is the capital of"]},
        "synonyms": [{"relations": ["P101"], "terms": {"physics": ["physicist"]},
        "templates": ["{} is a famous"]}]}`` (every key optional)."""
        from ..data import DataError

        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(p, f"line {e.lineno}", f"invalid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise DataError(p, None, "expected a JSON object")
        unknown = set(d) - {"symmetric_relations", "reverse_templates", "synonyms"}
        if unknown:
            raise DataError(p, None, f"unknown keys {sorted(unknown)}")
        sym = d.get("symmetric_relations", {})
        if not isinstance(sym, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sym.items()):
            raise DataError(p, "symmetric_relations", "expected {relation: partner relation}")
        for k, v in sym.items():
            self.symmetric[k] = v
            self.symmetric.setdefault(v, k)
        rt = d.get("reverse_templates", {})
        if not isinstance(rt, dict):
            raise DataError(p, "reverse_templates", "expected {relation: [templates]}")
        for k, v in rt.items():
            if not isinstance(v, list) or not all(isinstance(t, str) and "{}" in t for t in v):
                raise DataError(p, f"reverse_templates.{k}", "expected a list of templates containing '{}'")
            self.reverse_templates[k] = list(v)
        rules = d.get("synonyms", [])
        if not isinstance(rules, list):
            raise DataError(p, "synonyms", "expected a list of rules")
        for i, r in enumerate(rules):
            ok = (isinstance(r, dict) and isinstance(r.get("relations", ["*"]), list)
                  and isinstance(r.get("terms"), dict)
                  and all(isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v)
                          for k, v in r["terms"].items())
                  and (r.get("templates") is None or (isinstance(r["templates"], list)
                                                      and all(isinstance(t, str) and "{}" in t
                                                              for t in r["templates"]))))
            if not ok:
                raise DataError(p, f"synonyms[{i}]", "expected {relations: [..], terms: {word: [synonyms]}, "
                                                     "templates: [.. with '{}'] or null}")
            self.synonyms.append(SynonymRule(list(r.get("relations", ["*"])), dict(r["terms"]), r.get("templates")))
        return self

    def add_facts(self, relation: str, pairs: Iterable[tuple[str, str]]) -> None:
        f = self.facts.setdefault(relation, {})
        inv = self.inverse.setdefault(relation, {})
        for s, o in pairs:
            f.setdefault(s, []).append(o)
            inv.setdefault(o, []).append(s)

    def symmetry_probes(self, relation, subject: str, target_new: str) -> list[Probe]:
        """After ``relation(subject) := target_new``: the reverse prompts about
        ``target_new`` must give ``subject``. The foil is what the reverse
        prompt answered before, when the facts know it."""
        partner = self.symmetric.get(relation)
        if partner is None:
            return []
        known = self.facts.get(partner, {}).get(target_new, []) + self.inverse.get(relation, {}).get(target_new, [])
        foil = next((o for o in known if o != subject), None)
        return [Probe("symmetry", t.replace("{}", target_new), subject, foil)
                for t in self.reverse_templates.get(partner, [])]

    def synonymy_probes(self, relation, subject: str, prompt: str, target_new: str,
                        target_true: str | None) -> list[Probe]:
        """Synonym probes of an edit (see :class:`SynonymRule`)."""
        out = []
        for rule in self.synonyms:
            if not rule.applies(relation):
                continue
            if target_new in rule.terms:
                foil = (rule.terms.get(target_true) or [None])[0] if target_true else None
                asks = [t.replace("{}", subject) for t in rule.templates] if rule.templates else [prompt]
                out += [Probe("synonymy", q, syn, foil) for q in asks for syn in rule.terms[target_new]]
            if rule.templates is None and subject in rule.terms:
                out += [Probe("synonymy", prompt.replace(subject, syn, 1), target_new, target_true)
                        for syn in rule.terms[subject]]
        return out


def edit_knowledge(data_dir=None, *, extra=None) -> EditKnowledge:
    """The built-in symmetric relations and synonyms, with PARAREL's reverse
    templates and facts when the data folder has them, and a user JSON file
    (``extra``, see :meth:`EditKnowledge.add_json`) merged in."""
    from ..data import default_data_dir
    from ..data.pararel import load_pararel_facts, load_pararel_patterns, template_prompt

    k = EditKnowledge()
    root = Path(data_dir if data_dir is not None else default_data_dir()) / "pararel"
    for rel in sorted(set(k.symmetric) | set(k.symmetric.values())):
        pat = root / "patterns" / f"{rel}.jsonl"
        if pat.exists():
            tpls = [template_prompt(p.pattern, "{}") for p in load_pararel_patterns(rel, path=pat)]
            tpls = list(dict.fromkeys(t for t in tpls if t))
            if tpls:
                k.reverse_templates[rel] = tpls
        fac = root / "facts" / f"{rel}.jsonl"
        if fac.exists():
            k.add_facts(rel, [(f.subject, f.object) for f in load_pararel_facts(rel, path=fac)])
    if extra is not None:
        k.add_json(extra)
    return k
