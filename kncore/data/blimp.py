"""BLiMP (Warstadt et al. 2020): minimal pairs, and the prompts built from
them for one model's tokenizer.

Each of the 67 paradigm files holds 1000 pairs (``sentence_good``,
``sentence_bad``) plus flags saying how a language model should compare them:

* ``one_prefix_method``: the pair shares a prefix and differs in the next
  word (``this sketch`` / ``this sketches``); the prompt is the prefix and the
  two words are the targets.
* ``two_prefix_method``: the pair differs earlier (``this committee`` /
  ``these committee``); the two prefixes are the prompts and the shared word
  is the target.

For a masked LM the pair's differing token becomes ``[MASK]`` and the two
tokens are the targets, whatever the flags. Pairs whose difference is not one
token under the model's tokenizer are dropped, and every drop is counted with
its reason.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import InputError
from ._io import DataError, ItemsView, default_data_dir, jsonl_fields

_KNOWN = {"sentence_good", "sentence_bad", "field", "linguistics_term", "UID", "pairID", "simple_LM_method",
          "one_prefix_method", "two_prefix_method", "lexically_identical", "one_prefix_prefix",
          "one_prefix_word_good", "one_prefix_word_bad", "two_prefix_prefix_good", "two_prefix_prefix_bad",
          "two_prefix_word"}


@dataclass
class BlimpPair:
    """One BLiMP minimal pair, as in the file (``extra`` keeps paradigm-specific
    fields such as ``dependency_length`` or ``crucial_item``)."""

    paradigm: str
    pair_id: str
    field: str
    linguistics_term: str
    sentence_good: str
    sentence_bad: str
    simple_lm: bool
    one_prefix: bool
    two_prefix: bool
    lexically_identical: bool
    prefix: str | None = None          # one_prefix_prefix
    word_good: str | None = None       # one_prefix_word_good
    word_bad: str | None = None        # one_prefix_word_bad
    prefix_good: str | None = None     # two_prefix_prefix_good
    prefix_bad: str | None = None      # two_prefix_prefix_bad
    shared_word: str | None = None     # two_prefix_word
    extra: dict = dc_field(default_factory=dict)
    source: str = ""                   # "file:line"

    @property
    def cls(self) -> str:
        """The pair's class (see :func:`pair_class`)."""
        return pair_class(self)


@dataclass
class BlimpPrompt:
    """A minimal pair turned into next-token (or masked-token) prompts.

    ``method`` is ``"one_prefix"`` (one prompt, two targets), ``"two_prefix"``
    (two prompts, one target), ``"token_diff"`` (a paradigm without flags whose
    sentences differ in one token: one prompt, two targets) or ``"masked"``
    (masked LM: one prompt with ``[MASK]``, two targets).
    """

    paradigm: str
    pair_id: str
    cls: str
    method: str
    prompt_good: str
    prompt_bad: str
    target_good: str
    target_bad: str
    target_good_id: int
    target_bad_id: int
    sentence_good: str
    sentence_bad: str

    @property
    def same_prompt(self) -> bool:
        return self.prompt_good == self.prompt_bad


@dataclass
class BlimpPrompts(ItemsView):
    """Prompts built from a list of pairs, and the pairs dropped, by reason."""

    items: list
    dropped: Counter
    total: int

    def by_class(self) -> dict[str, list[BlimpPrompt]]:
        """The prompts grouped by class."""
        out: dict[str, list] = {}
        for it in self.items:
            out.setdefault(it.cls, []).append(it)
        return out


# -- loading -----------------------------------------------------------------------

def blimp_paradigms(data_dir=None) -> list[str]:
    """Names of the paradigm files under ``data_dir/blimp``."""
    d = Path(data_dir if data_dir is not None else default_data_dir()) / "blimp"
    if not d.is_dir():
        raise DataError(d, None, "no BLiMP folder here (set KNCORE_DATA or pass data_dir=)")
    return sorted(p.stem for p in d.glob("*.jsonl"))


