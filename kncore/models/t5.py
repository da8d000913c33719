"""T5 adapter (encoder-decoder): T5 v1.0 and T5 v1.1 / Flan-T5.

Unlike the decoder-only adapters, a T5 model has two stacks. ``T5Adapter`` is
the decoder stack (layer L = decoder block L; every method's default, so
``down_module(L)``, ``down_weight(L)`` and neuron indices mean the decoder's
MLP), and ``T5Adapter.encoder`` is a :class:`T5StackAdapter` over the encoder
blocks with the same pieces. The layer loops are in :mod:`kncore.runtime_t5`;
this file holds only the model knowledge:

* pre-norm blocks with the RMS-style ``T5LayerNorm`` (no mean, no bias);
* attention scores are not scaled (scale 1.0) and get a relative position
  bias, computed from the first block's ``relative_attention_bias`` of each
  stack and shared by every block of that stack (bidirectional buckets in the
  encoder, causal ones in the decoder); cross-attention has no bias;
* the MLP is ``DenseReluDense``: v1.0 ``wo(relu(wi x))``, v1.1 / Flan-T5
  ``wo(gelu_tanh(wi_0 x) * wi_1 x)``; the neuron site ``act`` is the input of
  ``wo``, ``pre_act`` is ``wi x`` (v1.1: ``wi_0 x``, the gate);
* the head: the decoder's final norm, then v1.0 (tied embeddings) rescales by
  d_model**-0.5 before ``lm_head``; v1.1 (untied) does not.
"""
from __future__ import annotations

import torch

from .base import Adapter, BLOCK_SEQUENTIAL, activation

# The two layouts: feed_forward_proj -> (gated, the activation HF builds).
# v1.1's "gated-gelu" is HF's gelu_new (the tanh GELU).
LAYOUTS = {"relu": "T5 v1.0 (DenseReluDense, ReLU)",
           "gated-gelu": "T5 v1.1 / Flan-T5 (DenseGatedActDense, gated tanh GELU)"}


def check_layout(config) -> str:
    """The config's feed_forward_proj if it is a v1.0 or v1.1 layout, else a one-line error."""
    ffp = getattr(config, "feed_forward_proj", None)
    if ffp not in LAYOUTS:
        raise ValueError(f"unsupported T5 layout feed_forward_proj={ffp!r}: kncore runs "
                         + " and ".join(f"{k!r} ({v})" for k, v in LAYOUTS.items()))
    return ffp


