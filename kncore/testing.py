"""Tiny random models of every supported architecture, with a real (word-level)
fast tokenizer, for unit tests and quick experiments. Sizes are deliberately
odd (hidden 40, d_ff 123, 3 layers) so shape bugs cannot hide."""
from __future__ import annotations

import torch

from .lm import LM

# Every architecture with a tiny model. The test suite runs most tests on the
# first four; tests marked ``every_arch`` run on all (tests/conftest.py).
CORE_ARCHS = ("gpt2", "gptj", "llama", "bert")
ARCHS = CORE_ARCHS + ("gpt_neox", "gpt_neox_seq", "qwen2", "qwen3", "gemma2", "gemma3")
# Encoder-decoder models (kncore.t5; not in ARCHS: the decoder-only methods'
# tests do not apply): T5 v1.0 (ReLU, tied head) and v1.1 / Flan-T5 (gated GELU, untied).
ENC_DEC_ARCHS = ("t5", "t5_v11")

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
               n_heads: int = 4, n_ctx: int = 64, vocab_size: int | None = None, window: int = 5):
    """A randomly initialised HF model of the given architecture. ``window``:
    the sliding window of Qwen2's and Gemma's windowed layers."""
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
    elif arch in ("gpt_neox", "gpt_neox_seq"):  # Pythia's parallel residual, and off
        cfg = tf.GPTNeoXConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                               intermediate_size=d_ff, vocab_size=V, max_position_embeddings=n_ctx,
                               rotary_pct=0.6, use_parallel_residual=(arch == "gpt_neox"),
                               bos_token_id=5, eos_token_id=6)
        model = tf.GPTNeoXForCausalLM(cfg)
    elif arch in ("qwen2", "qwen3"):
        common = dict(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                      num_key_value_heads=max(1, n_heads // 2), intermediate_size=d_ff, vocab_size=V,
                      max_position_embeddings=n_ctx, bos_token_id=5, eos_token_id=6, pad_token_id=0,
                      tie_word_embeddings=False)
        if arch == "qwen2":  # biases on q, k, v; a 5-token window on the layers from 1 up
            cfg = tf.Qwen2Config(use_sliding_window=True, sliding_window=window, max_window_layers=1, **common)
            model = tf.Qwen2ForCausalLM(cfg)
        else:  # q and k norms per head
            cfg = tf.Qwen3Config(head_dim=d_model // n_heads, **common)
            model = tf.Qwen3ForCausalLM(cfg)
    elif arch in ("gemma2", "gemma3"):
        # A 5-token window, so 17-token tests cross it; caps low enough to bite
        # on these weights; query_pre_attn_scalar != head_dim.
        common = dict(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                      num_key_value_heads=max(1, n_heads // 2), head_dim=d_model // n_heads,
                      intermediate_size=d_ff, vocab_size=V, max_position_embeddings=n_ctx,
                      query_pre_attn_scalar=d_model // n_heads + 3, sliding_window=window,
                      final_logit_softcapping=8.0, bos_token_id=5, eos_token_id=6, pad_token_id=0,
                      layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                   for i in range(n_layers)])
        if arch == "gemma2":
            cfg = tf.Gemma2Config(attn_logit_softcapping=4.0, **common)
            model = tf.Gemma2ForCausalLM(cfg)
        else:
            cfg = tf.Gemma3TextConfig(**common)
            model = tf.Gemma3ForCausalLM(cfg)
    elif arch == "bert":
        cfg = tf.BertConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                            intermediate_size=d_ff, vocab_size=V, max_position_embeddings=n_ctx, pad_token_id=0)
        model = tf.BertForMaskedLM(cfg)
    elif arch in ENC_DEC_ARCHS:
        # encoder n_layers, decoder one fewer (so the stacks cannot be mixed up
        # unnoticed); 8 buckets up to distance 12, so 17-token inputs reach the
        # logarithmic buckets.
        cfg = tf.T5Config(d_model=d_model, d_kv=d_model // n_heads, d_ff=d_ff, num_layers=n_layers,
                          num_decoder_layers=max(1, n_layers - 1), num_heads=n_heads, vocab_size=V,
                          relative_attention_num_buckets=8, relative_attention_max_distance=12,
                          feed_forward_proj="relu" if arch == "t5" else "gated-gelu",
                          tie_word_embeddings=(arch == "t5"), dropout_rate=0.0, pad_token_id=0,
                          eos_token_id=6, decoder_start_token_id=0, n_positions=n_ctx)
        model = tf.T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHS + ENC_DEC_ARCHS}")
    # HF's init draws small weights that make every prediction near uniform;
    # widen them so attributions and traces have structure worth testing.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.6 / p.shape[-1] ** 0.5 * 2)
            elif arch not in CORE_ARCHS:
                p.add_(torch.randn_like(p), alpha=0.1)  # HF zeroes biases and Gemma's norm weights
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
