"""LLaMA-family adapter (LLaMA-2, SmolLM2, Mistral-style grouped-query
attention, RMSNorm, SwiGLU). The default neuron site is silu(gate) * up; the
pre-activation site is the gate projection.

The variants of this layout are subclasses that name what differs (Qwen2/3 in
:mod:`.qwen`, Gemma-2/3 in :mod:`.gemma`): q/k/v biases need nothing (the
Linear layers carry them); per-head q and k norms are applied where the
attention module has them; ``_rope`` picks a layer's rotary table;
``exact_windows`` masks sliding-window layers exactly instead of capping the
context."""
from __future__ import annotations

import torch

from .base import Adapter


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(t, cos, sin):
    """Rotary embedding on half-split pairs (LLaMA, GPT-NeoX): cos/sin broadcast to t."""
    return t * cos + _rotate_half(t) * sin


class LlamaAdapter(Adapter):
    arch = "llama"
    adds_bos = True
    blocks_path, embedding_path = "model.layers", "model.embed_tokens"
    ln1_path, ln2_path, attn_out_path = "input_layernorm", "post_attention_layernorm", "self_attn.o_proj"
    mlp_paths, down_path = ("mlp", "gate_proj", "act_fn", "up_proj"), "mlp.down_proj"
    final_norm_path, head_path = "model.norm", "lm_head"
    module_kinds = {"mlp": "mlp", "attn": "self_attn"}
    # False: a config's sliding_window caps the context (prompts longer are
    # refused); True: the layers the config marks "sliding_attention" (every
    # layer when it names none) get the exact window mask (attn_window).
    exact_windows = False

    def __init__(self, model):
        super().__init__(model)
        c = self.config
        self.base = model.model
        self._standard_dims()
        W = getattr(c, "sliding_window", None)
        self._windows = [None] * self.n_layers
        if W and self.exact_windows:
            types = getattr(c, "layer_types", None) or ["sliding_attention"] * self.n_layers
            self._windows = [W if t == "sliding_attention" else None for t in types]
        elif W and W < self.n_ctx:
            # Mistral's sliding window: prompts longer than it are refused by
            # the tokenisation helpers rather than silently mis-attended.
            self.n_ctx = W

    def qkv(self, L, x, position_ids):
        a = self.blocks[L].self_attn
        B, n, _ = x.shape
        q = a.q_proj(x).view(B, n, self.n_heads, self.head_dim)
        k = a.k_proj(x).view(B, n, self.n_kv_heads, self.head_dim)
        v = a.v_proj(x).view(B, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if getattr(a, "q_norm", None) is not None:  # Qwen3, Gemma-3: RMSNorm per head, before rotary
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = self._rope(L, x, position_ids)
        cos, sin = cos[:, None], sin[:, None]
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        return q, k, v

    def _rope(self, L, x, position_ids):
        """(cos, sin) [B, n, Dh] of block L's rotary embedding."""
        return self.base.rotary_emb(x, position_ids)  # HF handles every rope type

    def attn_window(self, L):
        return self._windows[L]

    def attn_scale(self, L):
        return self.blocks[L].self_attn.scaling

