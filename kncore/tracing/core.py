"""The restoration grid of causal tracing, computed fast and exactly.

ROME's recipe (``experiments/causal_trace.py``): run the prompt once clean and
``samples`` times with Gaussian noise added to the subject's token embeddings;
then, for every cell (token t, layer l), rerun the corrupted prompt with the
clean state restored at that cell and report the target's probability,
averaged over the corrupted rows. ROME does one full forward per cell.

Here the clean run and the corrupted run are done once each. With causal
attention a restoration at token t changes nothing at positions < t, so a cell
only recomputes positions >= t, from its first restored layer up, reading the
corrupted run's cached keys and values for the positions before t. Cells of
one token t share that prefix, so they are batched together: their rows are
ordered by the layer at which they start and walk the layers one at a time,
new rows joining the batch when their start layer comes (a row that restores
the block output of layer l joins at layer l+1 with the clean state already in
place; a window of MLP or attention outputs joins at its lowest layer, and a
window clipped at layer 0, [0, hi), joins at hi as a copy of the rows of the
longest window of its token and kind, whose restorations up to hi are the
same). Every layer of the walk is one :func:`kncore.runtime.run` call per
slice of at most ``max_tokens`` row-positions; the head runs once at the end
over every row's last state.

BERT (bidirectional) has no such prefix: its rows recompute every position
from their start layer, still batched across cells.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable, Sequence

import numpy as np
import torch

from .. import validation as V
from ..lm import LM, InputError
from ..runtime import EMBED_SITE, KVCache, Patch, keys_values

KINDS = ("hidden", "mlp", "attn")
SITE_OF = {"hidden": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


class Restore(IntEnum):
    """What a job of the fast grid restores (an int: the walk keeps it in a tensor per row)."""

    HIDDEN = 0  # a block output: the restored state is the row's input, no patch
    MLP = 1     # mlp_out, patched on the window's layers
    ATTN = 2    # attn_out, patched on the window's layers


_CODE = {"hidden": Restore.HIDDEN, "mlp": Restore.MLP, "attn": Restore.ATTN}
_PATCH_SITE = {Restore.MLP: "mlp_out", Restore.ATTN: "attn_out"}
_SD = V.NOISE_SD
# Row-positions per runtime call. GPT-2-medium shape on the 2-core CPU:
# see bench/bench_trace.py --sweep for the measurement behind this default.
DEFAULT_MAX_TOKENS = 2048
# Cap on the hidden states one walk keeps ([rows, positions, d_model]); more
# jobs than fit are walked in several passes.
STATE_BYTES = 1 << 30
# Logits per head call in the walk's final pass (see _target_probs).
HEAD_BYTES = 30 << 20
# float64 copy per row block of the head's normaliser sum (see _sum64).
SUM64_BYTES = 4 << 20


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """ROME's run of ``window`` layers centred on ``layer``, clipped to the model:
    ``range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))``."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


# -- noise ---------------------------------------------------------------------------
@torch.no_grad()
def embedding_std(lm: LM, subjects: Sequence[str] | None = None) -> float:
    """Standard deviation of token embeddings (the output of the embedding module).

    With ``subjects`` it is ROME's ``collect_embedding_std``: the std of every
    element of the embeddings of the subjects' tokens (tokenised alone, without
    special tokens). Without, the std of the whole embedding matrix.
    """
    emb = lm.adapter.embedding_module()
    if subjects is None:
        # Gemma's embedding module (transformers >= 5) multiplies its rows by
        # embed_scale = sqrt(d_model): its output's std is the rows' std times that.
        scale = getattr(emb, "embed_scale", None)
        return float(embedding_matrix_std(lm)) * (1.0 if scale is None else float(scale))
    if isinstance(subjects, str):
        raise InputError("noise_subjects must be a list of subject strings, not one string")
    ids = []
    for s in subjects:
        if not isinstance(s, str):
            raise InputError(f"noise_subjects must hold strings, got {type(s).__name__}")
        ids += list(lm.tokenizer(s, add_special_tokens=False)["input_ids"])
    if len(ids) < 2:
        raise InputError("noise_subjects give fewer than 2 tokens: cannot measure a standard deviation")
    return float(emb(torch.tensor(ids, device=lm.device)).float().std())


