"""Architecture adapters: the per-architecture pieces of one transformer block.

An adapter never copies weights: every method reads the Hugging Face modules it
was built from. The generic layer loop in :mod:`kncore.runtime` strings these
pieces together, so a new architecture is one adapter file and every method
(IG, causal tracing, ROME, KN interventions) gets it.

Shapes used throughout: hidden ``h`` is ``[B, n, d_model]``; queries are
``[B, H, n, Dh]``; keys and values ``[B, H_kv, n, Dh]`` (after rotary);
neuron activations ``[B, n, d_ff]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BLOCK_SEQUENTIAL = "sequential"  # pre-LN: h += attn(ln1 h); h += mlp(ln2 h)   (GPT-2, LLaMA)
BLOCK_PARALLEL = "parallel"      # pre-LN: h += attn(ln1 h) + mlp(ln1 h)        (GPT-J)
BLOCK_POST_LN = "post_ln"        # post-LN: h = ln(h + attn h); h = ln(h + mlp h) (BERT)
# pre- and post-norm around each sublayer: h += pn1(attn(ln1 h)); h += pn2(mlp(ln2 h)) (Gemma-2/3).
# attn_out and mlp_out are the sublayer outputs before their post-norms (the
# Hugging Face attention and MLP module outputs, the value space ROME edits).
BLOCK_SANDWICH = "sandwich"


# Hugging Face's tanh-approximate GELUs, written as several elementwise ops in
# Python (NewGELUActivation: pow, mul, add, tanh, mul, add, mul): one fused
# F.gelu(approximate="tanh") pass computes the same function. The two fp32
# evaluations differ by at most 4.8e-7 in absolute value (4M normal inputs of
# std 3), as far as each is from an fp64 evaluation (4.3e-7). On
# GPT-2-medium-shaped causal tracing on the 2-core CPU the Python form took
# 15% of the run (py-spy, bench/bench_trace.py).
_TANH_GELUS = ("NewGELUActivation", "FastGELUActivation", "GELUTanh", "PytorchGELUTanh")


_SILUS = ("SiLU", "SiLUActivation")


def activation(act, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``act(x)`` for a Hugging Face activation module, fused where it is a tanh
    GELU. ``inplace``: x may be overwritten (the runtime says so when no graph
    and no capture holds it); done for tanh GELUs and SiLU, with the same
    kernels, so the values are the same."""
    name = type(act).__name__
    if name in _TANH_GELUS:
        return torch.ops.aten.gelu_(x, approximate="tanh") if inplace else nn.functional.gelu(x, approximate="tanh")
    if inplace and name in _SILUS:
        return nn.functional.silu(x, inplace=True)
    return act(x)


@dataclass(frozen=True)
class MLPModules:
    """The Hugging Face modules of one block's MLP up to its activation:
    ``act(up(x))``, or ``act(up(x)) * gate_up(x)`` for gated MLPs (LLaMA's
    ``act_fn(gate_proj(x)) * up_proj(x)``). ``up``'s output is the
    ``pre_act`` site."""

    up: nn.Module
    act: Any
    gate_up: nn.Module | None = None