def load_blimp(paradigm: str, data_dir=None, *, path=None) -> list[BlimpPair]:
    """The pairs of one paradigm (``"determiner_noun_agreement_1"``), read from
    ``data_dir/blimp/<paradigm>.jsonl`` or from ``path``."""
    if path is None:
        path = Path(data_dir if data_dir is not None else default_data_dir()) / "blimp" / f"{paradigm}.jsonl"
        if not path.exists():
            known = ", ".join(blimp_paradigms(data_dir)[:5])
            raise DataError(path, None, f"no BLiMP paradigm {paradigm!r} (e.g. {known}, ...)")
    return load_blimp_file(path)


def load_blimp_file(path) -> list[BlimpPair]:
    """Read one BLiMP jsonl file."""
    pairs = []
    for f in jsonl_fields(path):
        one, two = f("one_prefix_method", bool, optional=True, default=False), \
            f("two_prefix_method", bool, optional=True, default=False)
        p = BlimpPair(
            paradigm=f("UID"), pair_id=str(f("pairID", (str, int))), field=f("field"),
            linguistics_term=f("linguistics_term"), sentence_good=f("sentence_good"),
            sentence_bad=f("sentence_bad"), simple_lm=f("simple_LM_method", bool, optional=True, default=True),
            one_prefix=one, two_prefix=two,
            lexically_identical=f("lexically_identical", bool, optional=True, default=False),
            prefix=f("one_prefix_prefix", optional=not one), word_good=f("one_prefix_word_good", optional=not one),
            word_bad=f("one_prefix_word_bad", optional=not one),
            prefix_good=f("two_prefix_prefix_good", optional=not two),
            prefix_bad=f("two_prefix_prefix_bad", optional=not two),
            shared_word=f("two_prefix_word", optional=not two),
            extra={k: v for k, v in f.rec.items() if k not in _KNOWN}, source=f.source)
        if one and two:
            raise f.error("both one_prefix_method and two_prefix_method are set")
        pairs.append(p)
    return pairs


# -- classes -----------------------------------------------------------------------

_SG_DET, _PL_DET = {"this", "that"}, {"these", "those"}
_SG_VERB = {"is", "was", "has", "does", "isn't", "wasn't", "hasn't", "doesn't"}
_PL_VERB = {"are", "were", "have", "do", "aren't", "weren't", "haven't", "don't"}
_REFLEXIVE_GENDER = {"herself": "female", "himself": "male", "itself": "neuter"}
_REFLEXIVE_NUMBER = {"herself": "singular", "himself": "singular", "itself": "singular", "themselves": "plural"}
_SV_PARADIGMS = {"regular_plural_subject_verb_agreement_1", "regular_plural_subject_verb_agreement_2",
                 "irregular_plural_subject_verb_agreement_1", "irregular_plural_subject_verb_agreement_2",
                 "distractor_agreement_relational_noun", "distractor_agreement_relative_clause"}


def _words(s: str) -> list[str]:
    return re.findall(r"[A-Za-z']+", s.lower())


def pair_class(pair: BlimpPair) -> str:
    """The class a pair belongs to, for the agreement paradigms:

    * determiner-noun agreement (all 8 paradigms): the number of the good
      sentence's demonstrative, ``"singular"`` (this/that) or ``"plural"``
      (these/those);
    * subject-verb agreement (regular/irregular plural, distractor
      agreement): the subject's number, read off the good verb (is/was/has/
      does -> singular, are/were/have/do -> plural, else a final -s -> singular);
    * anaphor number agreement: the good reflexive's number;
    * anaphor gender agreement: the good reflexive's gender
      (``female``/``male``/``neuter``).

    Every other paradigm has one class, ``"all"``. These are the classes the
    paper's authors used (sg/pl determiners, f/m/i reflexives, sg/pl verbs).
    """
    p = pair.paradigm
    if p.startswith("determiner_noun_agreement"):
        text = pair.prefix if pair.one_prefix else pair.prefix_good if pair.two_prefix else pair.sentence_good
        dets = [w for w in _words(text or "") if w in _SG_DET | _PL_DET]
        if not dets:
            raise InputError(f"{pair.source or p}: no demonstrative in {text!r} to classify the pair")
        return "singular" if dets[-1] in _SG_DET else "plural"
    if p in _SV_PARADIGMS:
        verb = pair.word_good if pair.one_prefix else pair.shared_word if pair.two_prefix else None
        if not verb:
            raise InputError(f"{pair.source or p}: no verb field to classify the pair")
        v = _words(verb)[0]
        if v in _SG_VERB:
            return "singular"
        if v in _PL_VERB:
            return "plural"
        return "singular" if v.endswith("s") else "plural"
    if p in ("anaphor_number_agreement", "anaphor_gender_agreement"):
        table = _REFLEXIVE_NUMBER if p == "anaphor_number_agreement" else _REFLEXIVE_GENDER
        w = (pair.word_good or "").strip().lower()
        if w not in table:
            raise InputError(f"{pair.source or p}: unexpected reflexive {pair.word_good!r}")
        return table[w]
    return "all"