def embedding_matrix_std(lm: LM) -> torch.Tensor:
    """The std of every element of the embedding matrix, in fp32 (a 0-d tensor).
    For a bf16/fp16 model this makes an fp32 copy of the matrix ([vocab,
    d_model] x 4 bytes): kncore.planner runs it on the meta device to count it."""
    return lm.adapter.embedding_module().weight.detach().float().std()


def resolve_noise(lm: LM, noise, subjects: Sequence[str] | None = None) -> float:
    """The noise scale: a float as is, or ``"<k>sd"`` for k times :func:`embedding_std`."""
    if isinstance(noise, bool):
        raise InputError(f"noise must be a number or a string like '3sd', got {noise!r}")
    if isinstance(noise, (int, float)):
        v = float(noise)
    elif isinstance(noise, str):
        m = _SD.match(noise)
        if not m:
            raise InputError(f"noise {noise!r} not understood: give a number or a multiple of the "
                             "embedding std such as '3sd'")
        v = float(m.group(1)) * embedding_std(lm, subjects)
    else:
        raise InputError(f"noise must be a number or a string like '3sd', got {type(noise).__name__}")
    if not math.isfinite(v) or v < 0:
        raise InputError(f"noise scale must be finite and >= 0, got {v}")
    return v


def noise_array(seed: int, samples: int, n_tokens: int, d_model: int) -> np.ndarray:
    """ROME's draw: ``RandomState(seed).randn(samples, n_tokens, d_model)`` (float64),
    made once and shared by every cell."""
    return np.random.RandomState(seed).randn(samples, n_tokens, d_model)


def noise_hook(b: int, e: int, noise: torch.Tensor, first_row: int = 0):
    """Forward hook for the embedding module that adds ``noise`` [rows, e-b, d]
    (float64, like ROME) to rows ``first_row:`` at tokens ``b:e``."""
    def hook(module, inputs, out):
        out = out.clone()
        out[first_row:, b:e] += noise.to(out.device)
        return out
    return hook


def noise_patch(b: int, e: int, noise: torch.Tensor) -> Patch:
    """The runtime :class:`kncore.runtime.Patch` that adds ``noise`` [rows, e-b, d]
    to the token embeddings (the ``embed`` site) of every row at tokens ``b:e``.
    The sum is taken in float64 and rounded to the model's dtype, as ROME's
    in-place add of its float64 noise does (:func:`noise_hook`)."""
    flat = noise.reshape(-1, noise.shape[-1])  # the patch selects rows, then positions, in order
    return Patch(EMBED_SITE, 0, positions=list(range(b, e)), fn=lambda sel: sel + flat.to(sel.device))


# -- checks shared with the reference --------------------------------------------------
def check_args(kinds, samples, window, seed) -> tuple:
    kinds = V.choices("kinds", (kinds,) if isinstance(kinds, str) else kinds, KINDS)
    V.check_all(samples=samples, window=window, seed=seed)
    return kinds


def prepare(lm: LM, prompt: str, subject: str, samples: int, noise, noise_subjects, seed: int):
    """Tokens, subject range, target position, noise scale and ROME's noise draw."""
    ids = lm.tokenize(prompt)
    b, e = lm.subject_span(prompt, subject)
    scale = resolve_noise(lm, noise, noise_subjects)
    arr = noise_array(seed, samples, e - b, lm.d_model)
    return ids, (b, e), lm.target_position(ids), scale, scale * torch.from_numpy(arr)