class Adapter:
    """Base class. Subclasses set the dimensions, declare where the Hugging
    Face modules are (the names below; the default pieces read them) and
    implement the pieces that are more than a module call.

    ``persistent_patches``: patches (or callables that build them for a call)
    that :func:`kncore.runtime.run` applies to every forward while they are
    held here (:func:`kncore.patch_neurons` adds and removes its entry).
    """

    arch: str = "?"
    causal: bool = True
    block_style: str = BLOCK_SEQUENTIAL
    adds_bos: bool = False
    # BLOCK_PARALLEL: the MLP reads ln1's output (GPT-J) or, False, its own
    # norm ln2 of the block input (GPT-NeoX's post_attention_layernorm).
    mlp_norm_shared: bool = True

    # -- where the modules are: dotted paths, from the model or from a block --
    # (empty: the adapter implements the piece itself)
    blocks_path: str = ""        # the blocks' ModuleList, from the model ("transformer.h")
    embedding_path: str = ""     # the token embedding, from the model
    ln1_path: str = ""           # the norm before attention, from a block
    ln2_path: str = ""           # the norm before the MLP, from a block
    attn_out_path: str = ""      # the attention's output projection, from a block
    # the MLP, from a block, then its up-projection, activation and (gated)
    # second up-projection, from the MLP: what mlp_modules returns
    mlp_paths: tuple = ()
    down_path: str = ""          # the down-projection (ROME edits it), from a block
    final_norm_path: str = ""    # the final norm, from the model
    head_path: str = ""          # the LM head, from the model
    # layer_module_name's kinds ("mlp", "attn") as paths from a block; None:
    # the kind is the block's attribute name itself
    module_kinds: dict | None = None

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.persistent_patches: list = []
        if self.blocks_path:
            self.blocks = get_module(model, self.blocks_path)

    def _block_module(self, L: int, path: str, piece: str) -> nn.Module:
        if not path:
            raise NotImplementedError(f"{type(self).__name__} declares no module for {piece}")
        return get_module(self.blocks[L], path)

    # -- dimensions ---------------------------------------------------------
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_ctx: int
    vocab_size: int

    def _standard_dims(self) -> None:
        """The dimensions from a config with Hugging Face's usual names
        (BERT, GPT-NeoX, LLaMA and its kin); grouped-query attention and an
        explicit head_dim where the config has them."""
        c = self.config
        self.n_layers = c.num_hidden_layers
        self.d_model = c.hidden_size
        self.d_ff = c.intermediate_size
        self.n_heads = c.num_attention_heads
        self.n_kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.n_ctx = c.max_position_embeddings
        self.vocab_size = c.vocab_size

    # -- pieces -------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The input of block 0: :meth:`embed_rest` of the token embeddings."""
        return self.embed_rest(self.embedding_module()(input_ids), position_ids)

    def embedding_module(self) -> nn.Module:
        """The token-embedding module. Its output is the runtime's ``embed``
        site, where causal tracing adds its noise: ROME hooks this module's
        output, so the noise and its scale ("3sd") are measured there."""
        if not self.embedding_path:
            raise NotImplementedError(f"{type(self).__name__} declares no embedding module")
        return get_module(self.model, self.embedding_path)

    def embed_rest(self, tok: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """What the model does to the token embeddings ``tok`` [B, n, d] (the
        ``embed`` site) before block 0: position embeddings, a scale, a norm.
        Nothing by default (rotary models)."""
        return tok

    def ln1(self, L: int, h: torch.Tensor) -> torch.Tensor:
        return self._block_module(L, self.ln1_path, "ln1")(h)

    def ln2(self, L: int, h: torch.Tensor) -> torch.Tensor:
        return self._block_module(L, self.ln2_path, "ln2")(h)

    def qkv(self, L: int, x: torch.Tensor, position_ids: torch.Tensor):
        """Return q [B,H,n,Dh], k and v [B,H_kv,n,Dh] with positions applied."""
        raise NotImplementedError

    def attn_scale(self, L: int) -> float:
        return self.head_dim ** -0.5

    def attn_softcap(self, L: int) -> float | None:
        """c where scores are soft-capped, c * tanh(s / c), before the mask (Gemma-2)."""
        return None

    def attn_window(self, L: int) -> int | None:
        """W where block L attends only to keys with query_pos - key_pos < W."""
        return None

    def attn_upcast(self) -> bool:
        """Whether scores are computed in fp32 whatever the model dtype."""
        return False

    def attn_proj(self, L: int, o: torch.Tensor) -> torch.Tensor:
        """Output projection of the merged heads o [B, n, H*Dh]."""
        return self._block_module(L, self.attn_out_path, "attn_proj")(o)

    def mlp_pre(self, L: int, x: torch.Tensor):
        """Return (pre_act, aux). pre_act is the pre-activation site; aux is
        anything else the activation needs (a gated MLP's up-projection).
        By default from :meth:`mlp_modules`."""
        m = self.mlp_modules(L)
        if m is None:
            raise NotImplementedError(f"{type(self).__name__} names no MLP modules")
        return m.up(x), (None if m.gate_up is None else m.gate_up(x))

    def mlp_act(self, L: int, pre: torch.Tensor, aux, inplace: bool = False) -> torch.Tensor:
        """The activation [.., d_ff]; ``inplace``: ``pre`` may be overwritten.
        By default ``act(pre)`` (times ``aux`` when gated) from :meth:`mlp_modules`."""
        m = self.mlp_modules(L)
        if aux is None:
            return activation(m.act, pre, inplace)
        if inplace:
            return activation(m.act, pre, True).mul_(aux)
        return m.act(pre) * aux

    def mlp_modules(self, L: int) -> MLPModules | None:
        """The modules that :meth:`mlp_pre` and :meth:`mlp_act` compute with
        (the fused MLP kernel and the ``pre_act`` hook of
        :func:`kncore.patch_neurons` take them from here), from
        ``mlp_paths``; None where the adapter does not say (then it overrides
        both)."""
        if not self.mlp_paths:
            return None
        mlp = get_module(self.blocks[L], self.mlp_paths[0])
        return MLPModules(*(getattr(mlp, name) for name in self.mlp_paths[1:]))

    def pre_act_module(self, L: int) -> nn.Module | None:
        """The module whose output is the ``pre_act`` site (the hook point of
        :func:`kncore.patch_neurons` on the Hugging Face forward); by default
        the up-projection of :meth:`mlp_modules`, None where it names none."""
        m = self.mlp_modules(L)
        return None if m is None else m.up

    def down_weight(self, L: int) -> torch.Tensor:
        """The down-projection weight as [d_ff, d_model] (a view, no copy);
        by default that of an nn.Linear down_module."""
        return self.down_module(L).weight.t()

    def down_bias(self, L: int):
        return self.down_module(L).bias

    def down_module(self, L: int) -> nn.Module:
        """The module that holds the down-projection (ROME edits it)."""
        return self._block_module(L, self.down_path, "down_module")

    def mlp_down(self, L: int, act: torch.Tensor) -> torch.Tensor:
        out = act @ self.down_weight(L)
        b = self.down_bias(L)
        return out if b is None else out + b

    def post_attn_norm(self, L: int, h: torch.Tensor) -> torch.Tensor:
        """Post-LN: the norm of h + attn_out; sandwich: the norm of attn_out."""
        raise NotImplementedError

    def post_mlp_norm(self, L: int, h: torch.Tensor) -> torch.Tensor:
        """Post-LN: the norm of h + mlp_out; sandwich: the norm of mlp_out."""
        raise NotImplementedError

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and (LM or MLM) head: hidden [.., d_model] -> logits."""
        if not (self.final_norm_path and self.head_path):
            raise NotImplementedError(f"{type(self).__name__} declares no final norm and head")
        return get_module(self.model, self.head_path)(get_module(self.model, self.final_norm_path)(h))

    def layer_module_name(self, L: int, kind: str | None = None) -> str:
        """Hugging Face module path of block L (kind None), its mlp or attn."""
        if not self.blocks_path:
            raise NotImplementedError(f"{type(self).__name__} declares no blocks")
        base = f"{self.blocks_path}.{L}"
        if kind is None:
            return base
        return f"{base}.{kind if self.module_kinds is None else self.module_kinds[kind]}"


def get_module(model: nn.Module, path: str) -> nn.Module:
    mod = model
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod
