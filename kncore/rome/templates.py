"""ROME's context templates: short prefixes the model writes itself.

ROME averages the key k* over the subject's last token in ``"{prefix}. {prompt}"``
for prefixes sampled from the model (``generate_fast``: top-k sampling, 5
seed words, ``context_template_length_params`` ``[[5, 10], [10, 10]]``: ten
prefixes of 5 tokens and ten of 10, the seed word included), plus the bare
prompt ``"{}"``. kncore samples with a fixed seed, so the templates (and so
the edit) are reproducible; ROME's are random on every run.

Generation runs on the kncore runtime with its key/value cache: one forward
over the seed words, then one single-token step per new token.
"""
from __future__ import annotations

import unicodedata
from typing import Sequence

import torch

from ..runtime import KVCache

_CACHE: dict = {}


@torch.no_grad()
def generate(lm, prompts: Sequence[str], n_per_prompt: int = 1, max_out_len: int = 10, top_k: int = 5,
             seed: int = 0) -> list[str]:
    """Sample continuations, ROME's ``generate_fast`` with a seeded generator.

    Each prompt is repeated ``n_per_prompt`` times; a row stops at
    ``max_out_len`` tokens in all (prompt and special tokens included, as in
    ROME). Returns the decoded texts (special tokens dropped), prompt by prompt.
    """
    if lm.is_mlm:
        from ..lm import InputError
        raise InputError("text generation needs a causal LM, not a masked LM")
    g = torch.Generator(device=lm.device)
    g.manual_seed(int(seed))
    enc = [lm.tokenize(p) for p in prompts]
    out: list = [None] * len(prompts)
    by_len: dict = {}
    for i, ids in enumerate(enc):
        by_len.setdefault(len(ids), []).append(i)
    for T0, group in sorted(by_len.items()):
        rows = [enc[i] for i in group for _ in range(n_per_prompt)]
        ids = torch.tensor(rows, dtype=torch.long, device=lm.device)
        if ids.numel() == 0:
            continue
        if T0 < max_out_len:
            o = lm.run(ids, return_kv=True, logits="last")
            kv, logits = o.kv, o.logits
            while True:
                probs = logits.float().softmax(-1)
                top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
                pick = torch.multinomial(top_p / top_p.sum(-1, keepdim=True), 1, generator=g)
                new = top_i.gather(1, pick)
                ids = torch.cat([ids, new], dim=1)
                if ids.shape[1] >= max_out_len:
                    break
                o = lm.run(new, past=kv, return_kv=True, logits="last")
                kv = KVCache([torch.cat([a, b], 2) for a, b in zip(kv.k, o.kv.k)],
                             [torch.cat([a, b], 2) for a, b in zip(kv.v, o.kv.v)])
                logits = o.logits
        texts = [lm.tokenizer.decode(r, skip_special_tokens=True) for r in ids.tolist()]
        for j, i in enumerate(group):
            out[i] = texts[j * n_per_prompt:(j + 1) * n_per_prompt]
    return [t for per in out for t in per]


def context_templates(lm, hparams) -> list[str]:
    """``["{}"] + [prefix + ". {}" ...]`` as ROME's ``get_context_templates``
    (cached per model and generation settings)."""
    key = (lm.fingerprint(), id(lm.model), tuple(map(tuple, hparams.context_template_length_params)),
           tuple(hparams.context_prompts), hparams.context_top_k, hparams.context_seed)
    if key in _CACHE:
        return _CACHE[key]
    prompts = list(hparams.context_prompts)
    out = ["{}"]
    for i, (length, n_gen) in enumerate(hparams.context_template_length_params):
        per = n_gen // len(prompts)
        if per == 0:
            continue
        texts = generate(lm, prompts, per, length, hparams.context_top_k, hparams.context_seed + i)
        for t in texts:
            t = unicodedata.normalize("NFKD", t).replace("\n\n", " ").replace("{", "").replace("}", "")
            out.append(t + ". {}")
    _CACHE[key] = out
    return out
