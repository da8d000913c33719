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

from .base import Adapter, BLOCK_PARALLEL, BLOCK_SEQUENTIAL, MLPModules
from .llama import rope


class GPTNeoXAdapter(Adapter):
    arch = "gpt_neox"
    mlp_norm_shared = False

    def __init__(self, model):
        super().__init__(model)
        c = self.config
        self.tr = model.gpt_neox
        self.blocks = self.tr.layers
        self.block_style = BLOCK_PARALLEL if c.use_parallel_residual else BLOCK_SEQUENTIAL
        self._standard_dims()

    def embedding_module(self):
        return self.tr.embed_in

    def ln1(self, L, h):
        return self.blocks[L].input_layernorm(h)

    def ln2(self, L, h):
        return self.blocks[L].post_attention_layernorm(h)

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

    def attn_proj(self, L, o):
        return self.blocks[L].attention.dense(o)

    def mlp_modules(self, L):
        m = self.blocks[L].mlp
        return MLPModules(m.dense_h_to_4h, m.act)

    def down_module(self, L):
        return self.blocks[L].mlp.dense_4h_to_h

    def final(self, h):
        # the head is lm_head in transformers 5, embed_out in 4
        return self.model.get_output_embeddings()(self.tr.final_layer_norm(h))

    def layer_module_name(self, L, kind=None):
        base = f"gpt_neox.layers.{L}"
        return base if kind is None else f"{base}.{ {'mlp': 'mlp', 'attn': 'attention'}[kind] }"
