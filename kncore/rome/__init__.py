"""ROME (Meng et al. 2022): layer statistics, rank-one edits with an exact undo,
and ROME's / EasyEdit's hyper-parameter files.

    import kncore
    from kncore import rome
    lm = kncore.load("smollm2-135m")
    stats = rome.layer_stats(lm, [4], "pydoc", n_samples=2000)
    with rome.edit(lm, {"prompt": "The capital of {} is", "subject": "Canada",
                        "target_new": "Rome"}, stats=stats) as e:
        print(lm.top_k("The capital of Canada is"))
    # left the block: the weights are back, bit for bit
    e = rome.memit_edit(lm, requests)   # MEMIT (or rome.emmet_edit): a batch at once

See docs/rome.md and docs/memit.md.
"""
from .corpus import DEFAULT_CORPUS, Corpus, open_corpus, pydoc_texts
from .editing import Edit, EditStep, Request, SingularStatistics, clear_cache, edit, locate, parse_request
from .hparams import ROMEHparams, available, hparams_for, load_hparams
from .memit import BatchStep, EMMETHparams, MEMITHparams, batch_edit, emmet_edit, memit_edit
from .solver import SingularSystem
from .stats import LayerStats, StatsCacheMismatch, layer_stats, load_stats, probe_keys_for, read_meta
from .templates import context_templates, generate

__all__ = ["layer_stats", "probe_keys_for", "LayerStats", "load_stats", "read_meta", "StatsCacheMismatch", "edit", "Edit",
           "EditStep", "Request", "parse_request", "locate", "SingularStatistics", "clear_cache",
           "ROMEHparams", "load_hparams", "hparams_for", "available", "context_templates", "generate",
           "open_corpus", "Corpus", "pydoc_texts", "DEFAULT_CORPUS", "memit_edit", "emmet_edit", "batch_edit",
           "MEMITHparams", "EMMETHparams", "BatchStep", "SingularSystem"]
