"""Architecture adapters, keyed by Hugging Face ``model_type``."""
from __future__ import annotations

from .base import Adapter
from .bert import BertAdapter
from .gemma import Gemma2Adapter, Gemma3Adapter
from .gpt2 import GPT2Adapter
from .gpt_neox import GPTNeoXAdapter
from .gptj import GPTJAdapter
from .llama import LlamaAdapter
from .qwen import Qwen2Adapter, Qwen3Adapter
from .t5 import T5Adapter

ADAPTERS = {
    "gpt2": GPT2Adapter,
    "gptj": GPTJAdapter,
    "llama": LlamaAdapter,
    "mistral": LlamaAdapter,
    "qwen2": Qwen2Adapter,
    "qwen3": Qwen3Adapter,
    "gemma2": Gemma2Adapter,
    "gemma3_text": Gemma3Adapter,
    "gpt_neox": GPTNeoXAdapter,
    "bert": BertAdapter,
    "t5": T5Adapter,
}
# What each model_type is, for the unsupported-architecture error.
FAMILIES = ("GPT-2, GPT-J, GPT-NeoX (Pythia), the LLaMA family incl. SmolLM2 and Mistral, Qwen2/2.5, "
            "Qwen3, Gemma-2, Gemma-3 text (gemma3_text), BERT masked LM, T5 v1.0 and v1.1 / Flan-T5 (encoder-decoder, kncore.t5)")


def adapter_for(model) -> Adapter:
    mt = getattr(model.config, "model_type", None)
    if mt not in ADAPTERS:
        raise ValueError(
            f"unsupported architecture {mt!r}; supported: {', '.join(sorted(ADAPTERS))} ({FAMILIES})")
    return ADAPTERS[mt](model)
