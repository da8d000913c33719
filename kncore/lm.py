"""``LM``: a model, its tokenizer and its architecture adapter, plus the
tokenisation helpers every method shares."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import torch

from . import runtime
from .errors import InputError  # noqa: F401 - kncore.lm.InputError is its historical home
from .models import adapter_for


@dataclass
class Batch:
    """Right-padded token ids of several prompts."""
    input_ids: torch.Tensor       # [B, T]
    attention_mask: torch.Tensor  # [B, T] bool
    lengths: torch.Tensor         # [B]

    @property
    def last(self) -> torch.Tensor:
        return self.lengths - 1


class LM:
    """A loaded model. Build one with :func:`kncore.load` or :func:`kncore.from_hf`."""

    def __init__(self, model, tokenizer, *, name: str | None = None, bos: bool | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapter = adapter_for(model)
        self.name = name or getattr(model.config, "_name_or_path", None) or model.config.model_type
        # bos=None follows the tokenizer's own convention (LLaMA-2 adds <s>,
        # SmolLM2's GGUF tokenizer adds nothing); True/False forces it.
        self.bos = bos
        if tokenizer.pad_token_id is None:
            self.pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        else:
            self.pad_id = tokenizer.pad_token_id
        self._fingerprint = None
        self._tok_fingerprint = None

    # -- facts ---------------------------------------------------------------
    @property
    def arch(self) -> str:
        return self.adapter.arch

    @property
    def is_mlm(self) -> bool:
        return not self.adapter.causal

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def d_ff(self) -> int:
        return self.adapter.d_ff

    @property
    def d_model(self) -> int:
        return self.adapter.d_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __repr__(self):
        return (f"LM({self.name!r}, arch={self.arch}, layers={self.n_layers}, d_model={self.d_model}, "
                f"d_ff={self.d_ff}, device={self.device}, dtype={self.dtype})")

    def fingerprint(self) -> str:
        """A stable hash of the architecture and the weights (sampled)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            cfg = {k: v for k, v in self.model.config.to_dict().items()
                   if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype",
                                "quantization_config", "_attn_implementation_autoset")}
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
            for n, p in self.model.state_dict().items():
                flat = p.detach().reshape(-1)
                h.update(n.encode())
                h.update(str(tuple(p.shape)).encode())
                idx = torch.linspace(0, flat.numel() - 1, min(64, flat.numel())).long().clamp_(max=flat.numel() - 1).to(flat.device)
                h.update(flat[idx].float().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def tokenizer_fingerprint(self) -> str:
        """A hash of what decides the token ids: the vocabulary (with added
        tokens), the BPE merges, the special-token ids and the BOS policy;
        never the folder the tokenizer was loaded from."""
        if self._tok_fingerprint is None:
            tok = self.tokenizer
            merges = []
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is not None:
                raw = json.loads(backend.to_str()).get("model", {}).get("merges") or []
                # tokenizers writes a merge as "a b" or, in newer versions, ["a", "b"]
                merges = [m if isinstance(m, str) else " ".join(m) for m in raw]
            elif getattr(tok, "bpe_ranks", None):
                merges = [" ".join(p) for p, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
            special = {k: getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "mask")}
            ident = {"vocab": sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0])), "merges": merges,
                     "special": special, "bos": self.bos}
            self._tok_fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        return self._tok_fingerprint

    # -- tokenisation ----------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of a prompt, with the model's special tokens."""
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise InputError("empty prompt")
        ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if self.bos is True and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        elif self.bos is False and bos is not None and ids and ids[0] == bos:
            ids = ids[1:]
        if len(ids) > self.adapter.n_ctx:
            raise InputError(f"prompt is {len(ids)} tokens, longer than the model's context of "
                             f"{self.adapter.n_ctx}: {prompt[:60]!r}...")
        if self.is_mlm:
            self.mask_position(ids, prompt)
        return ids

    def batch(self, prompts: Sequence[str] | str) -> Batch:
        """Tokenise and right-pad prompts onto the model's device."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise InputError("no prompts given")
        seqs = [self.tokenize(p) for p in prompts]
        return self.batch_ids(seqs)

    def batch_ids(self, seqs: Sequence[Sequence[int]]) -> Batch:
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = True
        dev = self.device
        return Batch(ids.to(dev), mask.to(dev), torch.tensor([len(s) for s in seqs], device=dev))

    def mask_position(self, ids: Sequence[int], prompt: str = "") -> int:
        """Index of the single [MASK] token (BERT)."""
        mid = self.tokenizer.mask_token_id
        if mid is None:
            raise InputError("this tokenizer has no [MASK] token")
        where = [i for i, t in enumerate(ids) if t == mid]
        if len(where) != 1:
            what = "no" if not where else f"{len(where)}"
            raise InputError(f"a masked-LM prompt needs exactly one {self.tokenizer.mask_token}, "
                             f"found {what}: {prompt!r}")
        return where[0]

    def target_position(self, ids: Sequence[int]) -> int:
        """Where the target is predicted: the [MASK] (BERT) or the last token."""
        return self.mask_position(ids) if self.is_mlm else len(ids) - 1

    def target_ids(self, prompt: str, target: str) -> list[int]:
        """Token ids of a target continuation, with the right leading space.

        For decoders the target is tokenised in context (prompt + target) and
        the tokens after the prompt's are taken, so " Ottawa" after "is" gets
        the same ids the model would emit. For BERT the target fills [MASK].
        """
        if not isinstance(target, str) or not target.strip():
            raise InputError("empty target")
        if self.is_mlm:
            ids = self.tokenizer(target.strip(), add_special_tokens=False)["input_ids"]
        else:
            t = target if (target[0].isspace() or prompt.endswith((" ", "\n"))) else " " + target
            base = self.tokenize(prompt)
            full = list(self.tokenizer(prompt + t, add_special_tokens=True)["input_ids"])
            if len(base) and self.bos is True and full[:1] != base[:1]:
                full = base[:1] + full
            if full[: len(base)] == base and len(full) > len(base):
                ids = full[len(base):]
            else:
                ids = self.tokenizer(t, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InputError(f"target {target!r} tokenises to nothing")
        return list(ids)

    def single_token(self, prompt: str, target: str) -> int:
        ids = self.target_ids(prompt, target)
        if len(ids) != 1:
            toks = [self.tokenizer.decode([i]) for i in ids]
            raise InputError(f"target {target!r} must be one token but is {len(ids)}: {toks}")
        return ids[0]

    def token_id(self, token: str) -> int:
        """Id of a token given as text (e.g. ' Paris'); error if not in the vocabulary."""
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(f"{token!r} is not a single token in this vocabulary "
                             f"(it splits into {len(ids)})")
        return ids[0]

    def subject_span(self, prompt: str, subject: str) -> tuple[int, int]:
        """Token range [start, end) of the subject's first occurrence in the prompt."""
        if not subject or not subject.strip():
            raise InputError("empty subject")
        ci = prompt.find(subject)
        if ci < 0:
            raise InputError(f"subject {subject!r} is not in the prompt {prompt!r}")
        first, last = self.char_tokens(prompt, ci, ci + len(subject))
        return first, last + 1

    def char_tokens(self, text: str, ci: int, ce: int, ids: list | None = None) -> tuple[int, int]:
        """First and last token (indices into ``ids``, by default
        ``self.tokenize(text)``) that overlap the characters text[ci:ce]: from
        the tokenizer's offset map, else (slow tokenizers) by decoding growing
        prefixes, as ROME's code does."""
        ids = self.tokenize(text) if ids is None else ids
        enc = None
        try:
            enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        except (NotImplementedError, ValueError, TypeError):
            pass
        if enc is not None and "offset_mapping" in enc:
            offs = list(enc["offset_mapping"])
            shift = len(ids) - len(offs)  # a BOS added or removed by the LM's policy
            toks = [i + shift for i, (a, b) in enumerate(offs) if b > a and a < ce and b > ci and 0 <= i + shift]
            if toks:
                return toks[0], toks[-1]
        first = last = None
        for i in range(len(ids)):
            pos = len(self.tokenizer.decode(ids[: i + 1], skip_special_tokens=True))
            if first is None and pos > ci:
                first = i
            if first is not None and pos >= ce:
                last = i
                break
        if first is None or last is None:
            raise InputError(f"could not map characters {ci}-{ce} ({text[ci:ce]!r}) onto the tokens of {text!r}")
        return first, last

    # -- running -------------------------------------------------------------------
    def run(self, input_ids=None, **kw) -> runtime.RunOutput:
        """:func:`kncore.runtime.run` on this model."""
        return runtime.run(self.adapter, input_ids, **kw)

    @torch.no_grad()
    def next_token_probs(self, prompts: Sequence[str] | str, patches=()) -> torch.Tensor:
        """Probabilities [B, V] at each prompt's target position (fp32)."""
        b = self.batch(prompts)
        pos = torch.tensor([self.target_position(s[: int(n)].tolist()) for s, n in zip(b.input_ids, b.lengths)],
                           device=b.input_ids.device)
        out = self.run(b.input_ids, attention_mask=b.attention_mask, logits=pos, patches=patches)
        return out.logits.float().softmax(-1)

    def top_k(self, prompt: str, k: int = 5, patches=()) -> list[tuple[str, float]]:
        p = self.next_token_probs(prompt, patches=patches)[0]
        v, i = p.topk(k)
        return [(self.tokenizer.decode([int(t)]), float(x)) for t, x in zip(i, v)]

    @torch.no_grad()
    def capture(self, prompts, sites=("act",), layers=None, positions="last", patches=()) -> dict:
        """Capture sites at every requested layer in one forward.

        Returns {(site, layer): tensor [B, k, width]} (k=1 for positions='last').
        """
        b = self.batch(prompts)
        layers = range(self.n_layers) if layers is None else layers
        caps = [(s, L) for s in sites for L in layers]
        out = self.run(b.input_ids, attention_mask=b.attention_mask, capture=caps,
                       capture_positions=positions, logits=None, patches=patches)
        return out.captured
