"""What the experiments share: tasks and their facts, run directories, and
the tables and figures written into them."""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..lm import LM, InputError

# Figures of Niu et al. (ICLR 2024) that the experiments print beside their own
# (reference points for another model, not targets): KN = mean knowledge
# neurons per fact, tau = mean final sharing threshold p, R1^2 = the n-sample
# similarity of the attribution vectors. The PARAREL P101 figures are the ones
# the issue quotes ("P101: 0.167, 0.515 and 0.399").
PAPER_REFERENCE = {
    "blimp:determiner_noun_agreement_2": {"kn": 1.86, "tau": 0.62, "r1_sq": 0.56},
    "pararel:P101": {"kn": 0.167, "tau": 0.515, "r1_sq": 0.399},
}
# The paper's minimal-pair accuracy of determiner_noun_agreement_2 before and
# after suppressing the knowledge neurons.
PAPER_ACCURACY = {"blimp:determiner_noun_agreement_2": {"before": 1.0, "after_suppress": 0.948}}

DETERMINERS = ("this", "that", "these", "those")
PROMPT_STYLES = ("paper", "blimp")
GROUPS = ("class", "target")


# -- tasks ------------------------------------------------------------------------------
def parse_task(task: str) -> tuple[str, str]:
    """``"blimp:<paradigm>"`` or ``"pararel:<relation>"`` -> (source, name).

    A bare relation id (``"P101"``) means PARAREL.
    """
    if not isinstance(task, str) or not task.strip():
        raise InputError(f"a task is a string such as 'blimp:determiner_noun_agreement_2' or 'pararel:P101', "
                         f"got {task!r}")
    t = task.strip()
    if re.fullmatch(r"P\d+", t):
        return "pararel", t
    src, sep, name = t.partition(":")
    if not sep or src not in ("blimp", "pararel") or not name:
        raise InputError(f"unknown task {task!r}: use 'blimp:<paradigm>' (e.g. blimp:determiner_noun_agreement_2) "
                         f"or 'pararel:<relation>' (e.g. pararel:P101)")
    return src, name


def task_name(task: str) -> str:
    """The canonical spelling of a task (``"P36"`` -> ``"pararel:P36"``)."""
    src, name = parse_task(task)
    return f"{src}:{name}"


def task_list(task) -> list[str]:
    """One task or several (a list, or a comma-separated string), canonical and distinct."""
    items = task.split(",") if isinstance(task, str) else list(task)
    out = list(dict.fromkeys(task_name(t) for t in items if not isinstance(t, str) or t.strip()))
    if not out:
        raise InputError("no task given")
    return out


@dataclass
class Fact:
    """What the knowledge-neuron method localises: several prompts (the
    paraphrases) of one piece of knowledge, each with its target.

    PARAREL: one fact filled into every usable template of its relation.
    BLiMP: one class of a paradigm (e.g. the pairs whose good determiner is
    plural), each pair's good prompt and target a "paraphrase", as Niu et
    al.'s ``search_kns`` does.
    """

    task: str
    key: str
    label: str
    kind: str                    # "syntactic" or "factual"
    prompts: list
    targets: list
    meta: dict = field(default_factory=dict)

    @property
    def target(self) -> str:
        ts = list(dict.fromkeys(t.strip() for t in self.targets))
        return ts[0] if len(ts) == 1 else "/".join(ts[:4]) + ("/..." if len(ts) > 4 else "")


def blimp_pair_prompts(lm: LM, paradigm: str, *, style: str = "paper", data_dir=None):
    """BLiMP prompts of one paradigm (a :class:`kncore.data.BlimpPrompts`).

    ``style="paper"``: as Niu et al.'s code (``_mask_difference_decoder``): for
    a decoder the prompt is the good sentence before the one token where the
    two sentences differ, and the two tokens are the targets, whatever BLiMP's
    method flags say (determiner_noun_agreement_2: "Some dog stunned" ->
    this / these); for a masked LM that token is masked. ``style="blimp"``:
    BLiMP's own one-/two-prefix method (:func:`kncore.data.build_blimp_prompts`;
    determiner_noun_agreement_2: "Some dog stunned this" -> committee).
    """
    from ..data import build_blimp_prompts, load_blimp

    if style not in PROMPT_STYLES:
        raise InputError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    pairs = load_blimp(paradigm, data_dir)
    return build_blimp_prompts(lm, pairs, method="flags" if style == "blimp" else "token_diff")


