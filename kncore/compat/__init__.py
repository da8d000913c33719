"""A drop-in for the ``knowledge-neurons`` package (EleutherAI, 0.0.2).

    # from knowledge_neurons import KnowledgeNeurons
    from kncore.compat import KnowledgeNeurons

    kn = KnowledgeNeurons(model, tokenizer, model_type="bert")
    neurons = kn.get_refined_neurons(prompts, "paris", p=0.5)
    results, unpatch = kn.suppress_knowledge(prompts[0], "paris", neurons)

Same methods, defaults, return types and numbers as the package, computed by
kncore: all layers of all prompts in one batched integrated-gradients run
(:func:`kncore.attribute` with the package's quadrature, ``scheme="linspace"``)
instead of one forward per step per layer, and interventions through
:func:`kncore.patch_neurons`.

What the package does and this class follows:

* prompts are tokenised by ``tokenizer(prompt)``; a GPT target by
  ``tokenizer.encode(target)`` (no leading space is added), a BERT target by
  ``tokenizer.convert_tokens_to_ids(target)``;
* the neuron site is the output of ``intermediate`` for BERT (after GELU:
  ``site="act"``) and of ``mlp.c_fc`` for GPT (before GELU: ``site="pre_act"``);
  scores, suppression (x0) and enhancement (x2) all act there, at the [MASK]
  (BERT) or the last token (GPT);
* with ``model_type="gpt"`` (exactly; also ``"llama"`` as in Niu et al.'s fork)
  a multi-token target is scored token by token, the context growing by the
  model's greedy token decoded to text and re-tokenised, and the scores are
  averaged; probabilities are multiplied.

Where it differs (each a bug or a crash in the package):

* a target that is not one token where one is needed (BERT; GPT-2 with
  ``model_type="gpt2"``), an empty prompt, a prompt longer than the context,
  a BERT prompt without exactly one [MASK]: :class:`kncore.InputError`
  (the package assert-fails, crashes inside autograd or silently uses [UNK]);
* ``batch_size`` need not divide ``steps`` (it is not used: kncore batches
  by memory);
* ``intermediate_size()`` is the model's real d_ff (the package returns
  4 x hidden for GPT models even when ``n_inner`` says otherwise);
* ``modify_weights``/``erase_knowledge`` edit neuron rows of the
  down-projection for every GPT ``model_type`` (the package edits the wrong
  axis of GPT-2's Conv1D unless ``model_type == "gpt2"``), and accept
  ``target=None`` (then ``gt_prob`` is None; the package crashes);
* ``get_refined_neurons(..., negative_examples=[...])`` (keyword only; not in
  0.0.2) drops every refined neuron that is in the coarse set of any negative
  prompt, as the package's later versions document (their code drops none).
"""
from __future__ import annotations

import collections
import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..interventions import patch_neurons
from ..lm import LM, InputError
from ..models.base import get_module
from ..selection import refine, select_coarse

__all__ = ["KnowledgeNeurons"]


class _Tokens(str):
    """A prompt or target handed to :func:`kncore.attribute` as token ids.

    The string is the text (for messages); ``ids`` are the tokens, taken as
    they are, so the package's tokenisation is kept exactly."""

    def __new__(cls, text: str, ids):
        s = super().__new__(cls, text)
        s.ids = [int(i) for i in ids]
        return s


class _PeerLM(LM):
    """An LM that takes :class:`_Tokens` prompts and targets verbatim."""

    def tokenize(self, prompt):
        if isinstance(prompt, _Tokens):
            return list(prompt.ids)
        return super().tokenize(prompt)

    def target_ids(self, prompt, target):
        if isinstance(target, _Tokens):
            return list(target.ids)
        return super().target_ids(prompt, target)


