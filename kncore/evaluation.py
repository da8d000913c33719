"""Measurements of the paper: minimal-pair accuracy, probability changes under
a knowledge-neuron edit, and the evaluation of an edit (ROME or KN).

Everything is built on one batched scorer, :func:`score_targets`: for each
(prompt, target) it returns the target's token log-probabilities and the
model's greedy token at each target position, teacher-forced (the prompt
followed by the gold target tokens), from one forward per batch of distinct
token sequences. The head is applied only at the scored positions.

Tables are plain lists of dicts (one row per pair, prompt or edit case), so
the experiment runners can write them to JSON or Parquet as they are.

Edits plug in as context managers: ``apply_edit`` is a zero-argument
callable returning one (``lambda: kncore.patch_neurons(lm, kns)``, a ROME
edit context) or a context manager object. Whatever changes the model inside
the ``with`` (weights, ``patch_neurons``' runtime patches) is seen by the
runtime; if the context yields a list of :class:`~kncore.runtime.Patch`, they
are applied to every forward too.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .lm import LM, InputError
from .runtime import Patch

KINDS = ("reliability", "generality", "locality", "symmetry", "synonymy")


# =============================================================================
# scoring
# =============================================================================
@dataclass
class TargetScore:
    """A target's teacher-forced score after a prompt.

    ``logprobs[i]`` is log P(ids[i] | prompt, ids[:i]); ``argmax[i]`` is the
    model's top token at that position.
    """

    prompt: str
    target: str
    ids: list
    logprobs: list
    argmax: list

    @property
    def logprob(self) -> float:
        """log P(target) (sum over its tokens)."""
        return float(sum(self.logprobs))

    @property
    def prob(self) -> float:
        """P(target): the product of its token probabilities."""
        return math.exp(self.logprob)

    @property
    def mean_prob(self) -> float:
        """exp(mean token log-prob): ROME's per-token probability, which its
        CounterFact metrics compare (equal to ``prob`` for one token)."""
        return math.exp(self.logprob / len(self.logprobs))

    @property
    def acc(self) -> float:
        """Teacher-forced token accuracy (EasyEdit): the fraction of target
        tokens that are the model's top prediction."""
        return sum(int(a == t) for a, t in zip(self.argmax, self.ids)) / len(self.ids)


def _check_patches(patches) -> list:
    patches = list(patches or ())
    for p in patches:
        if not isinstance(p, Patch):
            raise InputError(f"patches must be kncore.Patch objects, got {type(p).__name__}")
        if p.rows is not None:
            raise InputError("patches with rows= cannot be used here: rows are regrouped into batches; "
                             "give patches that apply to every row")
    return patches


def _request(lm: LM, prompt: str, target: str):
    """(sequence, scored positions, target ids) of one (prompt, target)."""
    tids = lm.target_ids(prompt, target)
    ids = lm.tokenize(prompt)
    if lm.is_mlm:
        m = lm.mask_position(ids, prompt)
        seq = ids[:m] + [lm.tokenizer.mask_token_id] * len(tids) + ids[m + 1:]
        pos = list(range(m, m + len(tids)))
    else:
        seq = ids + tids[:-1]
        pos = list(range(len(ids) - 1, len(ids) - 1 + len(tids)))
    if len(seq) > lm.adapter.n_ctx:
        raise InputError(f"prompt and target are {len(seq)} tokens, more than the model's context of "
                         f"{lm.adapter.n_ctx}: {prompt[:60]!r}")
    return tuple(seq), pos, tids


@torch.no_grad()
def _score_seqs(lm: LM, reqs: list, patches, batch_size: int):
    """[(log-probs, argmax ids)] for requests (seq, positions, target ids).

    Identical sequences run once (a single-token target only needs its
    prompt, so every candidate answer to one prompt shares a row). Only the
    numbers asked for are kept from each batch, so memory does not grow with
    the number of requests.
    """
    rows: dict = {}   # seq -> row
    users: dict = {}  # row -> request indices
    for k, (seq, _, _) in enumerate(reqs):
        users.setdefault(rows.setdefault(seq, len(rows)), []).append(k)
    seqs = list(rows)
    order = sorted(range(len(seqs)), key=lambda r: len(seqs[r]))
    res: list = [None] * len(reqs)
    for s in range(0, len(order), batch_size):
        chunk = order[s: s + batch_size]
        b = lm.batch_ids([list(seqs[r]) for r in chunk])
        out = lm.run(b.input_ids, attention_mask=b.attention_mask, logits=None, patches=patches)
        col: dict = {}  # (batch row, position) -> index into the scored positions
        for i, r in enumerate(chunk):
            for k in users[r]:
                for p in reqs[k][1]:
                    col.setdefault((i, p), len(col))
        where = torch.tensor(list(col), device=out.hidden.device).reshape(-1, 2)
        lp = lm.adapter.final(out.hidden[where[:, 0], where[:, 1]]).float().log_softmax(-1)
        top = lp.argmax(-1).tolist()
        for i, r in enumerate(chunk):
            for k in users[r]:
                _, pos, tids = reqs[k]
                idx = [col[(i, p)] for p in pos]
                picked = lp[torch.tensor(idx, device=lp.device), torch.tensor(tids, device=lp.device)]
                res[k] = (picked.tolist(), [top[j] for j in idx])
    return res


