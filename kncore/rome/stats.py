"""ROME's layer statistics: the second moment C = E[k k^T] of the keys k (the
input of the MLP down-projection, runtime site ``act``) over a text corpus.

One pass over the corpus serves every requested layer: the forward stops after
the last of them and the keys of each go straight into a covariance
accumulator (``kncore.ops.cov_accumulate``), so memory stays bounded by one
batch of activations plus one d_ff x d_ff matrix per layer. Padding is masked
out, and texts are sorted by length inside chunks of ``chunk_texts`` texts
before being cut into batches of at most ``batch_tokens`` (padded) tokens.

``n_samples`` counts texts, as ROME's ``mom2_n_samples`` does (ROME: 100,000
Wikipedia texts); each text is truncated to ``max_length`` tokens (ROME: the
model's context, 1024 for GPT-2 XL and 2048 for GPT-J; here
``min(context, 2048)`` by default). Empty texts are skipped and not counted.

Results are cached (one safetensors file per layer, JSON metadata in its
header: model fingerprint, layer, corpus identity, n_samples, max_length,
dtype, tokenizer). The cache is addressed by content, never by a path: the
file's folder is the model fingerprint and the corpus digest, and its name
ends in a hash of the whole identity (fingerprint, a hash of the tokenizer's
vocabulary and merges, corpus kind and SHA-256, settings), so the same
request finds the same file whichever path the model, tokenizer or corpus
was loaded from, and a different one never collides with it. Every file is
written atomically with a SHA-256 sidecar (:mod:`kncore.atomic`) and
verified when read: a damaged or unmatched cache file is set aside and
recomputed, with a warning naming it. ``recompute=True`` recomputes anyway.

A long run checkpoints its partial sums every ``checkpoint_every`` batches
(one atomic file per rank); calling :func:`layer_stats` again with the same
arguments resumes from the checkpoint and gives the same sums as an
uninterrupted run (the batches are the same and are added in the same order).

Under ``torchrun`` (``torch.distributed`` initialised) rank r takes texts
r, r + W, r + 2W, ... and the partial sums are all-reduced; rank 0 writes
the cache.

**Convergence.** Given probe keys (``probe_keys``: keys at each layer, for
example the subjects of the edits, :func:`probe_keys_for`), the stream measures
how far C still moves what an editor reads from it: every ``check_every``
tokens it solves u = C'^-1 k for each probe key (C' = C + ``probe_reg`` x
mean(diag C) x I, the editors' ``mom2_reg``) and records the relative change
max_k ||u - u_prev|| / ||u|| against the previous check, the largest over
probes and layers. Checks fall at the end of a chunk of ``chunk_texts``
texts (the first chunk end with at least ``check_every`` new tokens), because
only there does the sum equal the sum over the first n texts of the corpus:
a run stopped there gives the statistics of those n texts, the same
batches added in the same order as ``n_samples=n``. With
``until="converged"`` the stream stops after two checks in a row below
``tol``. The file records the tokens used, the change at the stop and the
whole history; such a file has its own identity (the probes, tolerance,
check interval, chunking and layers are part of it), so it is never served
for a full-statistics request, nor a full file for a converged one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import distributed as dist
from .. import validation as V
from ..atomic import CorruptFile, atomic_write, read_verified, set_aside, sidecar_path
from ..lm import InputError
from .corpus import Corpus, open_corpus, take

log = logging.getLogger("kncore")

# 2: content-addressed file names, tokenizer identified by a hash, SHA-256 sidecars
FORMAT = 2
_META_KEY = "kncore_rome_stats"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Not tuned yet: ROME batches 3 x n_ctx tokens (3072 for GPT-2); 4096 keeps a
# SmolLM2 batch's keys at 25 MB per layer. bench/bench_rome.py measures it.
DEFAULT_BATCH_TOKENS = 4096
# Texts sorted by length together; bigger chunks pad less but hold more token ids.
DEFAULT_CHUNK_TEXTS = 1024
# Batches between checkpoints: a checkpoint writes d_ff^2 floats per layer
# (1 GB for GPT-J in fp32), so not too often.
DEFAULT_CHECKPOINT_EVERY = 64


class StatsCacheMismatch(InputError):
    """A statistics file was computed for another model, corpus or setting."""


@dataclass
class LayerStats:
    """Second moment of the keys at one layer.

    ``second_moment`` is E[k k^T] over every real token ([d_ff, d_ff], full,
    symmetric), ``mean`` is E[k]; ``meta`` says what they were computed from.
    """

    layer: int
    second_moment: torch.Tensor
    mean: torch.Tensor
    n_tokens: int
    n_texts: int
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def convergence(self) -> dict | None:
        """The convergence record (probes, history of checks, change at the stop), if
        the statistics were streamed with probe keys."""
        return self.meta.get("convergence")

    @property
    def key(self) -> str:
        """A hash of what the statistics were computed from (for in-memory caches)."""
        return _digest(_identity(self.meta))

    @classmethod
    def from_tensor(cls, layer: int, C: torch.Tensor, n_tokens: int | None = None) -> "LayerStats":
        """Wrap a second-moment matrix the caller computed (no cache identity)."""
        if C.dim() != 2 or C.shape[0] != C.shape[1]:
            raise InputError(f"a second moment must be a square matrix, got shape {tuple(C.shape)}")
        return cls(layer, C, C.new_zeros(C.shape[0]), -1 if n_tokens is None else n_tokens, -1,
                   {"layer": layer, "source": "tensor", "id": id(C)})


def cache_dir_default() -> Path:
    from ..loading import cache_root
    return cache_root() / "rome_stats"


def _tokenizer_id(lm) -> dict:
    """The tokenizer's content identity (see :meth:`kncore.lm.LM.tokenizer_fingerprint`)."""
    return {"sha256": lm.tokenizer_fingerprint(), "vocab": len(lm.tokenizer), "bos": lm.bos}


