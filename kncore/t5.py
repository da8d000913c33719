"""Methods on T5 (encoder-decoder): logits, KN attribution, KN edits and causal tracing.

The prompt is the encoder's input; the target is teacher-forced in the
decoder with the decoder input shifted right (``decoder_start_token_id``
first), so decoder position q predicts target[q]. Every function drives
:mod:`kncore.runtime_t5`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .attribution import Attribution, expand_steps, reduce_steps, scheme_points, _check_prompts, _probs
from .lm import LM, InputError
from .models.t5 import T5Adapter
from .runtime import KVCache, Patch
from .runtime_t5 import decode, encode, shift_right
from .selection import KNSet

STACKS = ("decoder", "encoder")


def adapter(lm: LM) -> T5Adapter:
    """The T5 adapter of ``lm``, or a one-line error for any other model."""
    ad = lm.adapter
    if not isinstance(ad, T5Adapter):
        raise InputError(f"kncore.t5 needs a T5 model; {lm.name!r} is {ad.arch!r} (use the decoder-only methods)")
    return ad


def target_ids(lm: LM, target: str) -> list:
    """Token ids of a target (tokenised alone, no special tokens; T5's
    sentencepiece marks the word start itself)."""
    ad = adapter(lm)
    if not isinstance(target, str) or not target.strip():
        raise InputError("empty target")
    ids = list(lm.tokenizer(target.strip(), add_special_tokens=False)["input_ids"])
    if not ids:
        raise InputError(f"target {target!r} tokenises to nothing")
    if len(ids) > ad.n_ctx:
        raise InputError(f"target {target!r} is {len(ids)} tokens, longer than the decoder context of {ad.n_ctx}")
    return ids


def _pair(lm: LM, prompt: str, target: str):
    """(encoder ids [1, S], target ids [1, T], decoder input ids [1, T])."""
    ad = adapter(lm)
    enc = torch.tensor([lm.tokenize(prompt)], device=lm.device)
    tgt = torch.tensor([target_ids(lm, target)], device=lm.device)
    return enc, tgt, shift_right(ad, tgt)


@torch.no_grad()
def target_probs(lm: LM, prompt: str, target: str, patches=(), enc_patches=()) -> torch.Tensor:
    """P(target[q] | prompt, target[:q]) for every target token q, fp32 [T]."""
    ad = adapter(lm)
    enc_ids, tgt, dec_in = _pair(lm, prompt, target)
    enc = encode(ad, enc_ids, patches=enc_patches)
    logits = decode(ad, dec_in, enc=enc, patches=patches).logits[0]
    return _probs(logits).gather(1, tgt[0][:, None])[:, 0].float()


@torch.no_grad()
def top_k(lm: LM, prompt: str, k: int = 5, patches=(), enc_patches=()) -> list:
    """The k most likely first target tokens (decoder position 0)."""
    ad = adapter(lm)
    enc = encode(ad, torch.tensor([lm.tokenize(prompt)], device=lm.device), patches=enc_patches)
    start = torch.tensor([[ad.start_id]], device=lm.device)
    p = _probs(decode(ad, start, enc=enc, patches=patches).logits[0, 0])
    v, i = p.topk(k)
    return [(lm.tokenizer.decode([int(t)]), float(x)) for t, x in zip(i, v)]


# -- teacher-forced scoring (kncore.evaluation's scorer on T5) ------------------------------
def score_request(lm: LM, prompt: str, target: str):
    """(row key, scored decoder positions, target ids) of one (prompt, target):
    the key is (encoder ids, decoder input ids), the decoder input the target
    shifted right, so decoder position q is scored on target[q]."""
    ad = adapter(lm)
    tids = target_ids(lm, target)
    dec_in = [ad.start_id] + tids[:-1]
    return (tuple(lm.tokenize(prompt)), tuple(dec_in)), list(range(len(tids))), tids


def logprobs_at(lm: LM, keys: Sequence, where: torch.Tensor, patches=()) -> torch.Tensor:
    """Log-probabilities [len(where), V] at (row, decoder position) pairs
    ``where`` [n, 2] of one batch of :func:`score_request` keys: the encoder
    inputs and decoder inputs right-padded, one encoder pass and one decoder
    pass; ``patches`` apply to the decoder (as :func:`kncore.patch_neurons`)."""
    ad = adapter(lm)
    for k in keys:
        if not (isinstance(k, tuple) and len(k) == 2 and all(isinstance(x, tuple) for x in k)):
            raise InputError("T5 scores (encoder ids, decoder ids) rows made by kncore.t5.score_request; "
                             "rows of single token sequences are for decoder-only and masked LMs")
    e = lm.batch_ids([k[0] for k in keys])
    d = lm.batch_ids([k[1] for k in keys])
    enc = encode(ad, e.input_ids, attention_mask=e.attention_mask)
    out = decode(ad, d.input_ids, enc=enc, attention_mask=d.attention_mask, patches=patches, logits=None)
    return ad.final(out.hidden[where[:, 0], where[:, 1]]).float().log_softmax(-1)


# -- KN attribution ---------------------------------------------------------------------
def _check_stack_layers(ad: T5Adapter, stack: str, layers):
    sa = ad.stack_adapter(stack)
    N = sa.n_layers
    layers = list(range(N)) if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    if not layers or len(set(layers)) != len(layers) or any(
            isinstance(L, bool) or not isinstance(L, int) or not 0 <= L < N for L in layers):
        raise ValueError(f"layers must be distinct integers in 0..{N - 1} (the {stack} has {N} layers), "
                         f"got {layers!r}")
    return sa, layers


def attribute(lm: LM, prompts, targets, *, layers=None, stack: str = "decoder", site: str = "act",
              steps: int = 20, scheme: str = "riemann-left") -> Attribution:
    """Integrated-gradients scores of the neurons of a T5 stack (Dai et al.'s
    objective: the target token's probability, baseline zero).

    ``stack="decoder"`` (default): decoder layer L's neurons at decoder position
    q are scaled, for each target token q; the step rows enter the residual
    stream after layer L and run layers L+1.. over the unmodified prefix's
    cached keys/values (positions < q) and the encoder's cross-attention
    keys/values, computed once. ``stack="encoder"``: encoder layer L's neurons
    at every prompt position are scaled together (the prompt's representation,
    as there is no target position in the encoder); the step rows rerun the
    encoder from layer L and the whole decoder. Scores are the mean over the
    target tokens of each token's attribution.

    Not benchmarked: each call runs the step rows of one (target token, layer)
    group (plus an alpha = 0 row for the completeness gap); the decoder-only
    engine's batching of every layer's rows into one walk is not done here.
    """
    ad = adapter(lm)
    prompts, targets = _check_prompts(prompts, targets)
    if site not in ("act", "pre_act"):
        raise ValueError(f"unknown site {site!r}; expected 'act' or 'pre_act'")
    _, layers = _check_stack_layers(ad, stack, layers)
    alphas, weights = scheme_points(scheme, steps)
    n = len(prompts)
    scores = torch.zeros(n, len(layers), ad.d_ff)
    gap = torch.zeros(n, len(layers))
    delta = torch.zeros(n, len(layers))
    pids, tids, ctxs, base, tok_probs = [], [], [], torch.zeros(n), []
    for i, (p, t) in enumerate(zip(prompts, targets)):
        try:
            enc_ids, tgt, dec_in = _pair(lm, p, t)
        except InputError as e:
            raise InputError(f"prompt {i} ({p[:60]!r}): {e}") from None
        pids.append(enc_ids[0].tolist())
        tids.append(tgt[0].tolist())
        ctxs.append([dec_in[0, : q + 1].tolist() for q in range(tgt.shape[1])])
        fn = _ig_decoder if stack == "decoder" else _ig_encoder
        ig, f1, d, sig = fn(ad, enc_ids, tgt, dec_in, layers, site, alphas, weights)
        scores[i] = ig
        tok_probs.append(f1.tolist())
        base[i] = f1.prod()
        delta[i] = d.mean(-1)
        gap[i] = ((sig - d).abs() / d.abs().clamp_min(1e-30)).amax(-1)
    return Attribution(scores, layers, site, scheme, steps, "teacher", prompts, targets, pids, tids, ctxs,
                       base, tok_probs, gap, delta, torch.full((n, len(layers)), steps), str(lm.name),
                       meta={"stack": stack, "arch": "t5"})


def _f_ig(z, p, weights_rows):
    """Gradients of sum_r w_r p_r with respect to the step rows z."""
    return torch.autograd.grad((p * weights_rows.to(p.dtype)).sum(), z)[0]


def _ig_decoder(ad, enc_ids, tgt, dec_in, layers, site, alphas, weights):
    """IG of decoder neurons at each target position. Returns (IG [layers, d_ff]
    averaged over target tokens, F(1) [T], F(1) - F(0) [layers, T], sum IG [layers, T])."""
    T = tgt.shape[1]
    caps = [(site, L) for L in layers] + [(s, L) for L in layers for s in ("resid_pre", "attn_out")]
    with torch.no_grad():
        enc = encode(ad, enc_ids)
        out = decode(ad, dec_in, enc=enc, capture=caps, return_kv=True)
        f1 = _probs(out.logits[0]).gather(1, tgt[0][:, None])[:, 0]
    if not torch.isfinite(f1).all():
        raise ValueError("the target probability is not finite (NaN/inf in the model's output)")
    m = len(alphas)
    rows_a = torch.cat([alphas, alphas.new_zeros(1)])  # the last row is F(0), weight 0
    rows_w = torch.cat([weights, weights.new_zeros(1)])
    ig = torch.zeros(len(layers), ad.d_ff, dtype=torch.float64)
    f0 = torch.zeros(len(layers), T)
    sig = torch.zeros(len(layers), T)
    for q in range(T):
        # the unmodified prefix (positions < q) for every layer above L
        past = None if q == 0 else KVCache([k[:, :, :q] for k in out.kv.k], [v[:, :, :q] for v in out.kv.v])
        for j, L in enumerate(layers):
            a = out[(site, L)][0, q]
            entry = (out[("resid_pre", L)][0, q] + out[("attn_out", L)][0, q])[None]
            idx = torch.zeros(m + 1, dtype=torch.long, device=a.device)
            with torch.inference_mode(False), torch.enable_grad():
                if site == "act":
                    z = expand_steps((a[None] @ ad.down_weight(L)), idx, rows_a.to(a.device)).requires_grad_(True)
                    mo = z
                else:
                    z = expand_steps(a[None], idx, rows_a.to(a.device)).requires_grad_(True)
                    aux = ad.mlp_pre(L, ad.ln2(L, entry))[1]
                    mo = ad.mlp_down(L, ad.mlp_act(L, z, None if aux is None else aux.expand(m + 1, -1)))
                h = (entry + mo)[:, None]
                res = decode(ad, hidden=h, enc=enc, start_layer=L + 1, past=past,
                             past_rows=None if past is None else idx, enc_rows=idx, logits="last")
                p = _probs(res.logits).gather(1, tgt[0, q].expand(m + 1, 1))[:, 0]
                if not torch.isfinite(p).all():
                    raise ValueError(f"decoder layer {L}, target token {q}: the target probability is not finite")
                g = _f_ig(z, p, rows_w.to(p.device))
            w = ad.down_weight(L) if site == "act" else None
            one = reduce_steps(g, idx, 1, a[None], w)[0]
            ig[j] += one.double() / T
            f0[j, q] = float(p[-1].detach())
            sig[j, q] = float(one.double().sum())
    return ig.float(), f1.float().cpu(), f1.float().cpu()[None] - f0, sig


def _ig_encoder(ad, enc_ids, tgt, dec_in, layers, site, alphas, weights):
    """IG of encoder neurons, every prompt position scaled together; the
    objective is the mean over target tokens of their probabilities."""
    T = tgt.shape[1]
    S = enc_ids.shape[1]
    caps = [(site, L) for L in layers] + [("resid_pre", L) for L in layers]
    with torch.no_grad():
        clean = encode(ad, enc_ids, capture=caps, cross=False)
        f1 = _probs(decode(ad, dec_in, enc=encode(ad, enc_ids)).logits[0]).gather(1, tgt[0][:, None])[:, 0]
    m = len(alphas)
    rows_a = torch.cat([alphas, alphas.new_zeros(1)])
    rows_w = torch.cat([weights, weights.new_zeros(1)])
    R = m + 1
    ig = torch.zeros(len(layers), ad.d_ff)
    f0 = torch.zeros(len(layers), 1)
    sig = torch.zeros(len(layers), 1)
    for j, L in enumerate(layers):
        a = clean[(site, L)][0]  # [S, d_ff]
        idx = torch.zeros(R, dtype=torch.long, device=a.device)
        with torch.inference_mode(False), torch.enable_grad():
            z = expand_steps(a.reshape(1, -1), idx, rows_a.to(a.device)).requires_grad_(True)  # [R, S*d_ff]
            enc = encode(ad, hidden=clean[("resid_pre", L)].expand(R, -1, -1), start_layer=L,
                         patches=[Patch(site, L, value=z.reshape(R * S, -1))])
            logits = decode(ad, dec_in.expand(R, -1), enc=enc).logits  # [R, T, V]
            p = _probs(logits).gather(2, tgt.expand(R, -1)[..., None])[..., 0].mean(-1)
            if not torch.isfinite(p).all():
                raise ValueError(f"encoder layer {L}: the target probability is not finite")
            g = _f_ig(z, p, rows_w.to(p.device))
        one = reduce_steps(g, idx, 1, a.reshape(1, -1))[0].reshape(S, -1).sum(0)
        ig[j] = one
        f0[j, 0] = float(p[-1].detach())
        sig[j, 0] = float(one.double().sum())
    # the gap compares with the mean objective's F(1) - F(0)
    return ig, f1.float().cpu(), f1.float().cpu().mean() - f0, sig


def attribute_ref(lm: LM, prompt: str, target: str, layer: int, *, stack: str = "decoder", site: str = "act",
                  steps: int = 20, scheme: str = "riemann-left") -> torch.Tensor:
    """The plain reference: IG through forward hooks on the Hugging Face T5
    (``model(input_ids, decoder_input_ids=shifted target)``), one full forward
    of every step, as the knowledge-neurons package computes IG (with
    ``scheme="linspace"`` its exact quadrature) but with the decoder input
    shifted right. Decoder: each target token's neurons at its own position,
    scores averaged over target tokens; encoder: every position scaled
    together, the objective the mean of the target tokens' probabilities.
    Returns [d_ff] float32."""
    ad = adapter(lm)
    sa, _ = _check_stack_layers(ad, stack, [layer])
    enc_ids, tgt, dec_in = _pair(lm, prompt, target)
    alphas, weights = scheme_points(scheme, steps)
    mod = sa.down_module(layer) if site == "act" else sa.pre_act_module(layer)
    T = tgt.shape[1]
    state = {}

    def hook_pre(module, args):  # act: the input of wo
        return (state["fn"](args[0]),)

    def hook_out(module, args, output):  # pre_act: the output of wi / wi_0
        return state["fn"](output)

    capture = lambda x: state.__setitem__("a", x.detach().clone()) or x
    h = mod.register_forward_pre_hook(hook_pre) if site == "act" else mod.register_forward_hook(hook_out)
    try:
        state["fn"] = capture
        with torch.no_grad():
            lm.model(input_ids=enc_ids, decoder_input_ids=dec_in)
        a = state["a"][0].double()  # [n, d_ff] at every position of the stack
        out = torch.zeros(a.shape[-1], dtype=torch.float64)
        for q in (range(T) if stack == "decoder" else [None]):
            total = torch.zeros_like(a)
            for al, w in zip(alphas.tolist(), weights.tolist()):
                with torch.enable_grad():
                    x = (a * al).to(lm.dtype).requires_grad_(True)

                    def fn(t, x=x, q=q):
                        if q is None:
                            return x[None]
                        t = t.clone()
                        t[0, q] = x[q]
                        return t
                    state["fn"] = fn
                    logits = lm.model(input_ids=enc_ids, decoder_input_ids=dec_in).logits[0]
                    pr = _probs(logits).gather(1, tgt[0][:, None])[:, 0]
                    obj = pr.mean() if q is None else pr[q]
                    total += w * torch.autograd.grad(obj, x)[0].double()
            ig = a * total
            out += ig.sum(0) if q is None else ig[q] / T
        return out.float()
    finally:
        h.remove()


# -- KN edits on the weights ------------------------------------------------------------
EDIT_MODES = ("erase", "edit")


class NeuronErase:
    """The rows of ``wo`` of some neurons of one T5 stack set to zero (the
    knowledge-neurons package's ``erase_knowledge``); a context manager, or
    :meth:`apply` / :meth:`undo`, which restores the saved rows bit for bit.
    Every check runs before any weight changes."""

    def __init__(self, lm: LM, neurons, stack: str = "decoder"):
        sa = adapter(lm).stack_adapter(stack)
        pairs = KNSet.of(neurons).neurons
        for l, i in pairs:
            if not (0 <= l < sa.n_layers and 0 <= i < sa.d_ff):
                raise InputError(f"neuron ({l}, {i}) outside the {stack}'s {sa.n_layers} layers x {sa.d_ff}")
        self.sa, self.pairs = sa, [(int(l), int(i)) for l, i in pairs]
        self._saved = []

    def apply(self) -> "NeuronErase":
        if self._saved:
            raise RuntimeError("this erase is already applied")
        with torch.no_grad():
            for l, i in self.pairs:
                w = self.sa.down_weight(l)  # [d_ff, d_model] view: row i is neuron i's value vector
                self._saved.append((w, i, w[i].clone()))
                w[i] = 0
        return self

    def undo(self) -> None:
        with torch.no_grad():
            for w, i, old in reversed(self._saved):
                w[i] = old
        self._saved = []

    def __enter__(self):
        return self.apply()

    def __exit__(self, *exc):
        self.undo()
        return False


@torch.no_grad()
def _top1(lm: LM, prompt: str) -> int:
    ad = adapter(lm)
    enc = encode(ad, torch.tensor([lm.tokenize(prompt)], device=lm.device))
    start = torch.tensor([[ad.start_id]], device=lm.device)
    return int(decode(ad, start, enc=enc).logits[0, 0].argmax())


def edit_neurons(lm: LM, neurons, mode: str = "erase", *, prompt: str | None = None, target: str | None = None,
                 stack: str = "decoder"):
    """KN weight edits on T5, each a context manager undone bit for bit:

    ``"erase"``: the neurons' ``wo`` rows set to zero (either stack);
    ``"edit"``: Dai et al.'s fact update on decoder neurons, the experiments'
    :class:`kncore.experiments.editing.KNWeightEdit` (each row += 2 (E[new] -
    E[old]), E the token embeddings), with old = the model's top-1 first
    target token for ``prompt`` before the edit and new = ``target``'s first
    token. Suppress and enhance need no weights: :func:`kncore.patch_neurons`
    acts on the decoder's neurons at the predicting decoder position."""
    adapter(lm)
    if mode not in EDIT_MODES:
        raise InputError(f"mode must be one of {EDIT_MODES}, got {mode!r}")
    if mode == "erase":
        return NeuronErase(lm, neurons, stack)
    if stack != "decoder":
        raise InputError("Dai's edit on T5 acts on decoder neurons (the adapter's down-projections)")
    if prompt is None or target is None:
        raise InputError("Dai's edit needs a prompt and a target")
    from .experiments.editing import KNWeightEdit
    return KNWeightEdit(lm, neurons, _top1(lm, prompt), target_ids(lm, target)[0])


# -- causal tracing -----------------------------------------------------------------------
@dataclass
class T5Trace:
    """Causal trace of a T5 prompt: ``encoder`` and ``decoder`` are
    :class:`kncore.tracing.TraceResult` grids. Each cell is the probability of
    the whole target (the product of its teacher-forced token probabilities),
    averaged over the corrupted runs, with the clean state restored there:

    * encoder cell (prompt token t, encoder layer l): ``hidden`` the output of
      encoder block l at t; ``mlp`` / ``attn`` the MLP / self-attention
      outputs at t of the ``window`` encoder layers centred on l;
    * decoder cell (decoder position q, decoder layer l): the same states of
      the decoder at position q (decoder position 0 holds the start token and
      predicts the first target token); ``attn`` restores both attention
      sublayers' outputs (self-attention plus cross-attention).

    The noise corrupts the subject's token embeddings in the encoder only;
    the decoder's inputs (the start token and the teacher-forced target) stay
    clean, so a decoder cell measures how much of the corruption's effect
    passes through that decoder state."""
    encoder: object
    decoder: object

    def __repr__(self):
        return f"T5Trace(encoder={self.encoder!r}, decoder={self.decoder!r})"


def _target_of(lm, ad, enc_ids, target) -> list:
    if target is None:
        with torch.no_grad():
            enc = encode(ad, enc_ids)
            start = torch.tensor([[ad.start_id]], device=enc_ids.device)
            return [int(decode(ad, start, enc=enc).logits[0, 0].argmax())]
    if isinstance(target, str):
        return target_ids(lm, target)
    if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < ad.vocab_size:
        return [int(target)]
    raise InputError(f"target must be None, a string or a token id in the vocabulary, got {target!r}")


@torch.no_grad()
def trace(lm: LM, prompt: str, subject: str, *, target=None, kinds: Iterable[str] = ("hidden", "mlp", "attn"),
          samples: int = 10, noise="3sd", noise_subjects: Sequence[str] | None = None, window: int = 10,
          seed: int = 1, max_rows: int = 512) -> T5Trace:
    """ROME's causal trace on T5 (see :class:`T5Trace` for what a cell means).
    Every cell is a full recompute of the encoder (from its first restored
    layer's input) and the decoder, batched over cells (``max_rows`` rows per
    call): unlike the decoder-only trace, a restoration in the bidirectional
    encoder reaches every position, so there is no cached prefix to reuse."""
    from .tracing.core import SITE_OF, TraceResult, check_args, noise_array, resolve_noise, window_layers
    ad = adapter(lm)
    kinds = check_args(kinds, samples, window, seed)
    ids = lm.tokenize(prompt)
    b, e = lm.subject_span(prompt, subject)
    scale = resolve_noise(lm, noise, noise_subjects)
    noise_t = scale * torch.from_numpy(noise_array(seed, samples, e - b, lm.d_model))
    dev = lm.device
    enc_ids = torch.tensor([ids], device=dev)
    tgt = torch.tensor([_target_of(lm, ad, enc_ids, target)], device=dev)
    dec_in = shift_right(ad, tgt)
    T = tgt.shape[1]
    Ne, Nd = ad.encoder.n_layers, ad.n_layers
    sites = sorted({SITE_OF[k] for k in kinds} | {"resid_post"})
    clean_e = encode(ad, enc_ids, capture=[(s, L) for s in sites for L in range(Ne)])
    clean_d = decode(ad, dec_in, enc=clean_e, capture=[(s, L) for s in sites for L in range(Nd)])

    def score(logits):  # [R, T, V] -> [R]: P(whole target)
        return _probs(logits).gather(2, tgt.expand(logits.shape[0], -1)[..., None])[..., 0].prod(-1)

    high = float(score(clean_d.logits)[0])
    emb = ad.encoder.embed(enc_ids).repeat(samples, 1, 1)
    emb[:, b:e] += noise_t.to(emb.device)  # ROME adds its float64 draw to the embedding output
    corrupt = encode(ad, hidden=emb)
    low = float(score(decode(ad, dec_in.expand(samples, -1), enc=corrupt).logits).mean())

    def restore(clean, kind, l, t, rows, N):
        site = SITE_OF[kind]
        Ls = [l] if kind == "hidden" else list(window_layers(l, window, N))
        return [Patch(site, L, positions=[t], rows=rows, value=clean[(site, L)][0, t]) for L in Ls]

    def grid(stack):
        N, n_tok = (Ne, enc_ids.shape[1]) if stack == "encoder" else (Nd, T)
        clean = clean_e if stack == "encoder" else clean_d
        cells = [(k, t, l) for k in kinds for t in range(n_tok) for l in range(N)]
        out = {k: torch.zeros(n_tok, N) for k in kinds}
        per = max(1, max_rows // samples)
        for c0 in range(0, len(cells), per):
            chunk = cells[c0:c0 + per]
            R = len(chunk) * samples
            patches = []
            for j, (k, t, l) in enumerate(chunk):
                patches += restore(clean, k, l, t, range(j * samples, (j + 1) * samples), N)
            if stack == "encoder":
                enc = encode(ad, hidden=emb.repeat(len(chunk), 1, 1), patches=patches)
                logits = decode(ad, dec_in.expand(R, -1), enc=enc).logits
            else:
                rows = torch.arange(R, device=dev) % samples
                logits = decode(ad, dec_in.expand(R, -1), enc=corrupt, enc_rows=rows, patches=patches).logits
            s = score(logits).view(len(chunk), samples).mean(-1).float().cpu()
            for (k, t, l), v in zip(chunk, s):
                out[k][t, l] = v
        return out

    tok = lambda xs: [lm.tokenizer.decode([int(x)]) for x in xs]
    common = dict(low=low, high=high, target=int(tgt[0, 0]), answer=lm.tokenizer.decode(tgt[0].tolist()),
                  target_position=0, prompt=prompt, subject=subject, kinds=kinds, window=int(window),
                  samples=int(samples), noise=scale, seed=int(seed), model=str(lm.name))
    enc_res = TraceResult(scores=grid("encoder"), tokens=tok(ids), input_ids=list(ids), subject_range=(b, e),
                          **common)
    dec_res = TraceResult(scores=grid("decoder"), tokens=tok(dec_in[0]), input_ids=dec_in[0].tolist(),
                          subject_range=(0, 0), **common)
    return T5Trace(enc_res, dec_res)


# -- ROME on the encoder ------------------------------------------------------------------
@torch.no_grad()
def layer_stats(lm: LM, layer: int, texts: Sequence[str], *, stack: str = "encoder", batch: int = 16):
    """ROME's key statistics on T5: E[k k^T] of the ``wo`` inputs of one layer
    of a stack over every real token of ``texts`` (the encoder reads each text
    as its input; accumulated in fp64). Returns a
    :class:`kncore.rome.LayerStats` (in memory: no cache identity)."""
    from .rome.stats import LayerStats
    ad = adapter(lm)
    if stack != "encoder":
        raise InputError("T5 statistics are for the encoder's MLP (where ROME on T5 edits)")
    _check_stack_layers(ad, stack, [layer])
    if isinstance(texts, str) or not texts:
        raise InputError("texts must be a non-empty list of strings")
    C = torch.zeros(ad.d_ff, ad.d_ff, dtype=torch.float64, device=lm.device)
    n = 0
    for i in range(0, len(texts), batch):
        b = lm.batch(list(texts[i:i + batch]))
        e = encode(ad, b.input_ids, attention_mask=b.attention_mask, stop_layer=layer + 1, capture=[("act", layer)])
        k = e[("act", layer)][b.attention_mask].double()
        C += k.T @ k
        n += k.shape[0]
    return LayerStats.from_tensor(layer, C / n, n_tokens=n)


def rome_edit(lm: LM, request, layer: int, *, hparams=None, stats=None):
    """ROME on T5: a rank-one update of encoder layer ``layer``'s ``wo`` so that
    the key at the subject's last prompt token, k* (the ``wo`` input there),
    maps to v* = v + delta, delta optimised through the decoder's loss on the
    teacher-forced ``target_new`` (plus ROME's KL term on "{} is a" at the
    decoder's first position and its weight decay and norm clamp).

    Differences from decoder-only ROME: the key is that of the prompt itself
    (no generated context templates); the delta is added at the subject's last
    token in the encoder, which every decoder position reads through
    cross-attention. ``stats``: :func:`layer_stats` of that layer (or a
    [d_ff, d_ff] tensor) for ``mom2_adjustment``. Returns a
    :class:`kncore.rome.Edit`; ``undo()`` restores ``wo`` bit for bit."""
    from .rome.editing import Edit, EditStep, _rank1, _vec_dtype, left_vector, parse_request, v_loop
    from .rome.hparams import ROMEHparams, load_hparams
    from .rome.stats import LayerStats
    ad = adapter(lm)
    enc_ad, _ = _check_stack_layers(ad, "encoder", [layer])
    hp = ROMEHparams(layers=[layer]) if hparams is None else load_hparams(hparams)
    hp.validate()
    req = parse_request(request)
    if hp.mom2_adjustment:
        if stats is None:
            raise InputError("ROME on T5 needs stats= (kncore.t5.layer_stats of the layer) for mom2_adjustment")
        stats = stats if isinstance(stats, LayerStats) else LayerStats.from_tensor(layer, stats)
    text = req.text()
    kl_texts = [t.replace("{}", req.subject) for t in hp.kl_prompts]
    tgt = torch.tensor([target_ids(lm, req.target)], device=lm.device)
    b = lm.batch([text] + kl_texts)
    look = torch.tensor([lm.subject_span(t, req.subject)[1] - 1 for t in [text] + kl_texts], device=lm.device)
    R = len(look)
    rows = torch.arange(R, device=lm.device)
    vd = _vec_dtype(lm)
    with torch.no_grad():
        pre = encode(ad, b.input_ids, attention_mask=b.attention_mask,
                     capture=[("act", layer), ("mlp_out", layer), ("resid_post", layer)], cross=False)
    key = pre[("act", layer)][0, look[0]].to(vd)
    value = pre[("mlp_out", layer)][0, look[0]].to(vd)
    left = left_vector(lm, layer, key, hp, stats)
    onehot = torch.zeros(R, b.input_ids.shape[1], 1, dtype=lm.dtype, device=lm.device)
    onehot[rows, look] = 1
    dec_rw = shift_right(ad, tgt)
    start = torch.full((R - 1, 1), ad.start_id, device=lm.device)

    def forward(delta):
        h = pre[("resid_post", layer)] + onehot * delta.to(lm.dtype)
        enc = encode(ad, hidden=h, attention_mask=b.attention_mask, start_layer=layer + 1)
        lp = decode(ad, dec_rw, enc=enc, enc_rows=rows[:1]).logits[0].to(vd).log_softmax(-1)
        nll = -lp.gather(1, tgt[0][:, None])[:, 0].mean()
        return nll[None], decode(ad, start, enc=enc, enc_rows=rows[1:]).logits[:, 0].to(vd).log_softmax(-1)

    with torch.inference_mode(False), torch.enable_grad():
        delta, losses, p_target = v_loop(forward, value, hp)
    v_star = value + delta
    right = (v_star - value) / torch.dot(key, left)
    W = enc_ad.down_module(layer).weight.data  # [d_model, d_ff]: the update is right left^T
    with torch.no_grad():
        rec = _rank1(W, right.to(W.dtype), left.to(W.dtype))
    ed = Edit(lm, hp)
    ed.steps.append(EditStep(req, layer, left, right, key, key, value, v_star, losses, p_target, W, rec))
    return ed
