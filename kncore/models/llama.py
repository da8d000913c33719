"""LLaMA-family adapter (LLaMA-2, SmolLM2, Mistral-style grouped-query
attention, RMSNorm, SwiGLU). The default neuron site is silu(gate) * up; the
pre-activation site is the gate projection."""
from __future__ import annotations

import torch

from .base import Adapter, BLOCK_SEQUENTIAL, MLPModules, activation


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class LlamaAdapter(Adapter):
    arch = "llama"
    causal = True
    block_style = BLOCK_SEQUENTIAL
    adds_bos = True

    def __init__(self, model):
        super().__init__(model)
        c = self.config
        self.base = model.model
        self.blocks = self.base.layers
        self.n_layers = c.num_hidden_layers
        self.d_model = c.hidden_size
        self.d_ff = c.intermediate_size
        self.n_heads = c.num_attention_heads
        self.n_kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.n_ctx = c.max_position_embeddings
        self.vocab_size = c.vocab_size
        if getattr(c, "sliding_window", None) and c.sliding_window < self.n_ctx:
            # Mistral's sliding window: prompts longer than it are refused by
            # the tokenisation helpers rather than silently mis-attended.
            self.n_ctx = c.sliding_window

    def embed(self, input_ids, position_ids):
        return self.base.embed_tokens(input_ids)

    def embedding_module(self):
        return self.base.embed_tokens

    def ln1(self, L, h):
        return self.blocks[L].input_layernorm(h)

    def ln2(self, L, h):
        return self.blocks[L].post_attention_layernorm(h)

    def qkv(self, L, x, position_ids):
        a = self.blocks[L].self_attn
        B, n, _ = x.shape
        q = a.q_proj(x).view(B, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(B, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(B, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.base.rotary_emb(x, position_ids)  # HF handles every rope type
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def attn_scale(self, L):
        return self.blocks[L].self_attn.scaling

    def attn_proj(self, L, o):
        return self.blocks[L].self_attn.o_proj(o)

    def mlp_pre(self, L, x):
        m = self.blocks[L].mlp
        return m.gate_proj(x), m.up_proj(x)

    def mlp_act(self, L, pre, aux, inplace=False):
        if inplace:
            return activation(self.blocks[L].mlp.act_fn, pre, True).mul_(aux)
        return self.blocks[L].mlp.act_fn(pre) * aux

    def mlp_modules(self, L):
        m = self.blocks[L].mlp
        return MLPModules(m.gate_proj, m.act_fn, m.up_proj)

    def down_module(self, L):
        return self.blocks[L].mlp.down_proj

    def down_weight(self, L):
        return self.blocks[L].mlp.down_proj.weight.t()

    def down_bias(self, L):
        return self.blocks[L].mlp.down_proj.bias

    def final(self, h):
        return self.model.lm_head(self.base.norm(h))

    def layer_module_name(self, L, kind=None):
        base = f"model.layers.{L}"
        return base if kind is None else f"{base}.{ {'mlp': 'mlp', 'attn': 'self_attn'}[kind] }"