# Fields that describe a result (counts, timing) or label it (the model's name or
# path, the corpus's path): recorded, never part of the identity.
_NOT_IDENTITY = ("model", "n_tokens", "n_texts", "seconds", "position", "done", "convergence", "monitor")


def _identity(meta: dict) -> dict:
    """What a statistics file's numbers depend on: its metadata less labels and results."""
    out = {k: v for k, v in meta.items() if k not in _NOT_IDENTITY}
    if isinstance(out.get("corpus"), dict):
        out["corpus"] = {k: v for k, v in out["corpus"].items() if k != "name"}
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_save(tensors: dict, meta: dict, path: Path) -> None:
    """Write a statistics or checkpoint file through kncore's one atomic,
    checksummed write (a ``.sha256`` sidecar beside it)."""
    from safetensors.torch import save_file
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata={_META_KEY: json.dumps(meta, sort_keys=True)}),
                 sidecar=True)


def _meta_of(path, header_bytes: bytes) -> dict:
    """The kncore metadata in a safetensors header (``header_bytes``: the file's start)."""
    try:
        n = int.from_bytes(header_bytes[:8], "little")
        header = json.loads(header_bytes[8:8 + n])
        raw = (header.get("__metadata__") or {}).get(_META_KEY)
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a readable kncore statistics file: {e}") from None
    if raw is None:
        raise InputError(f"{path} is not a kncore ROME statistics file (no {_META_KEY} metadata)")
    return json.loads(raw)


def read_meta(path) -> dict:
    """The JSON metadata of a statistics (or checkpoint) file (header only, not verified)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            return _meta_of(path, head + f.read(int.from_bytes(head, "little") if len(head) == 8 else 0))
    except OSError as e:
        raise InputError(f"cannot read statistics file {path}: {e.strerror}") from None


def _read_checked(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of a statistics or checkpoint file, after checking its
    bytes against its sidecar's SHA-256 (CorruptFile naming it otherwise)."""
    from safetensors.torch import load
    data = read_verified(path)
    meta = _meta_of(path, data)
    try:
        return meta, load(data)
    except Exception as e:  # noqa: BLE001 - a file whose checksum matches but safetensors refuses
        raise CorruptFile(path, f"is not a readable safetensors file ({e})") from None


