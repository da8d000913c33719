"""Data loaders: BLiMP, PARAREL, CounterFact, zsRE and ROME's known facts.

Loaders take a path (or a data folder; default :func:`default_data_dir`:
``$KNCORE_DATA`` or ``../shared/data`` beside the checkout) and return typed
records. A malformed record raises :class:`DataError` (an
:class:`kncore.InputError`) naming the file and the line or list index.
"""
from ._io import DataError, default_data_dir, json_file, json_lines, read_json_list, read_jsonl
from .blimp import (BlimpPair, BlimpPrompt, BlimpPrompts, blimp_paradigms, blimp_prompts, build_blimp_prompts,
                    load_blimp, load_blimp_file, pair_class)
from .counterfact import CounterFactRecord, load_counterfact
from .known import KnownFact, load_known
from .pararel import (FactBag, FactBags, PararelFact, PararelPattern, build_fact_bags, load_pararel_facts,
                      load_pararel_patterns, pararel_bags, pararel_relations, single_token_bags, template_prompt)
from .zsre import ZsreRecord, load_zsre

__all__ = [
    "DataError", "default_data_dir", "json_file", "json_lines", "read_jsonl", "read_json_list",
    "BlimpPair", "BlimpPrompt", "BlimpPrompts", "blimp_paradigms", "load_blimp", "load_blimp_file",
    "build_blimp_prompts", "blimp_prompts", "pair_class",
    "PararelPattern", "PararelFact", "FactBag", "FactBags", "pararel_relations", "load_pararel_patterns",
    "load_pararel_facts", "template_prompt", "build_fact_bags", "pararel_bags", "single_token_bags",
    "CounterFactRecord", "load_counterfact", "ZsreRecord", "load_zsre", "KnownFact", "load_known",
]
