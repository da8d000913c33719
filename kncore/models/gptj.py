"""GPT-J adapter: parallel attention and MLP from one LayerNorm, rotary on
the first ``rotary_dim`` dims of each head (interleaved pairs)."""
from __future__ import annotations

import torch

from .base import BLOCK_PARALLEL
from .gpt2 import GPT2Layout


def _rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class GPTJAdapter(GPT2Layout):
    arch = "gptj"
    block_style = BLOCK_PARALLEL
    ln2_path = "ln_1"  # parallel block: the MLP reads the same normed input as the attention
    attn_out_path = "attn.out_proj"
    mlp_paths, down_path = ("mlp", "fc_in", "act"), "mlp.fc_out"

    def __init__(self, model):
        super().__init__(model)
        self.rotary_dim = self.config.rotary_dim

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