def task_facts(lm: LM, task: str, *, limit: int | None = None, prompt_style: str = "paper", group_by: str = "class",
               data_dir=None) -> tuple[list[Fact], dict]:
    """The facts of a task and an account of what was dropped.

    ``limit``: BLiMP, the first ``limit`` pairs of each class (Niu et al.
    take 100); PARAREL, the first ``limit`` facts of the relation whose object
    is one token. ``group_by`` (BLiMP): ``"class"`` (:func:`kncore.data.pair_class`,
    the paper's sg/pl, f/m/i...) or ``"target"`` (one fact per good target token).
    """
    from ..data import pararel_bags, single_token_bags

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive integer or None, got {limit!r}")
    if group_by not in GROUPS:
        raise InputError(f"group_by must be one of {GROUPS}, got {group_by!r}")
    task = task_name(task)
    src, name = parse_task(task)
    if src == "blimp":
        prompts = blimp_pair_prompts(lm, name, style=prompt_style, data_dir=data_dir)
        groups: dict = {}
        for it in prompts:
            groups.setdefault(it.cls if group_by == "class" else it.target_good.strip(), []).append(it)
        facts = []
        for label, items in sorted(groups.items()):
            items = items[:limit] if limit is not None else items
            facts.append(Fact(task, f"{task}/{label}", label, "syntactic", [x.prompt_good for x in items],
                              [x.target_good for x in items], {"pair_ids": [x.pair_id for x in items]}))
        info = {"total": prompts.total, "kept": len(prompts), "dropped": dict(prompts.dropped)}
    else:
        mask = lm.tokenizer.mask_token or "[MASK]"
        bags = single_token_bags(lm, pararel_bags(name, data_dir, mlm=lm.is_mlm, mask_token=mask))
        kept = bags.bags[:limit] if limit is not None else bags.bags
        facts = [Fact(task, f"{task}/{b.uuid}", b.subject, "factual", list(b.prompts), [b.object] * len(b.prompts),
                      {"subject": b.subject, "object": b.object}) for b in kept]
        info = {"total": len(bags) + sum(bags.dropped_bags.values()), "kept": len(bags),
                "dropped": dict(bags.dropped_bags), "dropped_templates": dict(bags.dropped_templates)}
    if not facts:
        raise InputError(f"task {task} has no usable facts for this model ({info['dropped'] or 'none found'})")
    return facts, info


# -- run directories ----------------------------------------------------------------------
def open_run(out, config: dict, lm: LM, command: str):
    """(RunDir, whether we opened it): ``out`` is a path (opened or resumed
    with ``config``) or an open :class:`kncore.rundir.RunDir` (used as is)."""
    from ..rundir import RunDir

    if isinstance(out, RunDir):
        return out, False
    if out is None:
        raise InputError("give an output directory (out=)")
    return RunDir.open(Path(out), config, lm, command=command), True


def uniform(rows: Sequence[dict]) -> list[dict]:
    """Rows with the same keys (missing ones None), so a Parquet table keeps
    every column (pyarrow infers a schema from the first row only)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of rows (floats to 4 significant digits)."""
    rows = list(rows)
    cols = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_result(rd, name: str, rows: Sequence[dict], *, columns: Sequence[str] | None = None,
                 title: str | None = None, notes: Iterable[str] = ()) -> Path:
    """Write ``results/<name>.csv`` and ``results/<name>.md`` into the run
    directory (each atomically); returns the markdown path."""
    from ..rundir import atomic_write_text

    rows = list(rows)
    cols = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    d = Path(rd.path) / "results"
    atomic_write_text(d / f"{name}.csv", buf.getvalue())
    md = (f"## {title}\n\n" if title else "") + markdown_table(rows, cols)
    notes = list(notes)
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    atomic_write_text(d / f"{name}.md", md)
    return d / f"{name}.md"


def run_items_closing(rd, items, work, *, table: str, chunk: int, bar, count_keys: bool = False) -> int:
    """:func:`kncore.rundir.run_items`, then close ``bar`` (a tqdm bar or None)
    however it ends; ``count_keys``: the bar advances by the keys each commit
    finishes (else ``work`` updates it itself)."""
    from ..rundir import run_items

    progress = (lambda keys: bar.update(len(keys))) if count_keys and bar is not None else None
    try:
        return run_items(rd, items, work, table=table, chunk=chunk, progress=progress)
    finally:
        if bar is not None:
            bar.close()


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "item"):
    """A tqdm bar (None when disabled or nothing to do)."""
    if not enabled or not total:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


def safe_name(s: str) -> str:
    """A file-name-safe version of a label."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_.") or "x"