class KnowledgeNeurons:
    """``knowledge_neurons.KnowledgeNeurons`` with kncore underneath.

    ``model_type``: ``"bert"``, or a GPT type (``"gpt2"``: single-token
    targets; ``"gpt"``: multi-token targets scored with greedy contexts).
    ``device`` defaults to CUDA when available, as in the package. The kncore
    model is at ``self.lm``.
    """

    def __init__(self, model: nn.Module, tokenizer, model_type: str = "bert", device: str = None):
        self.model = model
        self.model_type = model_type
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.tokenizer = tokenizer
        self.baseline_activations = None
        if model_type == "bert":
            self.transformer_layers_attr = "bert.encoder.layer"
            self.input_ff_attr = "intermediate"
            self.output_ff_attr = "output.dense.weight"
            self.word_embeddings_attr = "bert.embeddings.word_embeddings.weight"
            self.unk_token = getattr(self.tokenizer, "unk_token_id", None)
        elif "gpt" in model_type or model_type == "llama":
            self.transformer_layers_attr = "transformer.h" if "gpt" in model_type else "model.layers"
            self.input_ff_attr = "mlp.c_fc" if "gpt" in model_type else "mlp.gate_proj"
            self.output_ff_attr = "mlp.c_proj.weight" if "gpt" in model_type else "mlp.down_proj.weight"
            self.word_embeddings_attr = "transformer.wpe" if "gpt" in model_type else "model.embed_tokens.weight"
        else:
            raise NotImplementedError(f"model_type {model_type!r}: use 'bert' or a GPT type ('gpt2', 'gpt')")
        self.lm = _PeerLM(model, tokenizer, name=getattr(model.config, "_name_or_path", None) or model_type)
        if (model_type == "bert") != self.lm.is_mlm:
            raise InputError(f"model_type={model_type!r} but the model is a {self.lm.arch} "
                             f"({'masked' if self.lm.is_mlm else 'causal'} LM)")
        # The package's neuron site: BERT's `intermediate` output is after the
        # activation, GPT's `mlp.c_fc` output before it.
        self.site = "act" if model_type == "bert" else "pre_act"

    # -- the package's helpers -------------------------------------------------
    def _get_output_ff_layer(self, layer_idx):
        return get_module(self._get_transformer_layers()[layer_idx], self.output_ff_attr)

    def _get_input_ff_layer(self, layer_idx):
        return get_module(self._get_transformer_layers()[layer_idx], self.input_ff_attr)

    def _get_word_embeddings(self):
        return get_module(self.model, self.word_embeddings_attr)

    def _get_transformer_layers(self):
        return get_module(self.model, self.transformer_layers_attr)

    def n_layers(self) -> int:
        return self.lm.n_layers

    def intermediate_size(self) -> int:
        return self.lm.d_ff

    @property
    def _multi(self) -> bool:
        """Whether multi-token targets are scored token by token (greedy)."""
        return self.model_type in ("gpt", "llama")

    def _encode_prompt(self, prompt) -> list:
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise InputError("empty prompt")
        ids = list(self.tokenizer(prompt)["input_ids"])
        if len(ids) > self.lm.adapter.n_ctx:
            raise InputError(f"prompt is {len(ids)} tokens, longer than the model's context of "
                             f"{self.lm.adapter.n_ctx}: {prompt[:60]!r}...")
        if self.lm.is_mlm:
            self.lm.mask_position(ids, prompt)
        return ids

    def _target_label(self, target):
        """The package's target ids: a list for GPT, an int for BERT."""
        if not isinstance(target, str) or not target.strip():
            raise InputError(f"the ground truth must be a non-empty string, got {target!r}")
        if self.model_type == "bert":
            tid = self.tokenizer.convert_tokens_to_ids(target)
            if tid is None or (tid == self.tokenizer.unk_token_id and target != self.tokenizer.unk_token):
                pieces = self.tokenizer.tokenize(target)
                raise InputError(f"target {target!r} must be one token of the vocabulary (BERT predicts "
                                 f"one token at [MASK]) but is not; it tokenises to {pieces}")
            return int(tid)
        ids = list(self.tokenizer.encode(target))
        if not ids:
            raise InputError(f"target {target!r} tokenises to nothing")
        if len(ids) > 1 and not self._multi:
            toks = [self.tokenizer.decode([i]) for i in ids]
            raise InputError(f"target {target!r} must be one token with model_type={self.model_type!r} but is "
                             f"{len(ids)}: {toks} (model_type='gpt' scores multi-token targets)")
        return ids

    def _prepare_inputs(self, prompt, target=None, encoded_input=None):
        if encoded_input is None:
            self._encode_prompt(prompt)
            encoded_input = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        if self.model_type == "bert":
            mask_idx = self.lm.mask_position(encoded_input["input_ids"][0].tolist(), prompt)
        else:
            mask_idx = -1
        if target is not None:
            target = self._target_label(target)
        return encoded_input, mask_idx, target

    @torch.no_grad()
    def _next(self, ids: list):
        """Probabilities [V] at the target position of one context (runtime)."""
        x = torch.tensor([ids], device=self.lm.device)
        pos = torch.tensor([self.lm.target_position(ids)], device=self.lm.device)
        return self.lm.run(x, logits=pos).logits[0].float().softmax(-1)

    def _contexts(self, prompt: str, n: int) -> list:
        """Token ids of the n contexts the package scores: the prompt, then the
        prompt with 1, 2, ... greedy tokens appended as text and re-tokenised."""
        out = []
        for i in range(n):
            ids = self._encode_prompt(prompt)
            out.append(ids)
            if i < n - 1:
                prompt += self.tokenizer.decode([int(self._next(ids).argmax())])
        return out

    def _steps(self, label) -> int:
        return len(label) if (self._multi and label is not None) else 1

    def _generate(self, prompt, ground_truth, first=None):
        """(gt_prob, argmax_prob, argmax_completion_str, argmax_tokens), as the
        package; ``first``: the probabilities of the first step, if known."""
        label = None if ground_truth is None else self._target_label(ground_truth)
        gt, am, toks, text = [], [], [], ""
        for i in range(self._steps(label)):
            probs = first if (i == 0 and first is not None) else self._next(self._encode_prompt(prompt))
            if label is not None:
                tid = label[i] if self.model_type != "bert" else label
                gt.append(probs[tid].item())
            p, a = probs.max(-1)
            toks.append(int(a))
            am.append(p.item())
            s = self.tokenizer.decode([int(a)])
            prompt += s
            text += s
        gt_prob = None if label is None else (math.prod(gt) if len(gt) > 1 else gt[0])
        return gt_prob, (math.prod(am) if len(am) > 1 else am[0]), text, toks

    @staticmethod
    def scaled_input(activations: torch.Tensor, steps: int = 20, device: str = "cpu"):
        """The activations tiled ``steps`` times along the batch, scaled by
        ``linspace(0, 1, steps)`` (the package's IG points)."""
        tiled = activations.repeat(steps, 1)
        return tiled * torch.linspace(start=0, end=1, steps=steps).to(device)[:, None]

    @torch.no_grad()
    def get_baseline_with_activations(self, encoded_input: dict, layer_idx: int, mask_idx: int):
        """(outputs with ``.logits`` [B, T, V], the neuron-site activations at
        ``mask_idx`` of layer ``layer_idx`` [B, d_ff]) of the unmodified model."""
        from transformers.modeling_outputs import CausalLMOutput, MaskedLMOutput

        ids = encoded_input["input_ids"].to(self.lm.device)
        mask = encoded_input.get("attention_mask")
        mask = None if mask is None else mask.to(self.lm.device)
        if not 0 <= layer_idx < self.lm.n_layers:
            raise InputError(f"layer {layer_idx} outside 0..{self.lm.n_layers - 1}")
        T = ids.shape[1]
        col = mask_idx if mask_idx >= 0 else T + mask_idx
        if not 0 <= col < T:
            raise InputError(f"position {mask_idx} outside a sequence of {T} tokens")
        out = self.lm.run(ids, attention_mask=mask, capture=[(self.site, layer_idx)],
                          capture_positions=torch.full((ids.shape[0],), col, device=ids.device))
        cls = MaskedLMOutput if self.lm.is_mlm else CausalLMOutput
        return cls(logits=out.logits), out[(self.site, layer_idx)][:, 0]

    # -- scores and neurons -------------------------------------------------------
    def _check_steps(self, steps, batch_size):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be a positive integer, got {steps!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")

    def _scores(self, prompts: list, ground_truth: str, steps: int, layers=None, pbar=False) -> torch.Tensor:
        """Scores [n_prompts, n_layers, d_ff] of every prompt, in one kncore run."""
        from ..attribution import attribute

        label = self._target_label(ground_truth)
        labels = label if isinstance(label, list) else [label]
        items_p, items_t, owner = [], [], []
        for k, prompt in enumerate(prompts):
            ctxs = self._contexts(prompt, len(labels)) if self._multi else [self._encode_prompt(prompt)]
            for ctx, tid in zip(ctxs, labels):
                items_p.append(_Tokens(prompt, ctx))
                items_t.append(_Tokens(ground_truth, [tid]))
                owner.append(k)
        att = attribute(self.lm, items_p, items_t, steps=steps, layers=layers, scheme="linspace",
                        site=self.site, multi_token="forbid", progress=pbar)
        own = torch.tensor(owner)
        out = torch.zeros(len(prompts), *att.scores.shape[1:], dtype=att.scores.dtype)
        out.index_add_(0, own, att.scores)
        out /= torch.bincount(own, minlength=len(prompts)).to(out.dtype)[:, None, None]
        return out.to(self.device)

    def get_scores(self, prompt: str, ground_truth: str, batch_size: int = 10, steps: int = 20,
                   pbar: bool = True) -> torch.Tensor:
        """Integrated-gradients scores [n_layers, d_ff] of ``ground_truth`` for ``prompt``."""
        self._check_steps(steps, batch_size)
        return self._scores([prompt], ground_truth, steps, pbar=pbar)[0]

    def get_scores_for_layer(self, prompt: str, ground_truth: str, layer_idx: int, batch_size: int = 10,
                             steps: int = 20, encoded_input: Optional[int] = None) -> torch.Tensor:
        """Scores [d_ff] of one layer."""
        self._check_steps(steps, batch_size)
        if not 0 <= layer_idx < self.lm.n_layers:
            raise InputError(f"layer {layer_idx} outside 0..{self.lm.n_layers - 1}")
        return self._scores([prompt], ground_truth, steps, layers=[layer_idx])[0, 0]

    @staticmethod
    def _coarse_rule(threshold, adaptive_threshold, percentile):
        if sum(e is not None for e in (threshold, adaptive_threshold, percentile)) != 1:
            raise InputError("Provide one and only one of threshold / adaptive_threshold / percentile")
        return dict(threshold=threshold, adaptive_threshold=adaptive_threshold, percentile=percentile)

    def get_coarse_neurons(self, prompt: str, ground_truth: str, batch_size: int = 10, steps: int = 20,
                           threshold: float = None, adaptive_threshold: float = None, percentile: float = None,
                           pbar: bool = True) -> List[List[int]]:
        """``[[layer, index], ...]`` with scores above the threshold (exactly one of
        ``threshold``, ``adaptive_threshold`` (x max), ``percentile``)."""
        rule = self._coarse_rule(threshold, adaptive_threshold, percentile)
        scores = self.get_scores(prompt, ground_truth, batch_size=batch_size, steps=steps, pbar=pbar)
        return select_coarse(scores.cpu(), **rule).to_list()

    def get_refined_neurons(self, prompts: List[str], ground_truth: str, p: float = 0.5, batch_size: int = 10,
                            steps: int = 20, coarse_adaptive_threshold: Optional[float] = 0.3,
                            coarse_threshold: Optional[float] = None, coarse_percentile: Optional[float] = None,
                            quiet=False, *, negative_examples: Optional[List[str]] = None) -> List[List[int]]:
        """Neurons in the coarse sets of more than ``len(prompts) * p`` prompts,
        in the package's order (first appearance)."""
        if not isinstance(prompts, list):
            raise InputError("Must provide a list of different prompts to get refined neurons")
        if not prompts:
            raise InputError("no prompts given")
        if not 0.0 <= p < 1.0:
            raise InputError("p should be a float between 0 and 1")
        self._check_steps(steps, batch_size)
        rule = self._coarse_rule(coarse_threshold, coarse_adaptive_threshold, coarse_percentile)
        negs = list(negative_examples or [])
        scores = self._scores(list(prompts) + negs, ground_truth, steps, pbar=not quiet).cpu()
        coarse = select_coarse(scores, **rule)
        pos, neg = coarse[: len(prompts)], coarse[len(prompts):]
        if not quiet:
            print(f"\n{sum(len(c) for c in pos)} coarse neurons found - refining")
        kept = refine([pos], p=p, negatives=[neg] if negative_examples is not None else None)[0]
        order = collections.OrderedDict()
        for c in pos:
            for n in c.neurons:
                if n in kept:
                    order.setdefault(n, None)
        refined = [list(n) for n in order]
        if not quiet:
            print(f"{len(refined)} neurons remaining after refining")
        return refined

    # -- interventions ------------------------------------------------------------------
    def _report(self, when, res, quiet):
        if not quiet:
            gt, am, text = res[0], res[1], res[2]
            print(f"\n{when} modification - groundtruth probability: {gt}\nArgmax completion: `{text}`\n"
                  f"Argmax prob: {am}\n")
        return {"gt_prob": res[0], "argmax_completion": res[2], "argmax_prob": res[1]}

    def modify_activations(self, prompt: str, ground_truth: str, neurons: List[List[int]], mode: str = "suppress",
                           undo_modification: bool = True, quiet: bool = False) -> Tuple[dict, Callable]:
        """Probabilities before and after scaling ``neurons`` (x0 for
        ``"suppress"``, x2 for ``"enhance"``) at the target position.

        Returns ``(results, unpatch_fn)``; with ``undo_modification=False`` the
        model stays modified (in the kncore runtime and the Hugging Face
        forward) until ``unpatch_fn()`` is called.
        """
        if mode not in ("suppress", "enhance"):
            raise InputError(f"mode must be 'suppress' or 'enhance', got {mode!r}")
        _, _, label = self._prepare_inputs(prompt, ground_truth)
        patch = patch_neurons(self.lm, neurons, mode=mode, factor=2.0, positions="target", site=self.site)
        if self._steps(label) == 1:
            # Before and after in one forward of two rows, the patch on row 1
            # only: one pass over the weights instead of two (a forward at
            # these sizes is bound by reading the weights).
            ids = self._encode_prompt(prompt)
            pos = self.lm.target_position(ids)
            dev = self.lm.device
            with torch.no_grad():
                logits = self.lm.run(torch.tensor([ids, ids], device=dev), logits=torch.tensor([pos, pos], device=dev),
                                     patches=patch.as_patches(rows=[1], positions=[pos])).logits
            probs = logits.float().softmax(-1)
            results = {"before": self._report("Before", self._generate(prompt, ground_truth, probs[0]), quiet),
                       "after": self._report("After", self._generate(prompt, ground_truth, probs[1]), quiet)}
            if undo_modification:
                return results, lambda *args: args
            return results, patch.apply().remove
        results = {"before": self._report("Before", self._generate(prompt, ground_truth), quiet)}
        patch.apply()
        try:
            results["after"] = self._report("After", self._generate(prompt, ground_truth), quiet)
        except BaseException:
            patch.remove()
            raise
        unpatch_fn = patch.remove
        if undo_modification:
            unpatch_fn()
            unpatch_fn = lambda *args: args
        return results, unpatch_fn

    def suppress_knowledge(self, prompt: str, ground_truth: str, neurons: List[List[int]],
                           undo_modification: bool = True, quiet: bool = False) -> Tuple[dict, Callable]:
        """:meth:`modify_activations` with the neurons' activations set to 0."""
        return self.modify_activations(prompt=prompt, ground_truth=ground_truth, neurons=neurons, mode="suppress",
                                       undo_modification=undo_modification, quiet=quiet)

    def enhance_knowledge(self, prompt: str, ground_truth: str, neurons: List[List[int]],
                          undo_modification: bool = True, quiet: bool = False) -> Tuple[dict, Callable]:
        """:meth:`modify_activations` with the neurons' activations doubled."""
        return self.modify_activations(prompt=prompt, ground_truth=ground_truth, neurons=neurons, mode="enhance",
                                       undo_modification=undo_modification, quiet=quiet)

    @torch.no_grad()
    def modify_weights(self, prompt: str, neurons: List[List[int]], target: str, mode: str = "edit",
                       erase_value: str = "zero", undo_modification: bool = True,
                       quiet: bool = False) -> Tuple[dict, Callable]:
        """Edit the down-projection rows of ``neurons``: ``"erase"`` sets them to
        zero (or BERT's [UNK] embedding); ``"edit"`` (BERT) subtracts twice the
        embedding of the current prediction and adds twice the target's."""
        if mode not in ("edit", "erase"):
            raise InputError(f"mode must be 'edit' or 'erase', got {mode!r}")
        if erase_value not in ("zero", "unk"):
            raise InputError(f"erase_value must be 'zero' or 'unk', got {erase_value!r}")
        if mode == "edit" and self.model_type != "bert":
            raise InputError("edit mode currently only works for bert models (as in knowledge-neurons)")
        if erase_value == "unk" and self.model_type != "bert":
            raise InputError("GPT models don't have an unk token (erase_value='unk' is for BERT)")
        if mode == "edit" and target is None:
            raise InputError("edit mode needs a target")
        self._prepare_inputs(prompt, target)
        pairs = [(int(l), int(i)) for l, i in neurons]
        for l, i in pairs:
            if not (0 <= l < self.lm.n_layers and 0 <= i < self.lm.d_ff):
                raise InputError(f"neuron ({l}, {i}) outside {self.lm.n_layers} layers x {self.lm.d_ff}")
        before = self._generate(prompt, target)
        results = {"before": self._report("Before", before, quiet)}
        emb = self.lm.adapter.embedding_module().weight
        if mode == "edit":
            delta = (emb[self._target_label(target)] - emb[before[3][0]]) * 2
        else:
            value = 0 if erase_value == "zero" else emb[self.tokenizer.unk_token_id]
        saved = []
        for l, i in pairs:
            w = self.lm.adapter.down_weight(l)  # [d_ff, d_model] view: row i is neuron i's value vector
            saved.append((w, i, w[i].clone()))
            if mode == "edit":
                w[i] += delta
            else:
                w[i] = value

        def unpatch_fn():
            with torch.no_grad():
                for w, i, old in reversed(saved):
                    w[i] = old

        try:
            results["after"] = self._report("After", self._generate(prompt, target), quiet)
        except BaseException:
            unpatch_fn()
            raise
        if undo_modification:
            unpatch_fn()
            unpatch_fn = lambda *args: args
        return results, unpatch_fn

    def edit_knowledge(self, prompt: str, target: str, neurons: List[List[int]], undo_modification: bool = True,
                       quiet: bool = False) -> Tuple[dict, Callable]:
        return self.modify_weights(prompt=prompt, neurons=neurons, target=target, mode="edit",
                                   undo_modification=undo_modification, quiet=quiet)

    def erase_knowledge(self, prompt: str, neurons: List[List[int]], erase_value: str = "zero",
                        target: Optional[str] = None, undo_modification: bool = True,
                        quiet: bool = False) -> Tuple[dict, Callable]:
        return self.modify_weights(prompt=prompt, neurons=neurons, target=target, mode="erase",
                                   erase_value=erase_value, undo_modification=undo_modification, quiet=quiet)