def score_targets(lm: LM, prompts: Sequence[str], targets: Sequence[str], *, patches=(),
                  batch_size: int = 32) -> list[TargetScore]:
    """Teacher-forced scores of ``targets[i]`` after ``prompts[i]``.

    Decoders: the prompt followed by the target's tokens (``lm.target_ids``,
    so " Paris" after "is"). Masked LMs: the prompt's ``[MASK]`` becomes one
    mask per target token, each scored at its own mask. ``patches`` (without
    ``rows=``) apply to every forward.
    """
    if isinstance(prompts, str) or isinstance(targets, str):
        raise InputError("give lists of prompts and targets")
    prompts, targets = list(prompts), list(targets)
    if len(prompts) != len(targets):
        raise InputError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        return []
    patches = _check_patches(patches)
    reqs = [_request(lm, p, t) for p, t in zip(prompts, targets)]
    got = _score_seqs(lm, reqs, patches, batch_size)
    return [TargetScore(p, t, list(r[2]), lps, am) for p, t, r, (lps, am) in zip(prompts, targets, reqs, got)]


def _prefix_id(lm: LM) -> int | None:
    tk = lm.tokenizer
    return tk.bos_token_id if tk.bos_token_id is not None else tk.eos_token_id


@torch.no_grad()
def sentence_logprobs(lm: LM, sentences: Sequence[str], *, patches=(), batch_size: int = 32) -> list[float]:
    """log P(sentence) for a decoder: the sum of its token log-probs.

    As lm-evaluation-harness scores BLiMP: the sentence is conditioned on the
    tokenizer's BOS token (EOS when it has none), so its first token is scored
    too; a BOS the tokenizer already adds is not doubled.
    """
    if lm.is_mlm:
        raise InputError("sentence log-probabilities need a decoder; for a masked LM compare the masked "
                         "token's probability (method='target')")
    patches = _check_patches(patches)
    pre = _prefix_id(lm)
    seqs = []
    for s in sentences:
        ids = lm.tokenize(s)
        if pre is not None and ids[0] != pre:
            ids = [pre] + ids
        if len(ids) < 2:
            raise InputError(f"nothing to score in {s!r}: one token and no BOS to condition on")
        seqs.append(ids)
    out_lp = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for s in range(0, len(order), batch_size):
        chunk = order[s: s + batch_size]
        b = lm.batch_ids([seqs[i] for i in chunk])
        out = lm.run(b.input_ids, attention_mask=b.attention_mask, logits=None, patches=patches)
        valid = b.attention_mask.clone()
        valid[torch.arange(len(chunk)), b.lengths - 1] = False  # the last token predicts nothing scored
        ri, ci = valid.nonzero(as_tuple=True)
        lp = lm.adapter.final(out.hidden[ri, ci]).float().log_softmax(-1)
        nxt = b.input_ids[ri, ci + 1]
        tok = lp.gather(1, nxt[:, None])[:, 0].double()
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=tok.device).index_add_(0, ri, tok)
        for k, i in enumerate(chunk):
            out_lp[i] = float(sums[k])
    return out_lp


@torch.no_grad()
def token_probabilities(lm: LM, prompts: Sequence[str], tokens: Sequence[str], *, patches=(),
                        batch_size: int = 64) -> torch.Tensor:
    """P(token) at each prompt's target position: ``[n_prompts, n_tokens]``
    (float64). Each token must be one token after each prompt (" this" after a
    decoder prompt; "this" at BERT's ``[MASK]``)."""
    prompts, tokens = list(prompts), list(tokens)
    if not prompts or not tokens:
        raise InputError("need at least one prompt and one token")
    patches = _check_patches(patches)
    ids = torch.tensor([[lm.single_token(p, t) for t in tokens] for p in prompts])
    out = []
    for s in range(0, len(prompts), batch_size):
        pr = lm.next_token_probs(prompts[s: s + batch_size], patches=patches)
        out.append(pr.gather(1, ids[s: s + batch_size].to(pr.device)).double().cpu())
    return torch.cat(out)


