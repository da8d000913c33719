"""Edit cases: the probes of an edit (:class:`Probe`), the case
(:class:`EditCase`), their JSON loader, and the builders from CounterFact,
zsRE and PARAREL records."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..lm import InputError

if TYPE_CHECKING:
    from .knowledge import EditKnowledge

KINDS = ("reliability", "generality", "locality", "symmetry", "synonymy")


# =============================================================================
# edit cases
# =============================================================================
@dataclass
class Probe:
    """One prompt checked after an edit: ``target`` is the answer wanted after
    the edit, ``foil`` (optional) the competing answer ROME compares against."""

    kind: str
    prompt: str
    target: str
    foil: str | None = None


@dataclass
class EditCase:
    """An edit (``subject``: ``prompt`` -> ``target_new`` instead of
    ``target_true``) and the probes that evaluate it."""

    case_id: object
    subject: str
    prompt: str
    target_new: str
    target_true: str | None
    relation: str | None = None
    probes: list = field(default_factory=list)
    source: str = ""

    @property
    def template(self) -> str:
        """The prompt with ``{}`` for the subject (ROME's request format)."""
        return self.prompt.replace(self.subject, "{}", 1)

    def request(self) -> dict:
        """ROME's request dict: ``{"prompt", "subject", "target_new": {"str"}, "target_true": {"str"}}``."""
        d = {"prompt": self.template, "subject": self.subject, "target_new": {"str": self.target_new}}
        if self.target_true is not None:
            d["target_true"] = {"str": self.target_true}
        return d

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "EditCase":
        """Read the :meth:`to_dict` layout (the custom-case JSON format)."""
        loc = f"{where}: " if where else ""
        for k in ("subject", "prompt", "target_new"):
            if not isinstance(d.get(k), str) or not d[k].strip():
                raise InputError(f"{loc}edit case needs a non-empty string {k!r}")
        if d["subject"] not in d["prompt"]:
            raise InputError(f"{loc}subject {d['subject']!r} is not in the prompt {d['prompt']!r}")
        probes = []
        for i, p in enumerate(d.get("probes") or []):
            if not isinstance(p, dict) or not all(isinstance(p.get(k), str) for k in ("kind", "prompt", "target")):
                raise InputError(f"{loc}probe {i} needs string fields kind, prompt and target")
            if p.get("foil") is not None and not isinstance(p["foil"], str):
                raise InputError(f"{loc}probe {i}: foil must be a string or null")
            probes.append(Probe(p["kind"], p["prompt"], p["target"], p.get("foil")))
        if not any(p.kind == "reliability" for p in probes):
            probes.insert(0, Probe("reliability", d["prompt"], d["target_new"], d.get("target_true")))
        return cls(d.get("case_id"), d["subject"], d["prompt"], d["target_new"], d.get("target_true"),
                   d.get("relation"), probes, d.get("source", where))


def load_edit_cases(path) -> list[EditCase]:
    """Read user edit cases: a JSON list of :meth:`EditCase.to_dict` objects
    (``subject``, ``prompt``, ``target_new``, ``target_true``, ``relation``,
    ``probes: [{"kind", "prompt", "target", "foil"}]``). A reliability probe
    is added when none is given."""
    from ..data import DataError, read_json_list

    p = Path(path)
    out = []
    for i, d in enumerate(read_json_list(p)):
        try:
            out.append(EditCase.from_dict(d, f"{p.name}[{i}]"))
        except InputError as e:
            raise DataError(p, f"record {i}", str(e).split(": ", 1)[-1]) from None
    return out



def _extra_probes(know: EditKnowledge | None, relation, subject, prompt, target_new, target_true):
    if know is None:
        return []
    return (know.symmetry_probes(relation, subject, target_new)
            + know.synonymy_probes(relation, subject, prompt, target_new, target_true))


def counterfact_case(rec, know: EditKnowledge | None = None) -> EditCase:
    """An :class:`EditCase` from a :class:`kncore.data.CounterFactRecord`:
    reliability (the rewrite prompt), generality (paraphrases), locality
    (neighbourhood prompts keep their answer; foil: the new target), and the
    symmetry and synonymy probes that ``know`` can build for its relation."""
    prompt = rec.rewrite_prompt
    probes = [Probe("reliability", prompt, rec.target_new, rec.target_true)]
    probes += [Probe("generality", q, rec.target_new, rec.target_true) for q in rec.paraphrase_prompts]
    probes += [Probe("locality", q, a, rec.target_new) for q, a in zip(rec.neighborhood_prompts,
                                                                      rec.neighborhood_targets)]
    probes += _extra_probes(know, rec.relation_id, rec.subject, prompt, rec.target_new, rec.target_true)
    return EditCase(rec.case_id, rec.subject, prompt, rec.target_new, rec.target_true, rec.relation_id, probes,
                    rec.source)


def zsre_case(rec, know: EditKnowledge | None = None) -> EditCase:
    """An :class:`EditCase` from a :class:`kncore.data.ZsreRecord`: the
    question -> ``alt`` (foil: the first true answer), its rephrasing, and the
    unrelated NQ question ``loc + "?"`` -> ``loc_ans`` (as ROME builds it)."""
    if rec.subject not in rec.src:
        raise InputError(f"{rec.source}: subject {rec.subject!r} is not in the question {rec.src!r}")
    probes = [Probe("reliability", rec.src, rec.alt, rec.answers[0]),
              Probe("generality", rec.rephrase, rec.alt, rec.answers[0]),
              Probe("locality", rec.loc + "?", rec.loc_ans)]
    probes += _extra_probes(know, None, rec.subject, rec.src, rec.alt, rec.answers[0])
    return EditCase(rec.index, rec.subject, rec.src, rec.alt, rec.answers[0], None, probes, rec.source)


def pararel_cases(relation: str, data_dir=None, *, know: EditKnowledge | None = None,
                  n_neighbours: int = 5, limit: int | None = None) -> list[EditCase]:
    """Edit cases from PARAREL facts of one relation (decoder templates).

    As Niu et al. build their symmetry/synonymy sets: fact i is edited to the
    object of the nearest earlier fact with a different object. The first
    template is the edited prompt, the others test generality, and the first
    prompt of the next ``n_neighbours`` facts (with other objects) tests
    locality.
    """
    from ..data.pararel import build_fact_bags, load_pararel_facts, load_pararel_patterns

    bags = build_fact_bags(load_pararel_patterns(relation, data_dir), load_pararel_facts(relation, data_dir)).bags
    if not bags:
        raise InputError(f"relation {relation} has no fact with a decoder template")
    cases = []
    for i, b in enumerate(bags):
        new = next((bags[j].object for j in range(i - 1, i - len(bags), -1) if bags[j].object != b.object), None)
        if new is None:
            continue
        probes = [Probe("reliability", b.prompts[0], new, b.object)]
        probes += [Probe("generality", q, new, b.object) for q in b.prompts[1:]]
        nb = [bags[(i + k) % len(bags)] for k in range(1, len(bags))]
        nb = [x for x in nb if x.object not in (b.object, new) and x.subject != b.subject][:n_neighbours]
        probes += [Probe("locality", x.prompts[0], x.object, new) for x in nb]
        probes += _extra_probes(know, relation, b.subject, b.prompts[0], new, b.object)
        cases.append(EditCase(b.uuid, b.subject, b.prompts[0], new, b.object, relation, probes,
                              f"pararel {relation} fact {b.uuid}"))
        if limit is not None and len(cases) >= limit:
            break
    return cases
