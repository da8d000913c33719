"""Gemma-2 and Gemma-3 text models: the LLaMA layout with

* token embeddings scaled by sqrt(d_model);
* RMSNorms that scale by (1 + weight) (the Hugging Face modules do it);
* a norm before and after each sublayer (BLOCK_SANDWICH: input_layernorm ->
  attention -> post_attention_layernorm, pre_feedforward_layernorm -> MLP ->
  post_feedforward_layernorm); attn_out and mlp_out are the sublayer outputs
  before their post-norms, as the Hugging Face modules return them;
* GELU-tanh gating, gelu_tanh(gate) * up (the neurons);
* scores scaled by query_pre_attn_scalar^-1/2 (the attention's ``scaling``);
* Gemma-2: scores soft-capped at attn_logit_softcapping, and sliding-window
  layers (every other one) masked exactly;
* logits soft-capped at final_logit_softcapping;
* Gemma-3: q and k RMSNorms per head, and its own rotary base for local
  (sliding) and global layers.
"""
from __future__ import annotations

import inspect

import torch

from .base import BLOCK_SANDWICH
from .llama import LlamaAdapter


class Gemma2Adapter(LlamaAdapter):
    arch = "gemma2"
    block_style = BLOCK_SANDWICH
    exact_windows = True
    ln2_path = "pre_feedforward_layernorm"

    def __init__(self, model):
        super().__init__(model)
        c = self.config
        if getattr(c, "use_bidirectional_attention", False):
            raise ValueError(f"{type(model).__name__} uses bidirectional attention (an embedding model); "
                             "kncore supports the causal Gemma language models")
        self.final_softcap = getattr(c, "final_logit_softcapping", None)
        # transformers >= 5 scales inside the embedding module (embed_scale);
        # earlier versions multiply the embedding output by this in the model.
        # Causal tracing's noise goes on the module's output either way (the
        # ``embed`` site), as ROME's forward hook on that module puts it: after
        # the scale with transformers 5, before it with 4.x, and its "3sd" is
        # measured on the same output (kncore.tracing.embedding_std).
        self._embed_scale = None if hasattr(self.base.embed_tokens, "embed_scale") else self.d_model ** 0.5

    def embed_rest(self, tok, position_ids):
        return tok if self._embed_scale is None else tok * torch.tensor(self._embed_scale, dtype=tok.dtype)

    def post_attn_norm(self, L, a):
        return self.blocks[L].post_attention_layernorm(a)

    def post_mlp_norm(self, L, m):
        return self.blocks[L].post_feedforward_layernorm(m)

    def attn_softcap(self, L):
        return getattr(self.config, "attn_logit_softcapping", None)

    def final(self, h):
        logits = super().final(h)
        c = self.final_softcap
        return logits if c is None else torch.tanh(logits / c) * c


class Gemma3Adapter(Gemma2Adapter):
    arch = "gemma3_text"

    def attn_softcap(self, L):
        return None  # Hugging Face's Gemma-3 attention does not soft-cap its scores

    def __init__(self, model):
        super().__init__(model)
        rot = self.base.rotary_emb
        # transformers 5: one module with a table per layer type; 4.x: a second
        # module (rotary_emb_local) with the local base
        self._rope_by_type = "layer_type" in inspect.signature(rot.forward).parameters

    def _rope(self, L, x, position_ids):
        rot = self.base.rotary_emb
        layer_type = self.config.layer_types[L]
        if self._rope_by_type:
            return rot(x, position_ids, layer_type)
        local = getattr(self.base, "rotary_emb_local", None)
        return (local if layer_type == "sliding_attention" and local is not None else rot)(x, position_ids)