# -- prompts -----------------------------------------------------------------------

PROMPT_METHODS = ("flags", "token_diff")


def build_blimp_prompts(lm, pairs: Iterable[BlimpPair], method: str = "flags") -> BlimpPrompts:
    """Turn pairs into prompts for ``lm``'s tokenizer: for decoders following
    BLiMP's method flags (``method="flags"``) or, whatever the flags say, the
    good sentence before the one token where the two sentences differ
    (``"token_diff"``, as Niu et al.'s code); for masked LMs the differing
    token is masked.

    Only pairs whose difference is one token are kept; the others are
    counted in ``.dropped`` under a reason.
    """
    if method not in PROMPT_METHODS:
        raise InputError(f"BLiMP prompt method must be one of {PROMPT_METHODS}, got {method!r}")
    items, dropped, total = [], Counter(), 0
    for pair in pairs:
        total += 1
        cls = pair_class(pair)
        if lm.is_mlm:
            build = _masked
        elif method == "token_diff":
            build = _token_diff
        else:
            build = _one_prefix if pair.one_prefix else _two_prefix if pair.two_prefix else _token_diff
        try:
            got = build(lm, pair)
        except InputError:
            got = "the tokenizer rejected a prompt or target"
        if isinstance(got, str):
            dropped[got] += 1
        else:
            items.append(BlimpPrompt(pair.paradigm, pair.pair_id, cls, *got, pair.sentence_good,
                                     pair.sentence_bad))
    return BlimpPrompts(items, dropped, total)


def blimp_prompts(lm, paradigm: str, data_dir=None) -> BlimpPrompts:
    """Load a paradigm and build its prompts for ``lm``."""
    return build_blimp_prompts(lm, load_blimp(paradigm, data_dir))


def _one_prefix(lm, pair):
    prefix, wg, wb = pair.prefix, pair.word_good.split(), pair.word_bad.split()
    # "grocery store" / "grocery stores": the shared words join the prefix.
    while len(wg) > 1 and len(wb) > 1 and wg[0] == wb[0]:
        prefix, wg, wb = f"{prefix} {wg[0]}", wg[1:], wb[1:]
    wg, wb = " ".join(wg), " ".join(wb)
    if wg == wb:
        return "identical words"
    tg, tb = lm.target_ids(prefix, wg), lm.target_ids(prefix, wb)
    if len(tg) != 1 or len(tb) != 1:
        return "a target word is more than one token"
    if _unknown(lm, tg + tb):
        return "a target is unknown to the tokenizer"
    if tg == tb:
        return "the two words tokenise identically"
    return ("one_prefix", prefix, prefix, wg, wb, tg[0], tb[0])


def _two_prefix(lm, pair):
    word = pair.shared_word.strip()
    tg, tb = lm.target_ids(pair.prefix_good, word), lm.target_ids(pair.prefix_bad, word)
    if len(tg) != 1 or len(tb) != 1:
        return "the shared word is more than one token"
    if _unknown(lm, tg):
        return "a target is unknown to the tokenizer"
    if tg != tb:
        return "the shared word tokenises differently after the two prefixes"
    if lm.tokenize(pair.prefix_good) == lm.tokenize(pair.prefix_bad):
        return "the two prefixes tokenise identically"
    return ("two_prefix", pair.prefix_good, pair.prefix_bad, word, word, tg[0], tg[0])