def _diff(found: dict, want: dict) -> list[str]:
    found, want = _identity(found), _identity(want)
    keys = sorted(set(found) | set(want))
    return [f"{k}: file has {found.get(k)!r}, wanted {want.get(k)!r}" for k in keys if found.get(k) != want.get(k)]


def load_stats(path, lm=None, layer: int | None = None) -> LayerStats:
    """Load a statistics file (verified against its checksum); with ``lm``
    (and ``layer``) check that it was computed on this model (same weights
    and tokenizer content) and layer."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"statistics file {path} does not exist")
    try:
        meta, t = _read_checked(path)
    except CorruptFile as e:
        raise CorruptFile(e.path, e.problem, "delete it and compute the statistics again (kncore stats, or "
                                             "kncore.rome.layer_stats, which also rebuilds a damaged cache file)"
                          ) from None
    if meta.get("kind") != "stats":
        raise InputError(f"{path} is a {meta.get('kind')!r} file, not layer statistics")
    if lm is not None:
        want = {"fingerprint": lm.fingerprint(), "tokenizer": _tokenizer_id(lm)}
        bad = [d for d in _diff({k: meta.get(k) for k in want}, want)]
        if bad:
            raise StatsCacheMismatch(f"statistics file {path} was computed for model {meta.get('model')!r}, "
                                     f"not this one ({lm.name!r}): " + "; ".join(bad) + "; compute statistics "
                                     "for this model (kncore stats --model ..., or layer_stats) and pass those")
    if layer is not None and meta.get("layer") != layer:
        raise StatsCacheMismatch(f"statistics file {path} is for layer {meta.get('layer')}, not layer {layer}: "
                                 f"give the file of layer {layer}, or compute it (kncore stats --layers {layer})")
    return LayerStats(meta["layer"], t["second_moment"], t["mean"], meta["n_tokens"], meta["n_texts"], meta, path)


def _encode(lm, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of each text with the model's special tokens (the same BOS
    policy as :meth:`LM.tokenize`), truncated to ``max_len``."""
    tok = lm.tokenizer
    enc = tok(list(texts), add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]
    bos = tok.bos_token_id
    out = []
    for ids in enc:
        ids = list(ids)
        if lm.bos is True and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids[: max_len - 1]
        elif lm.bos is False and bos is not None and ids and ids[0] == bos:
            ids = ids[1:]
        if ids:
            out.append(ids)
    return out


