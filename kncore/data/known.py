"""ROME's ``known_1000.json``: facts the model knows, used for causal tracing.
(Despite the name, the file holds 1,209 records.)"""
from __future__ import annotations

from dataclasses import dataclass

from ._io import json_list_fields, resolve

DEFAULT = "known/known_1000.json"


@dataclass
class KnownFact:
    known_id: int
    subject: str
    attribute: str
    template: str
    prediction: str
    prompt: str
    relation_id: str
    source: str = ""


def load_known(path=None, data_dir=None) -> list[KnownFact]:
    """Read ``known_1000.json`` (or a file in its layout)."""
    p = resolve(path, DEFAULT, data_dir)
    out = []
    for f in json_list_fields(p):
        rec = KnownFact(f("known_id", int), f("subject"), f("attribute"), f("template", optional=True, default=""),
                        f("prediction", optional=True, default=""), f("prompt"),
                        f("relation_id", optional=True, default=""), f.source)
        if rec.subject not in rec.prompt:
            raise f.error(f"subject {rec.subject!r} is not in the prompt {rec.prompt!r}")
        out.append(rec)
    return out
