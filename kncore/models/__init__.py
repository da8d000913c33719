"""Architecture adapters, keyed by Hugging Face ``model_type``."""
from __future__ import annotations

from .base import Adapter
from .bert import BertAdapter
from .gpt2 import GPT2Adapter
from .gptj import GPTJAdapter
from .llama import LlamaAdapter

ADAPTERS = {
    "gpt2": GPT2Adapter,
    "gptj": GPTJAdapter,
    "llama": LlamaAdapter,
    "mistral": LlamaAdapter,
    "bert": BertAdapter,
}


def adapter_for(model) -> Adapter:
    mt = getattr(model.config, "model_type", None)
    if mt not in ADAPTERS:
        raise ValueError(
            f"unsupported architecture {mt!r}; supported: {', '.join(sorted(ADAPTERS))} "
            "(GPT-2, GPT-J, the LLaMA family incl. SmolLM2 and Mistral, BERT masked LM)")
    return ADAPTERS[mt](model)
