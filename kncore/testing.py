"""Tiny random models of every supported architecture, with a real (word-level)
fast tokenizer, for unit tests and quick experiments. Sizes are deliberately
odd (hidden 40, d_ff 123, 3 layers) so shape bugs cannot hide."""
from __future__ import annotations

import torch

from .lm import LM

ARCHS = ("gpt2", "gptj", "llama", "bert")

_WORDS = (
    "the capital of canada is ottawa france paris italy rome germany berlin japan tokyo "
    "this that these those apple apples dog dogs cat cats sketch sketches committee "
    "a an and or not was were are be been has have had it its he she they we you i "
    "city country language speaks spoken french english german works field physics "
    "music painting born in on at to from with by for as like red blue green big small "
    "one two three four five six seven eight nine ten , . ? !"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]


def tiny_tokenizer(mlm: bool = False):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + list(dict.fromkeys(_WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit() if not mlm else pre_tokenizers.Whitespace()
    if mlm:
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    kw = dict(unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]")
    if mlm:
        kw.update(cls_token="[CLS]", sep_token="[SEP]")
    else:
        kw.update(bos_token="<s>", eos_token="</s>")
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kw)


def tiny_model(arch: str, *, seed: int = 0, d_model: int = 40, d_ff: int = 123, n_layers: int = 3,
               n_heads: int = 4, n_ctx: int = 64, vocab_size: int | None = None):
    """A randomly initialised HF model of the given architecture."""
    import transformers as tf

    V = vocab_size or (len(SPECIAL) + len(dict.fromkeys(_WORDS)))
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_ff, vocab_size=V,
                            n_positions=n_ctx, bos_token_id=5, eos_token_id=6)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "gptj":
        cfg = tf.GPTJConfig(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_ff, vocab_size=V,
                            n_positions=n_ctx, rotary_dim=max(2, (d_model // n_heads) // 2 // 2 * 2),
                            bos_token_id=5, eos_token_id=6)
        model = tf.GPTJForCausalLM(cfg)
    elif arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                             num_key_value_heads=max(1, n_heads // 2), intermediate_size=d_ff, vocab_size=V,
                             max_position_embeddings=n_ctx, bos_token_id=5, eos_token_id=6, pad_token_id=0)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "bert":
        cfg = tf.BertConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                            intermediate_size=d_ff, vocab_size=V, max_position_embeddings=n_ctx, pad_token_id=0)
        model = tf.BertForMaskedLM(cfg)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHS}")
    # HF's init draws small weights that make every prediction near uniform;
    # widen them so attributions and traces have structure worth testing.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.6 / p.shape[-1] ** 0.5 * 2)
    return model.eval()


def tiny_lm(arch: str, *, seed: int = 0, dtype=None, **kw) -> LM:
    model = tiny_model(arch, seed=seed, **kw)
    for p in model.parameters():
        p.requires_grad_(False)
    if dtype is not None:
        model = model.to(dtype)
    return LM(model, tiny_tokenizer(mlm=(arch == "bert")), name=f"tiny-{arch}")


def cpu_has_avx512() -> bool:
    """Whether /proc/cpuinfo lists AVX-512F/BW/VL (the ops' AVX-512 paths need all three)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read().split()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl"))