# =============================================================================
# minimal pairs
# =============================================================================
def minimal_pair_scores(lm: LM, prompts: Sequence, *, method: str = "auto", patches=(),
                        batch_size: int = 32) -> list[dict]:
    """One row per BLiMP prompt (:class:`kncore.data.BlimpPrompt`): the good
    and bad scores and whether good wins.

    ``method="sentence"`` (decoders; BLiMP's standard): the full sentences'
    log-probabilities. ``method="target"``: the target token's probability,
    P(target_good | prompt_good) vs P(target_bad | prompt_bad) (for a masked
    LM, the two tokens at the ``[MASK]``). ``"auto"``: sentence for decoders,
    target for masked LMs.

    A ``patch_neurons`` edit patches the target position only (its default),
    which the sentence score mostly does not read: measure KN edits with
    ``method="target"`` (or patch ``positions="all"``).
    """
    prompts = list(prompts)
    if method == "auto":
        method = "target" if lm.is_mlm else "sentence"
    if method not in ("sentence", "target"):
        raise InputError(f"method must be 'auto', 'sentence' or 'target', got {method!r}")
    if not prompts:
        return []
    if method == "sentence":
        sc = sentence_logprobs(lm, [x.sentence_good for x in prompts] + [x.sentence_bad for x in prompts],
                               patches=patches, batch_size=batch_size)
        good, bad = sc[: len(prompts)], sc[len(prompts):]
    else:
        patches = _check_patches(patches)
        reqs = []
        for x in prompts:
            for pr, tid in ((x.prompt_good, x.target_good_id), (x.prompt_bad, x.target_bad_id)):
                ids = lm.tokenize(pr)
                pos = lm.target_position(ids)
                reqs.append((tuple(ids), [pos], [int(tid)]))
        got = _score_seqs(lm, reqs, patches, batch_size)
        good = [math.exp(got[2 * i][0][0]) for i in range(len(prompts))]
        bad = [math.exp(got[2 * i + 1][0][0]) for i in range(len(prompts))]
    return [{"paradigm": x.paradigm, "pair_id": x.pair_id, "cls": x.cls, "method": method,
             "score_good": g, "score_bad": b, "correct": g > b} for x, g, b in zip(prompts, good, bad)]


def summarise_pairs(rows: Sequence[dict]) -> dict:
    """Accuracy overall and per class from :func:`minimal_pair_scores` rows."""
    rows = list(rows)
    if not rows:
        raise InputError("no pair rows to summarise")
    by: dict = {}
    for r in rows:
        by.setdefault(r["cls"], []).append(r["correct"])
    return {"n": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "by_class": {c: sum(v) / len(v) for c, v in sorted(by.items())},
            "n_by_class": {c: len(v) for c, v in sorted(by.items())}}


def minimal_pair_accuracy(lm: LM, prompts: Sequence, *, method: str = "auto", patches=(),
                          batch_size: int = 32) -> dict:
    """Fraction of pairs where the good side scores higher (see
    :func:`minimal_pair_scores` for ``method``), overall and per class."""
    return summarise_pairs(minimal_pair_scores(lm, prompts, method=method, patches=patches,
                                               batch_size=batch_size))


# =============================================================================
# edits as context managers
# =============================================================================
def _is_cm(x) -> bool:
    """A context manager object (not a class such as ``contextlib.nullcontext``)."""
    return hasattr(x, "__enter__") and hasattr(x, "__exit__") and not isinstance(x, type)


@contextlib.contextmanager
def applied(apply_edit):
    """Enter an edit; yields the extra patches it gives (a list, maybe empty).

    ``apply_edit``: None (no edit), a context manager, or a zero-argument
    callable returning one.
    """
    if apply_edit is None:
        yield []
        return
    cm = apply_edit
    if not _is_cm(cm):
        if not callable(cm):
            raise InputError(f"apply_edit must be a context manager or a callable returning one, "
                             f"got {type(cm).__name__}")
        cm = cm()
        if not _is_cm(cm):
            raise InputError(f"apply_edit() returned {type(cm).__name__}, not a context manager")
    with cm as got:
        if isinstance(got, Patch):
            got = [got]
        extra = list(got) if isinstance(got, (list, tuple)) and all(isinstance(p, Patch) for p in got) else []
        yield _check_patches(extra)


