"""CounterFact (Meng et al. 2022): counterfactual edit requests with
paraphrase, neighbourhood, attribute and generation prompts.

Two layouts load through :func:`load_counterfact`:

* ROME's JSON list (``counterfact.json``, ``multi_counterfact.json`` and the
  2,191-record split in the shared data): ``requested_rewrite{prompt`` with a
  ``{}`` for the subject, ``subject, relation_id, target_new{str,id},
  target_true{str,id}}``, ``paraphrase_prompts``, ``neighborhood_prompts``,
  ``attribute_prompts``, ``generation_prompts``;
* EasyEdit's flattened records (``counterfact-edit.json``):
  ``{"subject", "prompt", "target_new", "ground_truth", "rephrase_prompt",
  "locality_prompt", "locality_ground_truth", "case_id"?}`` where ``prompt``
  is the full prompt (the subject filled in) and the rephrase and locality
  fields are a string or a list of strings.
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from pathlib import Path

from ._io import DataError, field, read_json_list, resolve, str_list

DEFAULT = "counterfact/counterfact_azhx_test_split.json"


@dataclass
class CounterFactRecord:
    """One edit request. ``prompt`` is a template with ``{}`` for the subject;
    ``neighborhood_targets[i]`` is the answer that ``neighborhood_prompts[i]``
    should keep (ROME's files: the true target of every neighbour)."""

    case_id: int | None
    subject: str
    prompt: str
    relation_id: str | None
    target_new: str
    target_true: str
    paraphrase_prompts: list
    neighborhood_prompts: list
    neighborhood_targets: list
    attribute_prompts: list = dc_field(default_factory=list)
    generation_prompts: list = dc_field(default_factory=list)
    target_new_id: str | None = None
    target_true_id: str | None = None
    pararel_idx: int | None = None
    source: str = ""

    @property
    def rewrite_prompt(self) -> str:
        """The edited prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)


def load_counterfact(path=None, data_dir=None) -> list[CounterFactRecord]:
    """Read a CounterFact file in ROME's or EasyEdit's layout (detected per
    record). Default: the 2,191-record split under the shared data folder."""
    p = resolve(path, DEFAULT, data_dir)
    return [_record(r, p, i) for i, r in enumerate(read_json_list(p))]


def _record(r: dict, p: Path, i: int) -> CounterFactRecord:
    w = f"record {i}"
    src = f"{p.name}[{i}]"
    if "requested_rewrite" in r:
        rw = field(r, "requested_rewrite", dict, p, w)
        tn, tt = field(rw, "target_new", dict, p, w), field(rw, "target_true", dict, p, w)
        prompt = field(rw, "prompt", str, p, w)
        if "{}" not in prompt:
            raise DataError(p, w, f"requested_rewrite.prompt has no '{{}}' for the subject: {prompt!r}")
        true = field(tt, "str", str, p, w + " target_true")
        neigh = str_list(r, "neighborhood_prompts", p, w)
        return CounterFactRecord(
            case_id=field(r, "case_id", int, p, w, optional=True), subject=field(rw, "subject", str, p, w),
            prompt=prompt, relation_id=field(rw, "relation_id", str, p, w, optional=True),
            target_new=field(tn, "str", str, p, w + " target_new"), target_true=true,
            paraphrase_prompts=str_list(r, "paraphrase_prompts", p, w), neighborhood_prompts=neigh,
            neighborhood_targets=[true] * len(neigh),
            attribute_prompts=str_list(r, "attribute_prompts", p, w, optional=True),
            generation_prompts=str_list(r, "generation_prompts", p, w, optional=True),
            target_new_id=field(tn, "id", str, p, w, optional=True),
            target_true_id=field(tt, "id", str, p, w, optional=True),
            pararel_idx=field(r, "pararel_idx", int, p, w, optional=True), source=src)
    if "target_new" in r and "ground_truth" in r:
        subject = field(r, "subject", str, p, w)
        full = field(r, "prompt", str, p, w)
        if subject not in full:
            raise DataError(p, w, f"subject {subject!r} is not in the prompt {full!r}")
        tn = r["target_new"]
        gt = r["ground_truth"]
        tn = tn.get("str") if isinstance(tn, dict) else tn
        gt = gt.get("str") if isinstance(gt, dict) else gt
        if isinstance(gt, list) and gt and isinstance(gt[0], str):
            gt = gt[0]
        for k, v in (("target_new", tn), ("ground_truth", gt)):
            if not isinstance(v, str):
                raise DataError(p, w, f"field {k!r} should be a string, got {v!r:.60}")
        loc = str_list(r, "locality_prompt", p, w, optional=True)
        loc_gt = str_list(r, "locality_ground_truth", p, w, optional=True)
        if len(loc_gt) == 1 and len(loc) > 1:
            loc_gt = loc_gt * len(loc)
        if len(loc) != len(loc_gt):
            raise DataError(p, w, f"{len(loc)} locality prompts but {len(loc_gt)} locality answers")
        return CounterFactRecord(
            case_id=field(r, "case_id", int, p, w, optional=True), subject=subject,
            prompt=full.replace(subject, "{}", 1), relation_id=field(r, "relation_id", str, p, w, optional=True),
            target_new=tn, target_true=gt, paraphrase_prompts=str_list(r, "rephrase_prompt", p, w, optional=True),
            neighborhood_prompts=loc, neighborhood_targets=loc_gt, source=src)
    raise DataError(p, w, "neither ROME's layout (requested_rewrite) nor EasyEdit's (prompt, target_new, "
                          "ground_truth)")
