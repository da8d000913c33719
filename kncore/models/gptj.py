"""GPT-J adapter: parallel attention and MLP from one LayerNorm, rotary on
the first ``rotary_dim`` dims of each head (interleaved pairs)."""
from __future__ import annotations

import torch

from .base import Adapter, MLPModules, BLOCK_PARALLEL


def _rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class GPTJAdapter(Adapter):
    arch = "gptj"
    causal = True
    block_style = BLOCK_PARALLEL

    def __init__(self, model):
        super().__init__(model)
        c = self.config
        self.tr = model.transformer
        self.blocks = self.tr.h
        self.n_layers = c.n_layer
        self.d_model = c.n_embd
        self.d_ff = c.n_inner if c.n_inner is not None else 4 * c.n_embd
        self.n_heads = self.n_kv_heads = c.n_head
        self.head_dim = c.n_embd // c.n_head
        self.rotary_dim = c.rotary_dim
        self.n_ctx = c.n_positions
        self.vocab_size = c.vocab_size

    def embedding_module(self):
        return self.tr.wte

    def ln1(self, L, h):
        return self.blocks[L].ln_1(h)

    ln2 = ln1  # parallel block: the MLP reads the same normed input

    def _rope(self, t, sin, cos):
        sin = torch.repeat_interleave(sin, 2, -1)[:, None]
        cos = torch.repeat_interleave(cos, 2, -1)[:, None]
        return t * cos + _rotate_every_two(t) * sin

    def _sincos(self, attn):
        # transformers < 5.2x keeps the table on every attention module, later
        # versions once on the model (transformer.rotary_emb)
        table = getattr(attn, "embed_positions", None)
        return table if table is not None else self.tr.rotary_emb.embed_positions

    def qkv(self, L, x, position_ids):
        a = self.blocks[L].attn
        B, n, _ = x.shape
        shape = (B, n, self.n_heads, self.head_dim)
        q = a.q_proj(x).view(shape).transpose(1, 2)
        k = a.k_proj(x).view(shape).transpose(1, 2)
        v = a.v_proj(x).view(shape).transpose(1, 2)
        sincos = self._sincos(a).to(x.device)[position_ids].to(k.dtype)  # [B, n, rot]
        sin, cos = sincos.chunk(2, dim=-1)
        r = self.rotary_dim or self.head_dim
        q = torch.cat([self._rope(q[..., :r], sin, cos), q[..., r:]], dim=-1)
        k = torch.cat([self._rope(k[..., :r], sin, cos), k[..., r:]], dim=-1)
        return q, k, v

    def attn_scale(self, L):
        a = self.blocks[L].attn
        scale_attn = getattr(a, "scale_attn", None)  # older transformers divide by sqrt(head_dim)
        return 1.0 / float(scale_attn) if scale_attn is not None else float(a.scaling)

    def attn_upcast(self):
        return True  # HF GPT-J computes scores in fp32

    def attn_proj(self, L, o):
        return self.blocks[L].attn.out_proj(o)

    def mlp_modules(self, L):
        m = self.blocks[L].mlp
        return MLPModules(m.fc_in, m.act)

    def down_module(self, L):
        return self.blocks[L].mlp.fc_out

    def final(self, h):
        return self.model.lm_head(self.tr.ln_f(h))

    def layer_module_name(self, L, kind=None):
        base = f"transformer.h.{L}"
        return base if kind is None else f"{base}.{kind}"
