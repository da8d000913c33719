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

# The tiny tokenizer's vocabulary after SPECIAL (words and punctuation, each once)
VOCAB = tuple(dict.fromkeys((
    "the capital of canada is ottawa france paris italy rome germany berlin japan tokyo "
    "this that these those apple apples dog dogs cat cats sketch sketches committee "
    "a an and or not was were are be been has have had it its he she they we you i "
    "city country language speaks spoken french english german works field physics "
    "music painting born in on at to from with by for as like red blue green big small "
    "one two three four five six seven eight nine ten , . ? !"
).split()))
# Its words alone: what the tests and benches build prompts from.
WORDS = tuple(w for w in VOCAB if w.isalpha())
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
# A small corpus of texts of many lengths (1-13 tiny tokens): layer statistics
# whose batches pad, in the plan's tests and benches.
STATS_TEXTS = ("the capital of canada is ottawa", "dog cat", "apple apples dog cat the capital of canada",
               "is", "ottawa ottawa ottawa dog cat apple apples the capital of canada is ottawa", "cat") * 3
# The ROME request and hyper-parameters the plan's edit checks run: every step
# (no early stop), no generated context templates, C^-1 k left out (its
# Cholesky is linear algebra FlopCounterMode does not count); the subject
# opens the prompt, as planner.edit_rows assumes.
PLAN_EDIT_REQUEST = {"prompt": "{} is the capital of", "subject": "canada", "target_new": "dogs"}
PLAN_EDIT_HPARAMS = dict(v_num_grad_steps=4, early_stop_loss=0.0, mom2_adjustment=False,
                         context_template_length_params=[], kl_prompts=["{} is a"])


def tiny_tokenizer(mlm: bool = False):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + list(VOCAB))}
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

    V = vocab_size or (len(SPECIAL) + len(VOCAB))
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
    _widen(model, vectors=arch not in CORE_ARCHS)
    return model.eval()


@torch.no_grad()
def _widen(model, vectors: bool = False) -> None:
    """Redraw every matrix with std 1.2 / sqrt(fan_in). HF's init (std 0.02)
    makes every prediction of a shallow random model near uniform; these
    weights give attributions, traces and edits structure worth testing.
    ``vectors``: also perturb biases and norm weights, which HF zeroes (and
    Gemma's (1 + w) norms would leave at exactly 1)."""
    for p in model.parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.6 / p.shape[-1] ** 0.5 * 2)
        elif vectors:
            p.add_(torch.randn_like(p), alpha=0.1)


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


# -- full-width models ---------------------------------------------------------------
# The widths of the published 7B-class checkpoints (their config.json), truncated
# in depth. What decides the numerics of a bf16 run is the width of every matmul
# and reduction (hidden, d_ff, heads, head_dim, rotary dim), which these keep;
# depth only repeats layers. The vocabulary is the word-level test tokenizer's
# (about 130 tokens, not 32000 / 50400): the head is one more matmul over the
# same hidden width, and a full one would add 0.5 GB per model in bf16.
FULL_WIDTH = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=4096),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=32768, sliding_window=4096),
    "gpt-j-6b": dict(model_type="gptj", n_embd=4096, n_inner=16384, n_head=16, rotary_dim=64,
                     n_positions=2048, layer_norm_epsilon=1e-5, activation_function="gelu_new"),
}


def fullwidth_config(name: str, *, n_layers: int = 2, vocab_size: int | None = None):
    """HF config of a published 7B-class model (:data:`FULL_WIDTH`) with
    ``n_layers`` layers and the test tokenizer's vocabulary."""
    import transformers as tf

    if name not in FULL_WIDTH:
        raise ValueError(f"unknown full-width model {name!r}; choose from {sorted(FULL_WIDTH)}")
    spec = dict(FULL_WIDTH[name])
    mt = spec.pop("model_type")
    V = vocab_size or (len(SPECIAL) + len(VOCAB))
    common = dict(vocab_size=V, bos_token_id=5, eos_token_id=6, tie_word_embeddings=False)
    if mt == "gptj":
        return tf.GPTJConfig(n_layer=n_layers, **common, **spec)
    cls = tf.LlamaConfig if mt == "llama" else tf.MistralConfig
    return cls(num_hidden_layers=n_layers, pad_token_id=0, hidden_act="silu", **common, **spec)


def fullwidth_model(name: str, *, n_layers: int = 2, seed: int = 0, dtype=torch.bfloat16):
    """A truncated full-width model with random weights, built directly in
    ``dtype`` (no fp32 copy of a bf16 model). The same seed gives the same
    bf16-representable weights in every dtype: the matrices are drawn in bf16
    and converted, so an fp32 model of a seed is exactly the upcast bf16 one."""
    import transformers as tf

    cfg = fullwidth_config(name, n_layers=n_layers)
    cls = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "gptj": tf.GPTJForCausalLM}[cfg.model_type]
    from transformers.initialization import no_init_weights

    # HF's own init would draw every weight a first time (18 s for LLaMA's two
    # layers on the 2-core CPU); every parameter is drawn below. Built in fp32
    # (the untouched fp32 storage is never paged in) so that the buffers are
    # what from_pretrained makes: GPT-J's rotary table built under a bf16
    # default dtype is off by up to 0.86 at position 2000.
    with no_init_weights():
        model = cls(cfg)
    for p in model.parameters():
        p.data = torch.empty_like(p, dtype=torch.bfloat16)
    torch.manual_seed(seed)
    _widen(model)
    with torch.no_grad():  # norm gains near 1, biases near 0, perturbed so none is trivial
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if n.endswith("bias") else 1.0, 0.02)
    model.config.dtype = dtype  # what save_pretrained writes as the checkpoint's dtype
    for p in model.parameters():
        p.data = p.data.to(dtype)  # parameters only: buffers stay as HF made them
        p.requires_grad_(False)
    return model.eval()


