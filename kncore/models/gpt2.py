"""GPT-2 adapter. Conv1D weights are stored as [in, out] (transposed)."""
from __future__ import annotations

from .base import Adapter, MLPModules, BLOCK_SEQUENTIAL


class GPT2Adapter(Adapter):
    arch = "gpt2"
    causal = True
    block_style = BLOCK_SEQUENTIAL

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
        self.n_ctx = c.n_positions
        self.vocab_size = c.vocab_size
        if getattr(c, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention is not supported")

    def embed_rest(self, tok, position_ids):
        return tok + self.tr.wpe(position_ids)

    def embedding_module(self):
        return self.tr.wte

    def ln1(self, L, h):
        return self.blocks[L].ln_1(h)

    def ln2(self, L, h):
        return self.blocks[L].ln_2(h)

    def qkv(self, L, x, position_ids):
        B, n, _ = x.shape
        q, k, v = self.blocks[L].attn.c_attn(x).split(self.d_model, dim=2)
        shape = (B, n, self.n_heads, self.head_dim)
        return (q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2),
                v.view(shape).transpose(1, 2))

    def attn_scale(self, L):
        return self.blocks[L].attn.scaling

    def attn_upcast(self):
        return bool(self.config.reorder_and_upcast_attn)

    def attn_proj(self, L, o):
        return self.blocks[L].attn.c_proj(o)

    def mlp_modules(self, L):
        m = self.blocks[L].mlp
        return MLPModules(m.c_fc, m.act)

    def down_module(self, L):
        return self.blocks[L].mlp.c_proj

    def down_weight(self, L):
        return self.blocks[L].mlp.c_proj.weight  # Conv1D: already [d_ff, d_model]

    def final(self, h):
        return self.model.lm_head(self.tr.ln_f(h))

    def layer_module_name(self, L, kind=None):
        base = f"transformer.h.{L}"
        return base if kind is None else f"{base}.{kind}"
