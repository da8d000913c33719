"""GPT-NeoX adapter (Pythia, GPT-NeoX-20B): LayerNorm, one fused q/k/v
projection, rotary on the first ``rotary_pct`` of each head (half-split
pairs, as LLaMA), GELU MLP, and the parallel residual on or off:

* ``use_parallel_residual`` (Pythia, 20B): h += attn(ln1 h) + mlp(ln2 h), both
  norms of the block input (BLOCK_PARALLEL with its own MLP norm);
* off: h += attn(ln1 h); h += mlp(ln2 h) (BLOCK_SEQUENTIAL).

The fused projection is laid out per head: its output [.., H * 3 * Dh] is H
groups of (q, k, v), each Dh wide, not three [H * Dh] blocks.
"""
from __future__ import annotations

import torch

from .base import Adapter, BLOCK_PARALLEL, BLOCK_SEQUENTIAL
from .llama import rope


class GPTNeoXAdapter(Adapter):
    arch = "gpt_neox"
    mlp_norm_shared = False
    blocks_path, embedding_path = "gpt_neox.layers", "gpt_neox.embed_in"
    ln1_path, ln2_path, attn_out_path = "input_layernorm", "post_attention_layernorm", "attention.dense"
    mlp_paths, down_path = ("mlp", "dense_h_to_4h", "act"), "mlp.dense_4h_to_h"
    module_kinds = {"mlp": "mlp", "attn": "attention"}

    def __init__(self, model):
        super().__init__(model)
        self.tr = model.gpt_neox
        self.block_style = BLOCK_PARALLEL if self.config.use_parallel_residual else BLOCK_SEQUENTIAL
        self._standard_dims()

    def qkv(self, L, x, position_ids):
        a = self.blocks[L].attention
        B, n, _ = x.shape
        qkv = a.query_key_value(x).view(B, n, self.n_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        cos, sin = self.tr.rotary_emb(x, position_ids)  # [B, n, rotary dims]
        cos, sin = cos[:, None], sin[:, None]
        r = cos.shape[-1]
        q = torch.cat([rope(q[..., :r], cos, sin), q[..., r:]], dim=-1)
        k = torch.cat([rope(k[..., :r], cos, sin), k[..., r:]], dim=-1)
        return q, k, v

    def final(self, h):
        # the head is lm_head in transformers 5, embed_out in 4
        return self.model.get_output_embeddings()(self.tr.final_layer_norm(h))