def resolve_target(lm: LM, prompt: str, target, probs: torch.Tensor) -> int:
    """The target token id: the clean top-1 when None, a one-token string, or an id."""
    if target is None:
        return int(probs.argmax())
    if isinstance(target, str):
        return lm.single_token(prompt, target)
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if not 0 <= int(target) < probs.shape[-1]:
            raise InputError(f"target id {target} outside the vocabulary of {probs.shape[-1]}")
        return int(target)
    raise InputError(f"target must be None, a string or a token id, got {type(target).__name__}")


# -- result ---------------------------------------------------------------------------
@dataclass
class TraceResult:
    """The restoration grid of one prompt.

    ``scores[kind]`` is ``[n_tokens, n_layers]``: the target's probability with
    the clean state restored at (token, layer) (for "mlp"/"attn": the window
    of layers centred there), averaged over the corrupted runs. ``low`` is the
    corrupted probability, ``high`` the clean one.
    """

    scores: dict
    low: float
    high: float
    tokens: list
    input_ids: list
    subject_range: tuple
    target: int
    answer: str
    target_position: int
    prompt: str
    subject: str
    kinds: tuple
    window: int
    samples: int
    noise: float
    seed: int
    model: str = ""

    @property
    def n_layers(self) -> int:
        return next(iter(self.scores.values())).shape[1]

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """``scores[kind] - low``: what restoring each cell gives back."""
        return self.scores[kind] - self.low

    def __repr__(self):
        b, e = self.subject_range
        return (f"TraceResult({self.prompt!r}, subject tokens {b}:{e}, target {self.answer!r}, "
                f"high={self.high:.4g}, low={self.low:.4g}, kinds={self.kinds}, "
                f"grid={len(self.tokens)}x{self.n_layers})")

    def to_dict(self) -> dict:
        """A JSON-ready dict (floats kept exactly)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "scores"}
        d["subject_range"] = list(self.subject_range)
        d["kinds"] = list(self.kinds)
        d["scores"] = {k: v.tolist() for k, v in self.scores.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TraceResult":
        d = dict(d)
        d["scores"] = {k: torch.tensor(v, dtype=torch.float32) for k, v in d["scores"].items()}
        d["subject_range"] = tuple(d["subject_range"])
        d["kinds"] = tuple(d["kinds"])
        return cls(**d)

    def plot(self, path, kinds: Sequence[str] | None = None, model_name: str | None = None):
        """ROME-style heatmaps, one panel per kind (subject tokens marked '*').
        The format follows the suffix: .png, .pdf or .svg."""
        from .plots import plot_trace
        return plot_trace(self, path, kinds=kinds, model_name=model_name)


# -- the fast grid ----------------------------------------------------------------------
@dataclass
class _Job:
    t: int      # restored token
    code: Restore  # what is restored (patched on layers [lo, hi))
    lo: int
    hi: int
    entry: int  # the layer at which the job's rows join the walk
    # A window clipped at layer 0 restores a prefix of a longer window of its
    # token and kind: up to layer hi both have the same state, so in a walk
    # that holds that job too the rows start at layer hi as a copy of its rows.
    parent: "_Job | None" = None


@torch.no_grad()
def trace(lm: LM, prompt: str, subject: str, *, target=None, kinds: Iterable[str] = KINDS,
          samples: int = 10, noise="3sd", noise_subjects: Sequence[str] | None = None,
          window: int = 10, seed: int = 1, max_tokens: int | None = None) -> TraceResult:
    """Causal tracing of one prompt, ROME's numbers from two full forwards and
    a batched walk over cached suffixes.

    ``target``: None (the clean top-1 token), a one-token string, or an id.
    ``kinds``: any of "hidden" (block output, ``resid_post``), "mlp"
    (``mlp_out``), "attn" (``attn_out``); the last two restore ``window`` layers.
    ``noise``: a float, or ``"<k>sd"``: k times the std of the embeddings of
    ``noise_subjects`` (ROME's ``collect_embedding_std``), or of the whole
    embedding matrix when none are given. ``seed``: ROME's ``RandomState`` seed
    for the noise, drawn once for all cells. ``max_tokens``: row-positions per
    runtime call (memory and speed knob).
    """
    kinds = check_args(kinds, samples, window, seed)
    max_tokens = V.check("max_tokens", max_tokens)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    V.text("prompt", prompt), V.text("subject", subject), V.noise_spec(noise)
    V.subject_in_prompt(prompt, subject)
    ids, (b, e), tpos, scale, noise_t = prepare(lm, prompt, subject, samples, noise, noise_subjects, seed)
    ad = lm.adapter
    N, T, dev = ad.n_layers, len(ids), lm.device
    x = torch.tensor([ids], device=dev)

    clean = clean_run(lm, x, kinds, tpos)
    p_clean = clean.logits.float().softmax(-1)[0]
    tgt = resolve_target(lm, prompt, target, p_clean)
    cor = corrupted_run(lm, x, samples, tpos, [noise_patch(b, e, noise_t)])
    low = float(cor.logits.float().softmax(-1)[:, tgt].mean())
    probs, cell_job = run_grid(lm, kinds, b, window, samples, clean, cor, tgt, tpos, max_tokens)

    scores = {}
    for k in kinds:
        cj = cell_job[k]
        s = torch.full((T, N), low, dtype=torch.float32)
        s[cj >= 0] = probs[cj[cj >= 0]].float()
        scores[k] = s
    tok = lm.tokenizer
    return TraceResult(scores=scores, low=low, high=float(p_clean[tgt]), tokens=[tok.decode([i]) for i in ids],
                       input_ids=list(ids), subject_range=(b, e), target=tgt, answer=tok.decode([tgt]),
                       target_position=tpos, prompt=prompt, subject=subject, kinds=kinds, window=int(window),
                       samples=int(samples), noise=scale, seed=int(seed), model=str(lm.name))


def clean_run(lm: LM, x: torch.Tensor, kinds, tpos: int):
    """The clean run of ``x`` [1, T]: the restored sites of every layer, the
    logits at the target position."""
    sites = sorted({SITE_OF[k] for k in kinds})
    return lm.run(x, capture=[(s, L) for s in sites for L in range(lm.n_layers)],
                  logits=torch.tensor([tpos]).to(x.device))


def corrupted_run(lm: LM, x: torch.Tensor, samples: int, tpos: int, noise: list):
    """The corrupted run of ``samples`` copies of ``x`` [1, T] under the
    ``noise`` patches: every layer's input, the keys and values (decoders),
    the logits at the target position."""
    return lm.run(x.expand(samples, -1), patches=noise, capture=[("resid_pre", L) for L in range(lm.n_layers)],
                  return_kv=lm.adapter.causal, logits=torch.full((samples,), tpos).to(x.device))


def run_grid(lm: LM, kinds, b: int, window: int, samples: int, clean, cor, target: int, tpos: int,
             max_tokens: int, make_patches=None) -> tuple[torch.Tensor, dict]:
    """(mean target probability of each restoration job, each kind's [T, N]
    job index per cell; see :func:`_jobs`): every walk of :func:`walk_parts`
    over the clean and corrupted runs.

    ``make_patches(L, code, lo, hi, t, clean)`` builds the restorations of
    one slice of rows at layer L (default :func:`restore_patches`);
    kncore.planner runs this same walk on the meta device, where a patch that
    selects rows by index cannot run, and passes one that restores nothing
    (restorations are index copies, without FLOPs)."""
    ad = lm.adapter
    N = ad.n_layers
    inputs = [cor[("resid_pre", L)] for L in range(N)] + [cor.hidden]
    T = inputs[0].shape[1]
    job_list, cell_job = _jobs(kinds, T, N, b, window, ad.causal)
    host = "meta" if inputs[0].is_meta else "cpu"
    probs = torch.full((len(job_list),), float("nan"), device=host)
    firsts: dict = {}  # (code, layer) -> _first_layers, shared by the walks of every token
    for p0, part in walk_parts(job_list, ad.causal, samples, T, ad.d_model, inputs[0].element_size()):
        probs[part] = _walk(lm, [job_list[i] for i in part], p0, inputs, clean, cor.kv, samples, target, tpos,
                            max_tokens, firsts, make_patches or restore_patches)
    return probs, cell_job


def _jobs(kinds, T: int, N: int, b: int, window: int, causal: bool) -> tuple[list, dict]:
    """The distinct restorations of the grid, and for each kind [T, N] the index
    of the job behind each cell (-1: the cell's score is the corrupted one).
    Identical clipped windows are one job."""
    jobs: dict = {}
    cell_job = {k: torch.full((T, N), -1, dtype=torch.long) for k in kinds}
    for k in kinds:
        for t in range(T):
            if causal and t < b:
                continue  # the noise cannot reach a position before the subject: score == low
            for l in range(N):
                if k == "hidden":
                    key = (t, Restore.HIDDEN, l, l + 1, l + 1)
                else:
                    # Decoders: at a window's first layer only token t changes (attention
                    # there reads unchanged inputs), so the rows join one layer later
                    # with that one position computed alone (_first_layers).
                    r = window_layers(l, window, N)
                    key = (t, _CODE[k], r.start, r.stop, r.start + 1 if causal else r.start)
                cell_job[k][t, l] = jobs.setdefault(key, len(jobs))
    job_list = [_Job(*key) for key in jobs]
    longest: dict = {}  # (t, code, lo) -> the window job with the highest hi
    for j in job_list:
        if j.code != Restore.HIDDEN and j.hi > longest.setdefault((j.t, j.code, j.lo), j).hi:
            longest[(j.t, j.code, j.lo)] = j
    for j in job_list:
        p = longest.get((j.t, j.code, j.lo)) if j.code != Restore.HIDDEN else None
        if p is not None and p is not j and p.entry < j.hi:
            j.parent = p
    return job_list, cell_job


def walk_parts(job_list: list, causal: bool, samples: int, T: int, d_model: int, el: int) -> list:
    """The walks of a trace: ``[(p0, job indices)]``. One group per restored
    token (decoders; BERT: one group), jobs in entry order, split so that a
    walk's hidden states stay under STATE_BYTES (the longest window of a start
    first, so that the shorter ones it parents tend to share its walk)."""
    groups: dict = {}
    for i, j in enumerate(job_list):
        groups.setdefault(j.t if causal else 0, []).append(i)
    out = []
    for p0, idx in groups.items():
        idx.sort(key=lambda i: (job_list[i].entry, -job_list[i].hi))
        cap = max(1, STATE_BYTES // (samples * (T - p0) * d_model * el))
        out += [(p0, idx[c:c + cap]) for c in range(0, len(idx), cap)]
    return out


def walk_order(jobs: list) -> tuple[list, list, list]:
    """(order, jobs sorted by the layer they join at, those layers): a job
    whose parent is in the same walk joins at its hi, as a copy of the
    parent's rows; the others at their entry."""
    here = {id(j) for j in jobs}
    joins = [j.hi if (j.parent is not None and id(j.parent) in here) else j.entry for j in jobs]
    order = sorted(range(len(jobs)), key=lambda i: joins[i])
    return order, [jobs[i] for i in order], [joins[i] for i in order]


def walk_step(max_tokens: int, n: int) -> int:
    """Rows per runtime call of a walk computing n positions."""
    return max(1, max_tokens // n)


def _walk(lm: LM, jobs: list, p0: int, inputs: list, clean, kv, samples: int, target: int, tpos: int,
          max_tokens: int, firsts: dict, make_patches) -> torch.Tensor:
    """Mean target probability of each job; all jobs compute positions p0.. .

    Row r belongs to job r // samples and reads corrupted sample r % samples.
    Jobs are sorted by the layer they join at (a job whose parent is in this
    walk joins at its hi, as a copy of the parent's rows), so the rows alive at
    layer L are a prefix.
    The walk keeps each row's last hidden state at the target position; the
    head runs once over all of them at the end (:func:`_target_probs`).
    """
    ad = lm.adapter
    N, causal = ad.n_layers, ad.causal
    here = {id(j) for j in jobs}
    branch = lambda j: j.parent is not None and id(j.parent) in here
    order, jobs, joins = walk_order(jobs)
    row_of = {id(j): k * samples for k, j in enumerate(jobs)}
    J, S = len(jobs), samples
    R = J * S
    n = inputs[0].shape[1] - p0
    dev = inputs[0].device
    entry = torch.tensor(joins)
    field_of = lambda name: torch.tensor([getattr(j, name) for j in jobs]).repeat_interleave(S)
    code, lo, hi, tt = field_of("code"), field_of("lo"), field_of("hi"), field_of("t")
    # the cache rows of the slices: on the meta device (kncore.planner) they stay on
    # the CPU, where the runtime decides its row sharing as in the real run
    row_sample = torch.arange(S, device="cpu" if dev.type == "meta" else dev).repeat(J)
    past = kv.truncate(p0) if (causal and p0 > 0) else None
    step = walk_step(max_tokens, n)
    col = n - 1 if causal else tpos - p0  # the target position among the computed ones

    h = inputs[0].new_empty(R, n, inputs[0].shape[-1])
    final = inputs[0].new_empty(R, inputs[0].shape[-1])
    joined = 0
    for L in range(int(entry[0]), N + 1):
        upto = int(torch.searchsorted(entry, L, right=True))  # jobs with entry <= L
        if upto > joined:
            h[joined * S: upto * S] = inputs[L][:, p0:].repeat(upto - joined, 1, 1)
            for j in range(joined, upto):
                rows = slice(j * S, (j + 1) * S)
                if branch(jobs[j]):  # the parent's state before layer L = hi
                    first = row_of[id(jobs[j].parent)]
                    h[rows] = h[first:first + S]
                elif jobs[j].code == Restore.HIDDEN:  # restored block output of layer L-1
                    h[rows, jobs[j].t - p0] = clean[("resid_post", L - 1)][0, jobs[j].t]
                elif causal:  # a window whose first layer, L-1, changed token t = p0 only
                    key = (jobs[j].code, L - 1)
                    if key not in firsts:
                        firsts[key] = _first_layers(lm, L - 1, jobs[j].code, inputs, clean)
                    h[rows, 0] = firsts[key][:, p0]
            if L == N:  # rows that joined after the last layer: only the head is left
                final[joined * S: upto * S] = h[joined * S: upto * S, col]
            joined = upto
        if L == N:
            break
        active = joined * S
        for s in range(0, active, step):
            e = min(active, s + step)
            patches = make_patches(L, code[s:e], lo[s:e], hi[s:e], tt[s:e], clean)
            rows = None if past is None else row_sample[s:e]
            if L < N - 1:
                h[s:e] = lm.run(hidden=h[s:e], start_layer=L, stop_layer=L + 1, past=past, past_rows=rows,
                                patches=patches, logits=None).hidden
            # _top_layer projects keys and values itself, so patches held on the
            # adapter (kncore.patch_neurons) send it the plain way
            elif causal and n > 1 and not ad.persistent_patches:
                final[s:e] = _top_layer(lm, h[s:e], p0, past, rows, patches)
            else:
                final[s:e] = lm.run(hidden=h[s:e], start_layer=L, past=past, past_rows=rows, patches=patches,
                                    logits=None).hidden[:, col]
    means = _target_probs(ad, final, target).view(J, S).mean(1)
    out = torch.empty(J, device=means.device)
    out[torch.tensor(order, device=means.device)] = means
    return out


def _target_probs(ad, final: torch.Tensor, target: int) -> torch.Tensor:
    """softmax(head(final))[:, target] for hidden states [R, d], without writing
    a [R, vocab] softmax: exp(logit - max) / sum exp(logit - max), HEAD_BYTES
    of logits per call.
    One pass at the end of a walk: per slice, the head of a GPT-2-medium trace
    ran at about half the matmul rate (calls of 10 rows; [rows, vocab] logits
    over glibc's 32 MiB mmap threshold, fresh pages on every call).

    The normaliser sums exp(logit - max) in float64: a float32 sum over 50k
    terms moves with the order of summation (torch 2.13's CPU logsumexp gave
    the same logits a normaliser 2.8e-5 apart, on some first calls of a
    process and not others), and the float64 sum makes the score
    the same whatever the threads and the order."""
    step = max(1, HEAD_BYTES // (ad.vocab_size * 4))
    host = final.device if final.device.type == "meta" else "cpu"  # meta: kncore.planner's dry run
    out = torch.empty(final.shape[0], dtype=torch.float32, device=host)
    for s in range(0, final.shape[0], step):
        logits = ad.final(final[s:s + step]).float()
        top = logits.amax(-1, keepdim=True)
        num = (logits[:, target].double() - top[:, 0].double()).exp()
        out[s:s + step] = (num / _sum64(logits.sub_(top).exp_())).float().to(host)
    return out


def _sum64(x: torch.Tensor) -> torch.Tensor:
    """x.sum(-1) accumulated in float64 for float32 x [R, n], a few rows at a
    time: torch casts a float32 input to a float64 copy before such a sum, and
    the copy of a whole HEAD_BYTES slice would triple the head's memory."""
    z = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    rows = max(1, SUM64_BYTES // (x.shape[1] * 8))
    for i in range(0, x.shape[0], rows):
        z[i:i + rows] = x[i:i + rows].sum(-1, dtype=torch.float64)
    return z


def _first_layers(lm: LM, L: int, code: Restore, inputs: list, clean) -> torch.Tensor:
    """Output of layer L [S, T, d] where column t is token t's with its own
    mlp_out/attn_out restored (decoders). A restoration at layer L changes
    nothing but its own position there (it comes after attention), so one run
    restoring every position at once serves the windows of every token that
    start at L."""
    site = _PATCH_SITE[code]
    x = inputs[L]
    value = clean[(site, L)][0].repeat(x.shape[0], 1)  # [S*T, d], rows then positions
    return lm.run(hidden=x, start_layer=L, stop_layer=L + 1, patches=[Patch(site, L, value=value)],
                  logits=None).hidden


def _top_layer(lm: LM, h: torch.Tensor, p0: int, past, past_rows, patches) -> torch.Tensor:
    """Output of the last block at the last position only [B, d] (decoders).

    Nothing but the last position's output reaches the head, so the other
    positions need only their keys and values at this layer
    (:func:`kncore.runtime.keys_values`: 3 of GPT-2's 12 d^2 multiply-adds per position).
    """
    ad = lm.adapter
    L = ad.n_layers - 1
    B, n, _ = h.shape
    pos = torch.arange(p0, p0 + n - 1, device=h.device)[None].expand(B, -1)
    k, v = keys_values(ad, L, h[:, :-1], pos)
    if past is not None:
        k = torch.cat([past.k[L][past_rows].to(k.dtype), k], dim=2)
        v = torch.cat([past.v[L][past_rows].to(v.dtype), v], dim=2)
    cache = KVCache([None] * L + [k], [None] * L + [v])
    return lm.run(hidden=h[:, -1:], start_layer=L, past=cache, patches=patches, logits=None).hidden[:, 0]


def restore_patches(L, code, lo, hi, tt, clean) -> list:
    """Restorations at layer L for one slice of rows (row indices local to it)."""
    ps = []
    for c, site in _PATCH_SITE.items():
        m = (code == c) & (lo <= L) & (L < hi)
        if not bool(m.any()):
            continue
        for t in tt[m].unique().tolist():
            rows = (m & (tt == t)).nonzero().flatten()
            ps.append(Patch(site, L, positions=t, rows=rows, value=clean[(site, L)][0, t]))
    return ps