def _batches(seqs: list[list[int]], batch_tokens: int) -> list[list[int]]:
    """Indices of seqs, longest first, cut into batches of <= batch_tokens padded tokens."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # stable: ties keep corpus order
    out, cur, width = [], [], 0
    for i in order:
        n = len(seqs[i])
        if cur and (len(cur) + 1) * width > batch_tokens:
            out.append(cur)
            cur = []
        if not cur:
            width = n
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _chunks(texts, size: int):
    buf = []
    for t in texts:
        buf.append(t)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def _progress_fn(progress, total: int | None):
    """progress: True (a tqdm bar), False/None (silent) or a callable(info)."""
    if callable(progress):
        return progress, lambda: None
    if not progress:
        return (lambda info: None), (lambda: None)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        last = [0.0]

        def log_fn(info):
            if time.time() - last[0] > 10:
                last[0] = time.time()
                log.info("layer stats: %d texts, %d tokens", info["texts"], info["tokens"])
        return log_fn, lambda: None
    bar = tqdm(total=total, unit="text", desc="layer stats")
    seen = [0]

    def bar_fn(info):
        bar.update(info["texts"] - seen[0])
        seen[0] = info["texts"]
    return bar_fn, bar.close


def _new_acc(d: int, dtype, device):
    from ..ops.cov_accumulate import CovAccumulator
    return CovAccumulator(d, dtype=dtype, device=device)


def _acc_from_state(acc, state: dict):
    return acc.load_state_dict({k: v.to(acc.C.device) for k, v in state.items()})


# -- convergence ------------------------------------------------------------------------------
UNTIL = (None, "converged")
# Checks below tol in a row before a run with until="converged" stops: one check can
# fall below by chance when a few texts happen to resemble the last ones.
CONVERGED_CHECKS = 2
# Texts per chunk when probes are given and chunk_texts is not: checks fall at chunk
# ends, and 1024 pydoc texts (~110k SmolLM2 tokens, the whole corpus) would allow one
# check; 16 are ~2,300 SmolLM2 tokens, about one check per d_ff (1536) tokens.
PROBE_CHUNK_TEXTS = 16


def probe_keys_for(lm, requests, layers, fact_token: str = "subject_last") -> dict[int, torch.Tensor]:
    """Probe keys for :func:`layer_stats`: the key (down-projection input) at each of
    ``layers`` at the subject token of each request's bare prompt, the key an edit of
    that request reads. ``requests``: edit requests (ROME's dicts, CounterFact
    records, :class:`kncore.rome.Request`) or a fact set's. Returns ``{layer: [P, d_ff]}``."""
    from .editing import locate, parse_request
    layers = [layers] if isinstance(layers, int) else sorted(set(layers))
    if not layers:
        raise InputError("no layers given for the probe keys")
    for L in layers:
        if not isinstance(L, int) or not 0 <= L < lm.n_layers:
            raise InputError(f"layer {L!r} is outside the model's {lm.n_layers} layers")
    if isinstance(requests, dict):
        requests = [requests]
    requests = list(requests)
    if not requests:
        raise InputError("no requests given to build probe keys from")
    rows = []
    for r in requests:
        req = parse_request(r)
        rows.append(locate(lm, req.prompt, req.subject, fact_token))
    out: dict[int, list] = {L: [] for L in layers}
    with torch.inference_mode():
        for c in range(0, len(rows), 256):
            part = rows[c:c + 256]
            b = lm.batch_ids([ids for ids, _ in part])
            pos = torch.tensor([p for _, p in part], device=lm.device)
            o = lm.run(b.input_ids, attention_mask=b.attention_mask, stop_layer=max(layers) + 1, logits=None,
                       capture=[("act", L) for L in layers], capture_positions=pos)
            for L in layers:
                out[L].append(o[("act", L)][:, 0].float().cpu())
    return {L: torch.cat(v) for L, v in out.items()}


def _check_probes(lm, layers, probe_keys) -> dict[int, torch.Tensor]:
    if isinstance(probe_keys, torch.Tensor):
        if len(layers) != 1:
            raise InputError(f"one probe-key tensor given for layers {layers}; pass a dict {{layer: keys}}")
        probe_keys = {layers[0]: probe_keys}
    if not isinstance(probe_keys, dict):
        raise InputError(f"probe_keys must be a dict {{layer: [P, d_ff] tensor}}, not {type(probe_keys).__name__}")
    missing = [L for L in layers if L not in probe_keys]
    if missing:
        raise InputError(f"no probe keys for layers {missing} (have {sorted(probe_keys)}); build them with "
                         "probe_keys_for(lm, requests, layers)")
    out = {}
    for L in layers:
        k = probe_keys[L]
        if not isinstance(k, torch.Tensor):
            raise InputError(f"probe keys of layer {L} must be a tensor, not {type(k).__name__}")
        if k.dim() == 1:
            k = k[None]
        if k.dim() != 2 or k.shape[1] != lm.d_ff or k.shape[0] == 0:
            raise InputError(f"probe keys of layer {L} must be [P, {lm.d_ff}] with P >= 1, got {tuple(k.shape)}")
        k = k.detach().to(torch.float64)
        if not torch.isfinite(k).all():
            raise InputError(f"probe keys of layer {L} hold NaN or infinite values")
        if bool((k.norm(dim=1) == 0).any()):
            raise InputError(f"a probe key of layer {L} is all zeros (C^-1 0 has no direction to follow)")
        out[L] = k
    return out


