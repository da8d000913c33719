"""Qwen2 / Qwen2.5 and Qwen3: the LLaMA layout. Qwen2 adds biases on the q, k
and v projections (carried by its Linear layers); Qwen3 adds an RMSNorm per
head on q and k (applied by :class:`LlamaAdapter` wherever the attention
module has ``q_norm``). Both mark sliding-window layers in ``layer_types``
(``use_sliding_window``), which are masked exactly."""
from __future__ import annotations

from .llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    arch = "qwen2"
    adds_bos = False
    exact_windows = True


class Qwen3Adapter(Qwen2Adapter):
    arch = "qwen3"
