"""ROME's ``known_1000.json``: facts the model knows, used for causal tracing.
(Despite the name, the file holds 1,209 records.)"""
from __future__ import annotations

from dataclasses import dataclass

from ._io import DataError, field, read_json_list, resolve

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
    for i, r in enumerate(read_json_list(p)):
        w = f"record {i}"
        f = lambda k, t=str, **kw: field(r, k, t, p, w, **kw)  # noqa: E731
        rec = KnownFact(f("known_id", int), f("subject"), f("attribute"), f("template", optional=True, default=""),
                        f("prediction", optional=True, default=""), f("prompt"),
                        f("relation_id", optional=True, default=""), f"{p.name}[{i}]")
        if rec.subject not in rec.prompt:
            raise DataError(p, w, f"subject {rec.subject!r} is not in the prompt {rec.prompt!r}")
        out.append(rec)
    return out
