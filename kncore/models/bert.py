"""BERT masked-LM adapter: post-LayerNorm blocks, bidirectional attention.
Only the MLM head at the [MASK] position is scored."""
from __future__ import annotations

import torch

from .base import Adapter, BLOCK_POST_LN


class BertAdapter(Adapter):
    arch = "bert"
    causal = False
    block_style = BLOCK_POST_LN
    blocks_path, embedding_path = "bert.encoder.layer", "bert.embeddings.word_embeddings"
    attn_out_path = "attention.output.dense"
    mlp_paths, down_path = ("intermediate", "dense", "intermediate_act_fn"), "output.dense"
    module_kinds = {"mlp": "output", "attn": "attention"}

    def __init__(self, model):
        if not hasattr(model, "cls") or not hasattr(model, "bert"):
            raise ValueError("BERT is supported as a masked LM (BertForMaskedLM)")
        super().__init__(model)
        self.enc = model.bert
        self._standard_dims()
        pet = getattr(self.config, "position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise ValueError(f"BERT position_embedding_type={pet!r} is not supported (only 'absolute')")

    def embed_rest(self, tok, position_ids):
        # position and (all-zero) token-type embeddings, then the embedding
        # LayerNorm: the noise of causal tracing goes in before the norm
        e = self.enc.embeddings
        x = tok + e.position_embeddings(position_ids)
        x = x + e.token_type_embeddings(torch.zeros_like(position_ids))
        return e.LayerNorm(x)

    def ln1(self, L, h):
        return h  # post-LN: attention reads the residual directly

    def ln2(self, L, h):
        return h

    def qkv(self, L, x, position_ids):
        a = self.blocks[L].attention.self
        B, n, _ = x.shape
        shape = (B, n, self.n_heads, self.head_dim)
        return (a.query(x).view(shape).transpose(1, 2), a.key(x).view(shape).transpose(1, 2),
                a.value(x).view(shape).transpose(1, 2))

    def post_attn_norm(self, L, h):
        return self.blocks[L].attention.output.LayerNorm(h)

    def post_mlp_norm(self, L, h):
        return self.blocks[L].output.LayerNorm(h)

    def final(self, h):
        return self.model.cls(h)
