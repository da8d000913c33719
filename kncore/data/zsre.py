"""zsRE question answering edits in MEND's evaluation layout (as ROME and
EasyEdit use it): ``subject, src, pred, rephrase, alt, answers, loc, loc_ans,
cond``. ``src`` is the question, ``alt`` the new answer, ``answers`` the true
ones, ``loc``/``loc_ans`` an unrelated Natural Questions pair for locality."""
from __future__ import annotations

from dataclasses import dataclass

from ._io import json_list_fields, resolve

DEFAULT = "zsre/zsre_mend_eval_first5_sample.json"


@dataclass
class ZsreRecord:
    index: int
    subject: str
    src: str
    pred: str
    rephrase: str
    alt: str
    answers: list
    loc: str
    loc_ans: str
    cond: str = ""
    source: str = ""


def load_zsre(path=None, data_dir=None) -> list[ZsreRecord]:
    """Read a zsRE file (default: the 5-record sample in the shared data)."""
    return [_record(f) for f in json_list_fields(resolve(path, DEFAULT, data_dir))]


def _record(f) -> ZsreRecord:
    answers = f.strs("answers")
    if not answers:
        raise f.error("field 'answers' is empty")
    return ZsreRecord(f.n, f("subject"), f("src"), f("pred", optional=True, default=""), f("rephrase"), f("alt"),
                      answers, f("loc"), f("loc_ans"), f("cond", optional=True, default=""), f.source)