class T5StackAdapter(Adapter):
    """The pieces of one T5 stack (encoder or decoder blocks)."""

    arch = "t5"
    block_style = BLOCK_SEQUENTIAL

    def __init__(self, model, stack):
        super().__init__(model)
        c = self.config
        self.stack = stack
        self.blocks = stack.block
        self.is_decoder = bool(stack.is_decoder)
        self.causal = self.is_decoder
        self.n_layers = len(self.blocks)
        self.d_model = c.d_model
        self.d_ff = c.d_ff
        self.n_heads = self.n_kv_heads = c.num_heads
        self.head_dim = c.d_kv
        # Relative positions put no hard limit on the length; T5 was trained on
        # 512-token inputs (HF's n_positions where a config still has it).
        self.n_ctx = int(getattr(c, "n_positions", None) or 512)
        self.vocab_size = c.vocab_size
        self.gated = check_layout(c) == "gated-gelu"
        self._ff = lambda L: self.blocks[L].layer[-1]
        self._rel = self.blocks[0].layer[0].SelfAttention

    # -- model knowledge ---------------------------------------------------------------
    def embed(self, input_ids, position_ids=None):
        return self.stack.embed_tokens(input_ids)

    def embedding_module(self):
        return self.stack.embed_tokens

    def ln1(self, L, h):
        return self.blocks[L].layer[0].layer_norm(h)

    def ln_cross(self, L, h):
        return self.blocks[L].layer[1].layer_norm(h)

    def ln2(self, L, h):
        return self._ff(L).layer_norm(h)

    def attn_scale(self, L):
        return 1.0  # T5 folds the scale into its initialisation

    def _heads(self, lin, x):
        B, n, _ = x.shape
        return lin(x).view(B, n, self.n_heads, self.head_dim).transpose(1, 2)

    def qkv(self, L, x, position_ids=None):
        a = self.blocks[L].layer[0].SelfAttention
        return self._heads(a.q, x), self._heads(a.k, x), self._heads(a.v, x)

    def attn_proj(self, L, o):
        return self.blocks[L].layer[0].SelfAttention.o(o)

    def cross_q(self, L, x):
        return self._heads(self.blocks[L].layer[1].EncDecAttention.q, x)

    def cross_kv(self, L, enc_h):
        a = self.blocks[L].layer[1].EncDecAttention
        return self._heads(a.k, enc_h), self._heads(a.v, enc_h)

    def cross_proj(self, L, o):
        return self.blocks[L].layer[1].EncDecAttention.o(o)

    def position_bias(self, qpos, kpos):
        """[B, H, n, K] bias of queries at positions qpos [B, n] over keys at kpos [B, K]."""
        rel = kpos[:, None, :] - qpos[:, :, None]
        buckets = self._rel._relative_position_bucket(
            rel, bidirectional=not self.is_decoder, num_buckets=self._rel.relative_attention_num_buckets,
            max_distance=self._rel.relative_attention_max_distance)
        return self._rel.relative_attention_bias(buckets).permute(0, 3, 1, 2)

    def mlp_pre(self, L, x):
        d = self._ff(L).DenseReluDense
        if self.gated:
            return d.wi_0(x), d.wi_1(x)
        return d.wi(x), None

    def mlp_act(self, L, pre, aux, inplace=False):
        d = self._ff(L).DenseReluDense
        if self.gated:
            return activation(d.act, pre, inplace) * aux
        return torch.relu_(pre) if inplace and type(d.act).__name__ == "ReLU" else d.act(pre)

    def pre_act_module(self, L):
        d = self._ff(L).DenseReluDense
        return d.wi_0 if self.gated else d.wi

    def down_module(self, L):
        return self._ff(L).DenseReluDense.wo

    def down_bias(self, L):
        return None

    def mlp_down(self, L, act):
        # HF keeps Flan-T5-XXL's wo in fp32 and casts its input to wo's dtype.
        w = self.down_weight(L)
        return act.to(w.dtype) @ w

    def final_norm(self, h):
        return self.stack.final_layer_norm(h)

    def layer_module_name(self, L, kind=None):
        base = f"{'decoder' if self.is_decoder else 'encoder'}.block.{L}"
        if kind is None:
            return base
        return f"{base}.{ {'mlp': f'layer.{len(self.blocks[L].layer) - 1}', 'attn': 'layer.0'}[kind] }"


class T5Adapter(T5StackAdapter):
    """T5ForConditionalGeneration: the decoder stack, with ``.encoder`` beside it."""

    encoder_decoder = True

    def __init__(self, model):
        if not all(hasattr(model, a) for a in ("encoder", "decoder", "lm_head")):
            raise ValueError(f"T5 is supported as T5ForConditionalGeneration (encoder, decoder and lm_head); "
                             f"got {type(model).__name__}")
        super().__init__(model, model.decoder)
        self.encoder = T5StackAdapter(model, model.encoder)
        c = self.config
        # transformers 5 keeps v1.0's rescale in scale_decoder_outputs (it ties
        # every T5); transformers 4 reads tie_word_embeddings.
        self.rescale = bool(getattr(c, "scale_decoder_outputs", getattr(c, "tie_word_embeddings", True)))
        self.start_id = c.decoder_start_token_id if c.decoder_start_token_id is not None else c.pad_token_id
        if self.start_id is None:
            raise ValueError("this T5 config has neither decoder_start_token_id nor pad_token_id")

    def stack_adapter(self, stack: str) -> T5StackAdapter:
        if stack not in ("decoder", "encoder"):
            raise ValueError(f"stack must be 'decoder' or 'encoder', got {stack!r}")
        return self if stack == "decoder" else self.encoder

    def final(self, h):
        h = self.final_norm(h)
        if self.rescale:
            h = h * self.d_model ** -0.5
        return self.model.lm_head(h)