def fullwidth_lm(name: str, *, n_layers: int = 2, seed: int = 0, dtype=torch.bfloat16) -> LM:
    return LM(fullwidth_model(name, n_layers=n_layers, seed=seed, dtype=dtype), tiny_tokenizer(),
              name=f"{name}-{n_layers}L")


def save_sharded(model, tokenizer, path, *, max_shard_size: str = "300MB") -> list:
    """Write ``model`` as HF ships large checkpoints: safetensors shards
    (``model-0000i-of-0000n.safetensors``), ``model.safetensors.index.json``,
    ``config.json`` and the tokenizer files. Returns the shard paths."""
    from pathlib import Path

    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(path)
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    if len(shards) < 2 or not (path / "model.safetensors.index.json").exists():
        raise RuntimeError(f"save_pretrained wrote {len(shards)} shard(s) without an index at {path}; "
                           f"lower max_shard_size ({max_shard_size})")
    return shards


# -- plain PyTorch baselines (the HF forward and autograd, nothing of kncore's runtime) --------
# The engineering bar for a low-precision path: its error against an fp32 run of
# the same weights is at most 2x the error of these in the same dtype.
def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in fp64."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def ig_plain(lm: LM, prompt: str, target: str, layer: int, steps: int = 20, with_f: bool = False):
    """Riemann-left IG [d_ff] of one layer's neurons (the down-projection input at
    the last token) the knowledge-neurons way: one HF forward of ``steps`` copies
    of the prompt with the activations replaced by alpha * a through a hook,
    autograd for the gradient. The probability and the sums are fp32, so the
    model's own dtype is the only low-precision part. ``with_f``: also return
    F(a) and F(0), the target probability unmodified and at alpha = 0."""
    ids = torch.tensor([lm.tokenize(prompt)], device=lm.device)
    tgt, pos = lm.single_token(prompt, target), ids.shape[1] - 1
    mod = lm.adapter.down_module(layer)
    seen = {}
    h = mod.register_forward_pre_hook(lambda m, args: seen.__setitem__("a", args[0][0, pos].detach()))
    try:
        with torch.no_grad():
            f1 = float(lm.model(ids).logits[0, pos].float().softmax(-1)[tgt])
    finally:
        h.remove()
    a = seen["a"]
    alphas = torch.arange(steps, dtype=torch.float64, device=lm.device) / steps
    with torch.enable_grad():
        x = (alphas[:, None].to(a.dtype) * a).requires_grad_(True)

        def put(m, args):
            y = args[0].clone()
            y[:, pos] = x
            return (y,)

        h = mod.register_forward_pre_hook(put)
        try:
            logits = lm.model(ids.expand(steps, -1)).logits[:, pos]
        finally:
            h.remove()
        p = logits.float().softmax(-1)[:, tgt]
        (g,) = torch.autograd.grad(p.sum(), x)
    ig = a.float() * g.float().sum(0) / steps
    return (ig, f1, float(p[0])) if with_f else ig


@torch.no_grad()
def second_moment_plain(lm: LM, layer: int, texts) -> torch.Tensor:
    """E[k k^T] of the down-projection inputs over every token of ``texts``,
    ROME's way: an HF forward per text, the keys upcast to fp32, X^T X / n."""
    store = []
    h = lm.adapter.down_module(layer).register_forward_pre_hook(lambda m, i: store.append(i[0][0].float()))
    try:
        for t in texts:
            lm.model(torch.tensor([lm.tokenize(t)], device=lm.device))
    finally:
        h.remove()
    X = torch.cat(store)
    return X.T @ X / X.shape[0]


def measure_run(fn) -> tuple[int, int]:
    """(FLOPs, peak bytes) of one run of fn on the CPU: what the planner's
    predictions are checked against (tests/test_plan.py, bench/plan_accuracy.py).
    FLOPs: torch's FlopCounterMode, with its attention rules registered for the
    CPU kernel too, and the covariance op's (:func:`kncore.planner.flop_rules`). Peak: of the CPU
    tensors allocated by fn (above those alive before it): torch's profiler
    records every allocation (on the op that made it) and every release, so the
    running sum over time is the live total. Deterministic, unlike the process
    RSS, which glibc's arenas blur and which the weights (540 MB for SmolLM2)
    would dwarf."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from .planner import flop_rules

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, \
            FlopCounterMode(display=False, custom_mapping=flop_rules()) as fc:
        fn()
    # Net bytes per op, at its start: the tensors ops hand each other, which is
    # what the plan models. Workspace a kernel allocates and frees inside one op
    # is not counted (the raw records see it: the CPU logsumexp of a trace's
    # head allocates a [rows, vocab] temporary that CUDA's fused kernel does not).
    evs = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    cur = peak = 0
    for _, d in evs:
        cur += d
        peak = max(peak, cur)
    return fc.get_total_flops(), peak
