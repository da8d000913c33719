"""Scoring: the one batched scorer (:func:`score_targets`: teacher-forced
target log-probabilities and greedy tokens), sentence log-probabilities,
token probabilities, and minimal-pair accuracy."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..family import family
from ..lm import LM, InputError
from ..runtime import Patch


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


def check_patches(patches) -> list:
    patches = list(patches or ())
    for p in patches:
        if not isinstance(p, Patch):
            raise InputError(f"patches must be kncore.Patch objects, got {type(p).__name__}")
        if p.rows is not None:
            raise InputError("patches with rows= cannot be used here: rows are regrouped into batches; "
                             "give patches that apply to every row")
    return patches


def score_request(lm: LM, prompt: str, target: str):
    """(row key, scored positions, target ids) of one (prompt, target), as the
    model's family builds it (:mod:`kncore.family`): a decoder's token
    sequence, a masked LM's masked sequence, or T5's (encoder ids, decoder
    ids shifted right)."""
    return family(lm).score_request(lm, prompt, target)


@torch.no_grad()
def score_sequences(lm: LM, reqs: list, patches, batch_size: int):
    """[(log-probs, argmax ids)] for requests (row key, positions, target ids)
    (:func:`score_request`; the row keys are the family's, see :mod:`kncore.family`).

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
    fam = family(lm)
    order = sorted(range(len(seqs)), key=lambda r: fam.row_len(seqs[r]))
    res: list = [None] * len(reqs)
    for s in range(0, len(order), batch_size):
        chunk = order[s: s + batch_size]
        col: dict = {}  # (batch row, position) -> index into the scored positions
        for i, r in enumerate(chunk):
            for k in users[r]:
                for p in reqs[k][1]:
                    col.setdefault((i, p), len(col))
        where = torch.tensor(list(col), device=lm.device).reshape(-1, 2)
        lp = fam.logprobs_at(lm, [seqs[r] for r in chunk], where, patches)
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
    mask per target token, each scored at its own mask. T5: the prompt is the
    encoder's input and the target is teacher-forced in the decoder with its
    input shifted right (``decoder_start_token_id`` first), so decoder
    position q scores target[q]. ``patches`` (without ``rows=``) apply to
    every forward (on T5, to the decoder).
    """
    if isinstance(prompts, str) or isinstance(targets, str):
        raise InputError("give lists of prompts and targets")
    prompts, targets = list(prompts), list(targets)
    if len(prompts) != len(targets):
        raise InputError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        return []
    patches = check_patches(patches)
    reqs = [score_request(lm, p, t) for p, t in zip(prompts, targets)]
    got = score_sequences(lm, reqs, patches, batch_size)
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
    patches = check_patches(patches)
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
    patches = check_patches(patches)
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
    if family(lm).encoder_decoder:
        raise InputError("minimal-pair scores run on decoders and masked LMs; for T5 compare targets with "
                         "score_targets (the prompt in the encoder, the target in the decoder)")
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
        patches = check_patches(patches)
        reqs = []
        for x in prompts:
            for pr, tid in ((x.prompt_good, x.target_good_id), (x.prompt_bad, x.target_bad_id)):
                ids = lm.tokenize(pr)
                pos = lm.target_position(ids)
                reqs.append((tuple(ids), [pos], [int(tid)]))
        got = score_sequences(lm, reqs, patches, batch_size)
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