def before_after(fn: Callable, apply_edit):
    """``(fn(patches=[]), fn(patches=edit's patches))``: ``fn`` run before and
    while the edit is applied, e.g. ``before_after(lambda patches:
    minimal_pair_accuracy(lm, prompts, method="target", patches=patches), edit)``."""
    before = fn(patches=[])
    with applied(apply_edit) as extra:
        after = fn(patches=extra)
    return before, after


# =============================================================================
# probability change under an edit
# =============================================================================
def relative_change(before, after) -> torch.Tensor:
    """(after - before) / min(before, after), elementwise (the paper's change
    in probability, symmetric in suppression and enhancement)."""
    b = torch.as_tensor(before, dtype=torch.float64)
    a = torch.as_tensor(after, dtype=torch.float64)
    if b.shape != a.shape:
        raise InputError(f"before {tuple(b.shape)} and after {tuple(a.shape)} differ in shape")
    if (b < 0).any() or (a < 0).any():
        raise InputError("probabilities must be non-negative")
    lo = torch.minimum(a, b)
    if (lo == 0).any():
        raise InputError("a probability is exactly 0; the relative change is undefined")
    return (a - b) / lo


def probability_change_stats(before, after, tokens: Sequence[str], *, alpha: float = 0.05,
                             test: str = "1samp") -> list[dict]:
    """Per token: the mean relative change over prompts and a t-test.

    ``before``/``after``: ``[n_prompts, n_tokens]`` probabilities (e.g. from
    :func:`token_probabilities`). ``test="1samp"``: one-sample t-test of the
    relative changes against 0; ``"rel"``: paired t-test of after vs before.
    ``significant`` is p < alpha.
    """
    from scipy import stats

    ch = relative_change(before, after)
    if ch.dim() != 2 or ch.shape[1] != len(tokens):
        raise InputError(f"expected [n_prompts, {len(tokens)}] probabilities, got {tuple(ch.shape)}")
    if test not in ("1samp", "rel"):
        raise InputError(f"test must be '1samp' or 'rel', got {test!r}")
    b = torch.as_tensor(before, dtype=torch.float64)
    a = torch.as_tensor(after, dtype=torch.float64)
    rows = []
    for j, tok in enumerate(tokens):
        c = ch[:, j].numpy()
        if len(c) < 2:
            t, p = math.nan, math.nan
        elif test == "1samp":
            t, p = stats.ttest_1samp(c, 0.0)
        else:
            t, p = stats.ttest_rel(a[:, j].numpy(), b[:, j].numpy())
        t, p = float(t), float(p)
        rows.append({"token": tok, "n": len(c), "mean_before": float(b[:, j].mean()),
                     "mean_after": float(a[:, j].mean()), "mean_change": float(c.mean()),
                     "std_change": float(c.std(ddof=1)) if len(c) > 1 else math.nan,
                     "t": t, "p_value": p, "significant": bool(p < alpha) if not math.isnan(p) else False})
    return rows