def _probe_digest(keys: dict[int, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for L in sorted(keys):
        k = keys[L].contiguous().cpu()
        h.update(f"{L}:{tuple(k.shape)}:".encode())
        h.update(k.numpy().tobytes())
    return h.hexdigest()[:16]


class _Monitor:
    """Relative change of C'^-1 k for the probe keys, every ``every`` tokens (at chunk ends)."""

    def __init__(self, keys: dict, every: int, until, tol: float, reg: float, device):
        self.keys = {L: k.to(device).T.contiguous() for L, k in keys.items()}  # [d_ff, P] float64
        self.every, self.until, self.tol, self.reg = every, until, tol, reg
        self.prev: dict = {}
        self.last = 0          # tokens at the last check
        self.below = 0         # checks in a row below tol
        self.history: list = []
        self.stopped = False

    def due(self, tokens: int) -> bool:
        return tokens - self.last >= self.every

    def check(self, accs: dict, done: dict) -> bool:
        """Measure now; True when the stream should stop."""
        changes = {}
        for L, acc in accs.items():
            C = acc.second_moment().to(torch.float64)
            if self.reg > 0:
                C.diagonal().add_(self.reg * C.diagonal().mean())
            Lf, info = torch.linalg.cholesky_ex(C)
            if int(info) != 0:  # fewer tokens than key dimensions, or rank-deficient so far
                self.prev.pop(L, None)
                changes[str(L)] = None
                continue
            U = torch.cholesky_solve(self.keys[L], Lf)
            prev = self.prev.get(L)
            self.prev[L] = U
            if prev is None:
                changes[str(L)] = None
                continue
            rel = (U - prev).norm(dim=0) / U.norm(dim=0)
            changes[str(L)] = float(rel.max())
        vals = list(changes.values())
        worst = None if any(v is None for v in vals) else max(vals)
        self.below = self.below + 1 if worst is not None and worst < self.tol else 0
        self.last = done["tokens"]
        self.history.append({"tokens": done["tokens"], "texts": done["texts"], "change": worst, "layers": changes})
        log.info("layer stats: %d tokens, %d texts: probe change %s", done["tokens"], done["texts"],
                 "n/a" if worst is None else f"{worst:.3g}")
        if self.until == "converged" and self.below >= CONVERGED_CHECKS:
            self.stopped = True
        return self.stopped

    def state(self) -> tuple[dict, dict]:
        """(tensors, JSON) to checkpoint; :meth:`restore` takes them back."""
        tensors = {f"L{L}.probe_prev": U for L, U in self.prev.items()}
        return tensors, {"last": self.last, "below": self.below, "history": self.history}

    def restore(self, tensors: dict, state: dict) -> None:
        self.prev = {L: tensors[f"L{L}.probe_prev"].to(self.keys[L].device) for L in self.keys
                     if f"L{L}.probe_prev" in tensors}
        self.last, self.below, self.history = state["last"], state["below"], list(state["history"])

    def record(self, identity: dict) -> dict:
        last = self.history[-1]["change"] if self.history else None
        return dict(identity, history=self.history, stopped=self.stopped, change_at_stop=last,
                    checks=len(self.history))


def layer_stats(lm, layers, corpus=None, *, n_samples: int | None = 100000, dtype="float32",
                cache_dir=None, batch_tokens: int = DEFAULT_BATCH_TOKENS, max_length: int | None = None,
                progress=True, recompute: bool = False, use_cache: bool = True,
                checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                chunk_texts: int | None = None, probe_keys=None, check_every: int | None = None,
                until: str | None = None, tol: float = 1e-2, probe_reg: float = 0.0) -> dict[int, LayerStats]:
    """Second moments E[k k^T] of the down-projection inputs at ``layers``.

    ``corpus``: see :mod:`kncore.rome.corpus` (None: the built-in ``"pydoc"``).
    ``n_samples``: number of texts (None: all). ``dtype``: accumulation dtype,
    ``"float32"`` (ROME's default) or ``"float64"``. ``cache_dir``: where the
    results and checkpoints live (default ``$KNCORE_CACHE/rome_stats``);
    ``use_cache=False`` neither reads nor writes anything. The cache is
    addressed by content (see the module doc); ``recompute``: compute again
    and overwrite the cached file even when it checks out.
    ``progress``: True (a bar), False, or a callable given after every batch a
    dict with ``batches``, ``texts``, ``tokens`` (and ``change``, the last
    probe change, when probes are given). ``chunk_texts``: texts sorted by
    length together (default 1024; 16 with probes).

    Convergence (module doc): ``probe_keys`` ``{layer: [P, d_ff]}`` (see
    :func:`probe_keys_for`) turns on a check every ``check_every`` tokens
    (default: d_ff), with ``probe_reg`` the editors' ``mom2_reg``; each
    result's ``convergence`` holds the history. ``until="converged"`` stops
    after two checks in a row with a change below ``tol``; ``n_samples``
    then caps the texts read. Returns ``{layer: LayerStats}``.
    """
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers:
        raise InputError("no layers given")
    for L in layers:
        if not isinstance(L, int) or not 0 <= L < lm.n_layers:
            raise InputError(f"layer {L!r} is outside the model's {lm.n_layers} layers")
    layers = sorted(set(layers))
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    if dtype not in _DTYPES:
        raise InputError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    V.check_all(n_samples=n_samples, batch_tokens=batch_tokens)
    if until not in UNTIL:
        raise InputError(f"until must be None or 'converged', got {until!r}")
    if probe_keys is None:
        if until is not None:
            raise InputError("until='converged' needs probe_keys: the keys whose C^-1 k must settle "
                             "(probe_keys_for(lm, requests, layers))")
        if check_every is not None:
            raise InputError("check_every needs probe_keys: the convergence checks measure C^-1 k for them")
    monitor = None
    conv_id = None
    if probe_keys is not None:
        if dist.world() > 1:
            # Each rank sees every W-th text, so a check needs every rank at the same
            # chunk end, and a streamed corpus does not say how many chunks each rank gets.
            raise InputError("probe keys (convergence checks) do not run under torchrun: compute converged "
                             "statistics in one process, then share the cached file")
        check_every = lm.d_ff if check_every is None else V.check("check_every", check_every)
        tol = V.check("tol", tol)
        probe_reg = V.check("probe_reg", probe_reg)
        keys = _check_probes(lm, layers, probe_keys)
        conv_id = {"probes": _probe_digest(keys), "n_probes": {str(L): int(k.shape[0]) for L, k in keys.items()},
                   "check_every": check_every, "probe_reg": probe_reg, "until": until}
        if until is not None:
            conv_id["tol"] = tol
    if chunk_texts is None:
        chunk_texts = DEFAULT_CHUNK_TEXTS if probe_keys is None else PROBE_CHUNK_TEXTS
    if chunk_texts < 1 or checkpoint_every < 1:
        raise InputError("chunk_texts and checkpoint_every must be >= 1")
    max_len = min(lm.adapter.n_ctx, 2048) if max_length is None else int(max_length)
    if not 1 <= max_len <= lm.adapter.n_ctx:
        raise InputError(f"max_length {max_length} outside 1..{lm.adapter.n_ctx} (the model's context)")

    corp = open_corpus(corpus, n_samples)
    if n_samples is not None and corp.kind != "hf":
        # A file named n2000 must hold 2000 texts: a corpus with fewer gives all of
        # them, said and named for what it holds (hf corpora stream, and are not counted).
        have = sum(1 for _ in take(corp, n_samples))
        if have < n_samples:
            log.warning("the corpus %s holds %d texts, fewer than the %d asked for: the statistics use all %d",
                        corp.name, have, n_samples, have)
            n_samples = have
    base = {"format": FORMAT, "kind": "stats", "model": lm.name, "fingerprint": lm.fingerprint(),
            "tokenizer": _tokenizer_id(lm), "site": "act", "corpus": corp.identity, "n_samples": n_samples,
            "max_length": max_len, "dtype": dtype}
    if until == "converged":
        # Where the stream stops depends on the probes, the tolerance, the check
        # interval, the chunking and which layers stop together: all of it is the
        # identity of a converged file, and the "until" key keeps it apart from
        # every full-statistics file.
        base["until"] = dict(conv_id, chunk_texts=chunk_texts, layers=layers)
    if monitor is None and conv_id is not None:
        monitor = _Monitor(keys, check_every, until, tol, probe_reg, lm.device)
    root = ident = None
    if use_cache:
        # content-addressed: model fingerprint / corpus digest / settings + identity hash
        root = (Path(cache_dir if cache_dir is not None else cache_dir_default()) / lm.fingerprint()
                / f"{corp.kind}-{corp.digest[:12]}")
        ident = _digest(_identity(base))
    tag = "-conv" if until == "converged" else ""
    result: dict[int, LayerStats] = {}
    todo = []
    for L in layers:
        path = (None if root is None else
                root / f"layer{L}-{dtype}-n{n_samples or 'all'}-t{max_len}{tag}-{ident}.safetensors")
        if path is not None and not recompute and (path.exists() or sidecar_path(path).exists()):
            try:
                st = load_stats(path)
                bad = _diff(st.meta, dict(base, layer=L))
                if not bad:
                    result[L] = st
                    continue
                problem = "was made for another request (" + "; ".join(bad) + ")"
            except InputError as e:  # damaged, truncated, no checksum: rebuilt
                problem = getattr(e, "problem", str(e))
            moved = set_aside(path)
            log.warning("cached statistics %s %s; set aside as %s and recomputing them", path, problem, moved)
        todo.append((L, path))
    if until == "converged" and todo and len(todo) < len(layers):
        # the layers stop together, so a missing one means computing them all again
        todo = [(L, p) for L, p in todo] + [(L, result.pop(L).path) for L in layers if L in result]
        todo.sort()
    if todo:
        computed = _compute(lm, [L for L, _ in todo], corp, n_samples, dtype, max_len, batch_tokens,
                            chunk_texts, checkpoint_every, root, base, progress, ident, monitor, conv_id)
        for L, path in todo:
            st = computed[L]
            if path is not None and dist.rank() == 0:
                _atomic_save({"second_moment": st.second_moment, "mean": st.mean}, st.meta, path)
                st.path = path
            result[L] = st
        dist.barrier()
    return result


def _compute(lm, layers, corp: Corpus, n_samples, dtype, max_len, batch_tokens, chunk_texts,
             checkpoint_every, root, base, progress, ident=None, monitor=None, conv_id=None) -> dict[int, LayerStats]:
    r, w = dist.rank(), dist.world()
    dev = lm.device
    acc_dtype = _DTYPES[dtype]
    d_ff = lm.d_ff
    ckpt_meta = dict(base, kind="checkpoint", layers=layers, batch_tokens=batch_tokens,
                     chunk_texts=chunk_texts, rank=r, world=w)
    if conv_id is not None:
        ckpt_meta["probes"] = conv_id  # a monitored run resumes only its own checkpoint (it holds the history)
    ckpt = None
    if root is not None:
        tag = "-".join(map(str, layers))
        ptag = "" if conv_id is None else f"-p{_digest(conv_id)[:8]}"
        ckpt = root / f"partial-L{tag}-{dtype}-n{n_samples or 'all'}-t{max_len}-{ident}{ptag}-r{r}of{w}.safetensors"
    accs = {L: _new_acc(d_ff, acc_dtype, dev) for L in layers}
    start = (0, 0)  # (chunk, batch) to resume from
    done = {"batches": 0, "texts": 0, "tokens": 0}
    if ckpt is not None and (ckpt.exists() or sidecar_path(ckpt).exists()):
        try:
            found, t = _read_checked(ckpt)
            bad = _diff(found, ckpt_meta)
            if not bad and monitor is not None and "monitor" not in found:
                bad = ["the checkpoint holds no convergence history"]
        except InputError as e:  # damaged or truncated: start over (the sums restart from zero)
            found, bad = None, [getattr(e, "problem", str(e))]
        if bad:
            moved = set_aside(ckpt)
            log.warning("checkpoint %s is unusable (%s); set aside as %s, starting the statistics from the first "
                        "text", ckpt, "; ".join(bad), moved)
        else:
            for L in layers:
                pre = f"L{L}."
                _acc_from_state(accs[L], {k[len(pre):]: v for k, v in t.items()
                                          if k.startswith(pre) and k[len(pre):] in ("C", "s", "n")})
            if monitor is not None:
                monitor.restore(t, found["monitor"])
            start = tuple(found["position"])
            done = dict(found["done"])
            log.info("resuming layer statistics from %s at chunk %d batch %d", ckpt, *start)

    total = None if n_samples is None else -(-n_samples // w) if w > 1 else n_samples
    report, close = _progress_fn(progress, total)
    stop = max(layers) + 1
    caps = [("act", L) for L in layers]
    t0 = time.time()
    texts = take(corp, n_samples)
    if w > 1:
        texts = (t for i, t in enumerate(texts) if i % w == r)
    halted = False
    try:
        with torch.inference_mode():
            for ci, chunk in enumerate(_chunks(texts, chunk_texts)):
                if ci < start[0]:
                    continue
                seqs = _encode(lm, chunk, max_len)
                batches = _batches(seqs, batch_tokens)
                for bi, idx in enumerate(batches):
                    if (ci, bi) < start:
                        continue
                    b = lm.batch_ids([seqs[i] for i in idx])
                    out = lm.run(b.input_ids, attention_mask=b.attention_mask, stop_layer=stop,
                                 logits=None, capture=caps)
                    mask = b.attention_mask.reshape(-1)
                    for L in layers:
                        X = out.captured[("act", L)].reshape(-1, d_ff)
                        if X.dtype == torch.float64 and acc_dtype != torch.float64:
                            X = X.to(acc_dtype)  # the op refuses to narrow silently
                        accs[L].update(X, mask)
                    del out
                    done["batches"] += 1
                    done["tokens"] += int(b.lengths.sum())
                    if bi == len(batches) - 1:
                        done["texts"] += len(chunk)
                        # a chunk end: the sums are those of the first done["texts"] texts
                        if monitor is not None and monitor.due(done["tokens"]):
                            halted = monitor.check(accs, done)
                    if ckpt is not None and not halted and done["batches"] % checkpoint_every == 0:
                        nxt = (ci, bi + 1) if bi + 1 < len(batches) else (ci + 1, 0)
                        _save_ckpt(ckpt, accs, dict(ckpt_meta, position=list(nxt), done=done), monitor)
                    info = dict(done)
                    if monitor is not None and monitor.history:
                        info["change"] = monitor.history[-1]["change"]
                    report(info)
                if halted:
                    break
    finally:
        close()
    if monitor is not None and not halted and done["tokens"] > monitor.last:
        monitor.check(accs, done)  # the change at the end of the corpus (the stop of a full run)
    for acc in accs.values():
        acc.all_reduce()
    n_texts = torch.tensor([done["texts"]], dtype=torch.long)
    dist.all_reduce_(n_texts)
    seconds = time.time() - t0
    out = {}
    for L in layers:
        acc = accs[L]
        n_tok = int(acc.n)
        if n_tok == 0:
            raise InputError("the corpus gave no tokens")
        meta = dict(base, layer=L, n_tokens=n_tok, n_texts=int(n_texts), seconds=round(seconds, 3))
        if monitor is not None:
            meta["convergence"] = monitor.record(conv_id)
        out[L] = LayerStats(L, acc.second_moment(), acc.mean(), n_tok, int(n_texts), meta)
    if ckpt is not None:
        for p in (ckpt, sidecar_path(ckpt)):
            if p.exists():
                p.unlink()
    return out


def _save_ckpt(path: Path, accs: dict, meta: dict, monitor=None) -> None:
    tensors = {}
    for L, acc in accs.items():
        for k, v in acc.state_dict().items():
            tensors[f"L{L}.{k}"] = v
    if monitor is not None:
        extra, state = monitor.state()
        tensors.update(extra)
        meta = dict(meta, monitor=state)
    _atomic_save(tensors, meta, path)
