"""Model families: the one place that says whether an LM is a causal decoder,
a masked LM or an encoder-decoder (T5), and so which code the evaluation and
the edit experiments run on it.

:func:`family` answers for a loaded :class:`~kncore.lm.LM`; the
:class:`Family` it returns gives

* ``probe_prompt`` / ``target_ids`` / ``score_request``: how a (prompt,
  target) becomes a teacher-forced scoring row: a causal decoder reads the
  prompt followed by the target's tokens (in context, " Paris" after "is"); a
  masked LM one ``[MASK]`` per target token; T5 the prompt in the encoder and
  the target in the decoder, shifted right (``decoder_start_token_id``
  first), so decoder position q predicts target[q];
* ``logprobs_at``: one batched forward over such rows, log-probabilities at
  the scored positions only;
* ``attribute``: the KN attribution the KN editor localises with
  (:func:`kncore.attribute`; on T5 :func:`kncore.t5.attribute` over the
  decoder's neurons, whose down-projections the KN editor rewrites);
* ``editors`` / ``check_editor``: which ``edit_eval`` editors run on it, and
  a one-line error for the others.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .lm import LM, InputError

EDITORS = ("rome", "kn")


class Family:
    """A causal decoder (GPT-2, GPT-J, LLaMA, ...): every method of the package."""

    name = "causal"
    encoder_decoder = False
    editors = EDITORS
    refused: dict = {}

    def check_editor(self, editor: str) -> None:
        if editor not in EDITORS:
            raise InputError(f"editor must be one of {EDITORS}, got {editor!r}")
        if editor not in self.editors:
            raise InputError(self.refused[editor])

    def probe_prompt(self, lm: LM, prompt: str) -> str:
        return prompt

    def target_ids(self, lm: LM, prompt: str, target: str) -> list:
        return lm.target_ids(prompt, target)

    def score_request(self, lm: LM, prompt: str, target: str):
        """(row key, scored positions, target ids): the key is the token
        sequence the forward reads; identical keys share one row."""
        tids = self.target_ids(lm, prompt, target)
        ids = lm.tokenize(prompt)
        seq = ids + tids[:-1]
        pos = list(range(len(ids) - 1, len(ids) - 1 + len(tids)))
        self._check_len(lm, seq, prompt)
        return tuple(seq), pos, tids

    @staticmethod
    def row_len(key) -> int:
        """A row key's length, by which rows are sorted into batches (less padding)."""
        return len(key)

    @staticmethod
    def _check_len(lm: LM, seq, prompt: str) -> None:
        if len(seq) > lm.adapter.n_ctx:
            raise InputError(f"prompt and target are {len(seq)} tokens, more than the model's context of "
                             f"{lm.adapter.n_ctx}: {prompt[:60]!r}")

    def logprobs_at(self, lm: LM, keys: Sequence, where: torch.Tensor, patches=()) -> torch.Tensor:
        """Log-probabilities [len(where), V] at (row, position) pairs of one
        batch of row keys (token sequences, right-padded)."""
        b = lm.batch_ids([list(k) for k in keys])
        out = lm.run(b.input_ids, attention_mask=b.attention_mask, logits=None, patches=patches)
        return lm.adapter.final(out.hidden[where[:, 0], where[:, 1]]).float().log_softmax(-1)

    def attribute(self, lm: LM, prompts, targets, *, steps: int = 20, layers=None, batch_size="auto"):
        from .attribution import attribute
        return attribute(lm, prompts, targets, steps=steps, layers=layers, batch_size=batch_size,
                         progress=False)

    def __repr__(self):
        return f"<{self.name} model family>"


class MaskedFamily(Family):
    """A masked LM (BERT): the target fills the prompt's ``[MASK]``; ROME,
    which rewrites a causal LM's MLP, is refused."""

    name = "masked"
    editors = ("kn",)
    refused = {"rome": "ROME edits causal LMs; this is a masked LM (use editor='kn')"}

    def probe_prompt(self, lm: LM, prompt: str) -> str:
        """A prompt without the mask token gets `` [MASK] .`` appended (LAMA/PARAREL)."""
        mask = lm.tokenizer.mask_token
        return prompt if mask in prompt else f"{prompt.rstrip()} {mask} ."

    def score_request(self, lm: LM, prompt: str, target: str):
        tids = self.target_ids(lm, prompt, target)
        ids = lm.tokenize(prompt)
        m = lm.mask_position(ids, prompt)
        seq = ids[:m] + [lm.tokenizer.mask_token_id] * len(tids) + ids[m + 1:]
        self._check_len(lm, seq, prompt)
        return tuple(seq), list(range(m, m + len(tids))), tids


class EncoderDecoderFamily(Family):
    """T5 v1.0 and v1.1 / Flan-T5 (:mod:`kncore.t5`): targets teacher-forced
    in the decoder with the input shifted right; the KN editor's neurons are
    the decoder's. ROME on T5 edits the encoder (:func:`kncore.t5.rome_edit`,
    which needs its own layer and statistics) and is not an ``edit_eval``
    editor."""

    name = "encoder-decoder"
    encoder_decoder = True
    editors = ("kn",)
    refused = {"rome": "edit_eval(editor='rome') does not run on T5 (encoder-decoder): ROME on T5 edits an "
                       "encoder layer with kncore.t5.rome_edit and kncore.t5.layer_stats (docs/architectures.md); "
                       "use editor='kn'"}

    def target_ids(self, lm: LM, prompt: str, target: str) -> list:
        from . import t5
        return t5.target_ids(lm, target)

    def score_request(self, lm: LM, prompt: str, target: str):
        from . import t5
        return t5.score_request(lm, prompt, target)

    @staticmethod
    def row_len(key) -> int:
        return len(key[0]) + len(key[1])  # encoder and decoder tokens

    def logprobs_at(self, lm: LM, keys: Sequence, where: torch.Tensor, patches=()) -> torch.Tensor:
        from . import t5
        return t5.logprobs_at(lm, keys, where, patches)

    def attribute(self, lm: LM, prompts, targets, *, steps: int = 20, layers=None, batch_size="auto"):
        from . import t5
        # batch_size: T5's attribution runs one (target token, layer) group at a time
        return t5.attribute(lm, prompts, targets, steps=steps, layers=layers)


CAUSAL, MASKED, ENCODER_DECODER = Family(), MaskedFamily(), EncoderDecoderFamily()


def family(lm: LM) -> Family:
    """The family of ``lm``: its adapter says whether it is an encoder-decoder
    (T5) and whether it is causal."""
    if getattr(lm.adapter, "encoder_decoder", False):
        return ENCODER_DECODER
    return MASKED if lm.is_mlm else CAUSAL