def _save_figure(fig, path) -> Path:
    """Write a matplotlib figure atomically (temp file, then rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, bbox_inches="tight", dpi=150)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def plot_probability_changes(stats_by_condition: dict, path, *, title: str | None = None) -> Path:
    """The paper's bar plot: per token, one bar per condition (e.g.
    ``{"suppress": rows, "enhance": rows}`` from
    :func:`probability_change_stats`), the mean relative change in percent,
    a star over significant bars. Written atomically to ``path``."""
    from matplotlib.figure import Figure

    if not stats_by_condition:
        raise InputError("no conditions to plot")
    conds = list(stats_by_condition)
    tokens = [r["token"] for r in stats_by_condition[conds[0]]]
    for c in conds:
        if [r["token"] for r in stats_by_condition[c]] != tokens:
            raise InputError(f"condition {c!r} has different tokens from {conds[0]!r}")
    fig = Figure(figsize=(max(4.0, 1.1 * len(tokens) * len(conds)), 3.2))
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / len(conds)
    vals = []
    for k, c in enumerate(conds):
        xs = [i + (k - (len(conds) - 1) / 2) * w for i in range(len(tokens))]
        ys = [100 * r["mean_change"] for r in stats_by_condition[c]]
        vals += ys
        ax.bar(xs, ys, width=w, label=c)
        for x, y, r in zip(xs, ys, stats_by_condition[c]):
            if r["significant"]:
                ax.annotate("*", (x, y), ha="center", va="bottom" if y >= 0 else "top", fontsize=12,
                            xytext=(0, 2 if y >= 0 else -2), textcoords="offset points")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels([t.strip() for t in tokens])
    ax.set_ylabel("change in probability (%)")
    if title:
        ax.set_title(title)
    ax.legend(frameon=False)
    return _save_figure(fig, path)


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
    from .data._io import DataError, read_json_list

    p = Path(path)
    out = []
    for i, d in enumerate(read_json_list(p)):
        try:
            out.append(EditCase.from_dict(d, f"{p.name}[{i}]"))
        except InputError as e:
            raise DataError(p, f"record {i}", str(e).split(": ", 1)[-1]) from None
    return out


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
        from .data._io import DataError

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
    from .data import _io
    from .data.pararel import load_pararel_facts, load_pararel_patterns, template_prompt

    k = EditKnowledge()
    root = Path(data_dir if data_dir is not None else _io.default_data_dir()) / "pararel"
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
    from .data.pararel import build_fact_bags, load_pararel_facts, load_pararel_patterns

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


# =============================================================================
# evaluating edits
# =============================================================================
def _mlm_prompt(lm: LM, prompt: str) -> str:
    """A masked LM's prompt: a prompt without the mask token gets `` [MASK] .``
    appended (the LAMA/PARAREL form)."""
    if not lm.is_mlm:
        return prompt
    mask = lm.tokenizer.mask_token
    return prompt if mask in prompt else f"{prompt.rstrip()} {mask} ."


def _case_requests(lm: LM, case: EditCase):
    reqs, index = [], []  # index[k] = (probe, which) with which in ("target", "foil")
    for p in case.probes:
        q = _mlm_prompt(lm, p.prompt)
        for which, ans in (("target", p.target), ("foil", p.foil)):
            if ans is None:
                continue
            try:
                reqs.append(_request(lm, q, ans))
            except InputError as e:
                raise InputError(f"edit case {case.case_id}, {p.kind} probe {p.prompt[:50]!r} -> {ans!r}: {e}") \
                    from None
            index.append((p, which))
    return reqs, index


def _case_row(case: EditCase, index, pre, post, details: bool) -> dict:
    by: dict = {}
    for (p, which), a, b in zip(index, pre, post):
        by.setdefault(id(p), {"probe": p})[which] = (a, b)
    row = {"case_id": case.case_id, "relation": case.relation, "subject": case.subject,
           "target_new": case.target_new, "target_true": case.target_true}
    kinds = list(dict.fromkeys(p.kind for p in case.probes))
    per_probe = []
    for kind in kinds:
        ent = [e for e in by.values() if e["probe"].kind == kind]
        row[f"n_{kind}"] = len(ent)
        for t, when in ((0, "pre"), (1, "post")):
            sc = [_ts(e["target"][t]) for e in ent]
            row[f"{kind}_prob_{when}"] = _mean([s["prob"] for s in sc])
            row[f"{kind}_acc_{when}"] = _mean([s["acc"] for s in sc])
            fo = [(s, _ts(e["foil"][t])) for s, e in zip(sc, ent) if "foil" in e]
            if fo:
                row[f"{kind}_success_{when}"] = _mean([float(s["mean_prob"] > f["mean_prob"]) for s, f in fo])
                row[f"{kind}_margin_{when}"] = _mean([s["mean_prob"] - f["mean_prob"] for s, f in fo])
        if kind == "locality":
            # EasyEdit's locality: post-edit top tokens agree with pre-edit ones.
            row["locality_agree"] = _mean([_agree(e["target"][0], e["target"][1]) for e in ent])
        if details:
            for e in ent:
                d = {"kind": kind, "prompt": e["probe"].prompt, "target": e["probe"].target,
                     "foil": e["probe"].foil}
                for t, when in ((0, "pre"), (1, "post")):
                    s = _ts(e["target"][t])
                    d[f"prob_{when}"], d[f"acc_{when}"] = s["prob"], s["acc"]
                    if "foil" in e:
                        d[f"foil_prob_{when}"] = _ts(e["foil"][t])["prob"]
                per_probe.append(d)
    for name, col in (("ES", "reliability_success_post"), ("PS", "generality_success_post"),
                      ("NS", "locality_success_post"), ("EM", "reliability_margin_post"),
                      ("PM", "generality_margin_post"), ("NM", "locality_margin_post")):
        if col in row:
            row[name] = row[col]
    if details:
        row["probes"] = per_probe
    return row


def _ts(res) -> dict:
    lps, am, ids = res
    lp = sum(lps)
    return {"prob": math.exp(lp), "mean_prob": math.exp(lp / len(lps)),
            "acc": sum(int(a == t) for a, t in zip(am, ids)) / len(ids)}


def _agree(pre, post) -> float:
    return sum(int(a == b) for a, b in zip(pre[1], post[1])) / len(pre[1])


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def _call_make(make_edit, case):
    """make_edit(case) -> context manager; a zero-argument callable or a
    context manager is used as it is."""
    if make_edit is None or _is_cm(make_edit) or not callable(make_edit):
        return make_edit  # applied() accepts it or says what is wrong
    try:
        n_req = sum(1 for p in inspect.signature(make_edit).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    except (TypeError, ValueError):
        n_req = 1
    return make_edit(case) if n_req >= 1 else make_edit


def evaluate_edits(lm: LM, cases: Sequence[EditCase], make_edit, *, batch_size: int = 32,
                   details: bool = False) -> list[dict]:
    """Evaluate one edit per case; returns one row per case.

    ``make_edit(case)`` returns the context manager that applies that case's
    edit (a ROME edit, ``kncore.patch_neurons``...). Every case's probes are
    scored (in one batch when they fit ``batch_size``) before and while its
    edit is applied.

    Row columns, for each probe kind present (reliability, generality,
    locality, symmetry, synonymy, or your own): ``{kind}_prob_{pre,post}``
    (mean P(target), the product of its token probabilities),
    ``{kind}_acc_{pre,post}`` (teacher-forced token accuracy, EasyEdit's), and
    where probes have a foil ``{kind}_success_{pre,post}`` (ROME's comparison:
    P(target) > P(foil), probabilities per token as ROME's
    ``test_batch_prediction``) and ``{kind}_margin_{pre,post}``
    (P(target) - P(foil)). ``locality_agree`` is EasyEdit's locality (post-edit
    top tokens equal pre-edit ones). ROME's CounterFact names: ES, PS, NS
    (post-edit success of reliability, generality and locality probes) and
    EM, PM, NM (their margins). ``details=True`` adds per-probe rows.
    """
    cases = list(cases)
    built = [_case_requests(lm, c) for c in cases]  # tokenisation errors surface before any edit
    rows = []
    for case, (reqs, index) in zip(cases, built):
        # Before and after run the same batches, so a no-op edit gives
        # bit-identical numbers (batching cases together changes the float
        # rounding by ~1e-7).
        pre = [(lps, am, r[2]) for (lps, am), r in zip(_score_seqs(lm, reqs, [], batch_size), reqs)]
        with applied(_call_make(make_edit, case)) as extra:
            got = _score_seqs(lm, reqs, extra, batch_size)
        post = [(lps, am, r[2]) for (lps, am), r in zip(got, reqs)]
        rows.append(_case_row(case, index, pre, post, details))
    return rows


def evaluate_edit(lm: LM, case: EditCase, apply_edit, *, batch_size: int = 32, details: bool = False) -> dict:
    """Evaluate one edit: ``apply_edit`` is a context manager or a
    zero-argument callable returning one (``lambda: kncore.patch_neurons(lm,
    kns, mode="suppress")``). See :func:`evaluate_edits` for the columns."""
    return evaluate_edits(lm, [case], apply_edit, batch_size=batch_size, details=details)[0]


def summarise_edits(rows: Sequence[dict]) -> dict:
    """Mean of every numeric column over the cases that have it (NaN-free),
    and ROME's score S = harmonic mean of ES, PS and NS."""
    rows = list(rows)
    if not rows:
        raise InputError("no edit rows to summarise")
    cols: dict = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "case_id" and not math.isnan(v):
                cols.setdefault(k, []).append(float(v))
    out = {"n_cases": len(rows)}
    out.update({k: sum(v) / len(v) for k, v in cols.items()})
    if all(k in out for k in ("ES", "PS", "NS")):
        v = [out["ES"], out["PS"], out["NS"]]
        out["S"] = 0.0 if min(v) == 0 else 3 / sum(1 / x for x in v)
    return out


def dropped_summary(counter: Counter) -> str:
    """A one-line account of drops, e.g. ``"128 dropped: 128 a target word is more than one token"``."""
    n = sum(counter.values())
    if not n:
        return "none dropped"
    return f"{n} dropped: " + "; ".join(f"{v} {k}" for k, v in counter.most_common())