def _offsets(lm, text: str, n_ids: int):
    """Character span of each token of ``lm.tokenize(text)`` (None where unknown)."""
    try:
        enc = lm.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    offs = list(enc.get("offset_mapping") or [])
    if not offs:
        return None
    shift = n_ids - len(offs)  # > 0: a BOS that LM.tokenize added; < 0: one it removed
    offs = [tuple(o) for o in offs]
    return [None] * shift + offs if shift >= 0 else offs[-shift:]


def _unknown(lm, ids) -> bool:
    unk = lm.tokenizer.unk_token_id
    return unk is not None and unk in ids


def _sentence_ids(lm, text: str) -> list[int]:
    """Token ids of a whole sentence (``LM.tokenize`` insists on one [MASK]
    for a masked LM, which a BLiMP sentence does not have)."""
    return lm.tokenize(text) if not lm.is_mlm else list(lm.tokenizer(text, add_special_tokens=True)["input_ids"])


def _plain(lm, prompt: str, text: str, tid: int) -> str:
    """The target as a word without its leading space, when that names the same token."""
    t = text.strip()
    try:
        return t if t and lm.target_ids(prompt, t) == [tid] else text
    except InputError:
        return text


def _diff(g: Sequence[int], b: Sequence[int]):
    """Index of the only differing token of two equal-length-after-it sequences, or a reason."""
    if list(g) == list(b):
        return "the sentences tokenise identically"
    c = 0
    while c < min(len(g), len(b)) and g[c] == b[c]:
        c += 1
    if c >= min(len(g), len(b)) or list(g[c + 1:]) != list(b[c + 1:]):
        return "the sentences differ in more than one token"
    return c


def _token_diff(lm, pair):
    """A paradigm without method flags: keep the pair when the sentences differ
    in exactly one token; the prompt is the text before it."""
    sg = pair.sentence_good
    g, b = lm.tokenize(sg), lm.tokenize(pair.sentence_bad)
    c = _diff(g, b)
    if isinstance(c, str):
        return c
    offs_g = _offsets(lm, sg, len(g))
    offs_b = _offsets(lm, pair.sentence_bad, len(b))
    if offs_g is None or offs_b is None or offs_g[c] is None or offs_b[c] is None:
        return "no character offsets to split the sentence at the differing token"
    a, e = offs_g[c]
    if not sg[:a].strip():
        return "the sentences differ at their first word"
    tg, tb = sg[a:e], pair.sentence_bad[offs_b[c][0]:offs_b[c][1]]
    for prompt in dict.fromkeys((sg[:a].rstrip(), sg[:a])):  # word-level tokenizers leave the space out
        try:
            if (lm.tokenize(prompt) == list(g[:c]) and lm.target_ids(prompt, tg) == [g[c]]
                    and lm.target_ids(prompt, tb) == [b[c]]):
                break
        except InputError:
            pass
    else:
        return "the differing token is not at a clean token boundary"
    if _unknown(lm, [g[c], b[c]]):
        return "a target is unknown to the tokenizer"
    return ("token_diff", prompt, prompt, _plain(lm, prompt, tg, g[c]), _plain(lm, prompt, tb, b[c]), g[c], b[c])


def _masked(lm, pair):
    sg = pair.sentence_good
    g, b = _sentence_ids(lm, sg), _sentence_ids(lm, pair.sentence_bad)
    if len(g) != len(b):
        return "the sentences differ in more than one token" if g != b else "the sentences tokenise identically"
    c = _diff(g, b)
    if isinstance(c, str):
        return c
    if _unknown(lm, [g[c], b[c]]):
        return "a target is unknown to the tokenizer"
    offs = _offsets(lm, sg, len(g))
    if offs is None or offs[c] is None:
        return "no character offsets to mask the differing token"
    a, e = offs[c]
    mask = lm.tokenizer.mask_token
    prompt = sg[:a] + mask + sg[e:]
    want = list(g)
    want[c] = lm.tokenizer.mask_token_id
    if lm.tokenize(prompt) != want:
        return "the differing token is a word piece and cannot be masked alone"
    dec = lambda i: lm.tokenizer.decode([i]).strip()  # noqa: E731
    return ("masked", prompt, prompt, dec(g[c]), dec(b[c]), g[c], b[c])
