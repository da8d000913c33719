"""GPT-2 adapter. Conv1D weights are stored as [in, out] (transposed).

:class:`GPT2Layout` is what GPT-2 and GPT-J share: the config's names for the
dimensions and the ``transformer.h`` / ``wte`` / ``ln_f`` module layout."""
from __future__ import annotations

from .base import Adapter


class GPT2Layout(Adapter):
    blocks_path, embedding_path = "transformer.h", "transformer.wte"
    final_norm_path, head_path = "transformer.ln_f", "lm_head"
    ln1_path = "ln_1"

    def __init__(self, model):
        super().__init__(model)
        self.tr = model.transformer
        c = self.config
        self.n_layers = c.n_layer
        self.d_model = c.n_embd
        self.d_ff = c.n_inner if c.n_inner is not None else 4 * c.n_embd
        self.n_heads = self.n_kv_heads = c.n_head
        self.head_dim = c.n_embd // c.n_head
        self.n_ctx = c.n_positions
        self.vocab_size = c.vocab_size


class GPT2Adapter(GPT2Layout):
    arch = "gpt2"
    ln2_path, attn_out_path = "ln_2", "attn.c_proj"
    mlp_paths, down_path = ("mlp", "c_fc", "act"), "mlp.c_proj"

    def __init__(self, model):
        super().__init__(model)
        if getattr(self.config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention is not supported")

    def embed_rest(self, tok, position_ids):
        return tok + self.tr.wpe(position_ids)

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

    def down_weight(self, L):
        return self.blocks[L].mlp.c_proj.weight  # Conv1D: already [d_ff, d_model]
