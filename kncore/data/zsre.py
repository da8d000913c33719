"""zsRE question answering edits in MEND's evaluation layout (as ROME and
EasyEdit use it): ``subject, src, pred, rephrase, alt, answers, loc, loc_ans,
cond``. ``src`` is the question, ``alt`` the new answer, ``answers`` the true
ones, ``loc``/``loc_ans`` an unrelated Natural Questions pair for locality."""
from __future__ import annotations

from dataclasses import dataclass

from ._io import DataError, field, read_json_list, resolve, str_list

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
    p = resolve(path, DEFAULT, data_dir)
    out = []
    for i, r in enumerate(read_json_list(p)):
        w = f"record {i}"
        f = lambda k, **kw: field(r, k, str, p, w, **kw)  # noqa: E731
        answers = str_list(r, "answers", p, w)
        if not answers:
            raise DataError(p, w, "field 'answers' is empty")
        out.append(ZsreRecord(i, f("subject"), f("src"), f("pred", optional=True, default=""), f("rephrase"),
                              f("alt"), answers, f("loc"), f("loc_ans"), f("cond", optional=True, default=""),
                              f"{p.name}[{i}]"))
    return out
