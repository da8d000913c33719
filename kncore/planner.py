"""What a job will cost before it runs: FLOPs, bytes moved, peak memory, and
the time on named GPUs.

``kncore.plan(model, ...)`` takes a model config alone (a ``config.json``, a
folder holding one, a name whose config ships with kncore, see
:data:`SHIPPED`) or a loaded :class:`~kncore.LM`, and reads no weights: the
model is built on PyTorch's meta device, where tensors have shapes and no
storage.

The figures are not a second formula. For each job the planner takes the
decisions the engine takes (attribution's item chunks and rows per group,
tracing's jobs, walks and walk order, the statistics' batches, ROME's rows)
from the engine's own functions, and costs every step by running it on the
meta device under a dispatch mode. Attribution and tracing run there through
the very functions the real job calls (``attribution.ig_chunk``;
``tracing.core.clean_run``, ``corrupted_run`` and ``run_grid``), so the same
code answers "what will you do" and does it; the statistics and ROME's edit
run :func:`kncore.runtime.run` (and the autograd backward) in the engine's
order. The mode counts:

* FLOPs by torch's ``FlopCounterMode`` rules, op by op, over the same calls
  (matmuls, attention; elementwise work is not counted, as FlopCounterMode
  does not);
* bytes moved: every aten op reads its tensor arguments and writes its
  outputs (views move nothing), split into weights and activations; this is
  the traffic of an unfused run, an upper bound for a fused one;
* peak memory: the meter follows every tensor's storage from its creation to
  its release (Python's reference counting frees them as in the real run,
  autograd's saved tensors included), plus the weights.

The time on a GPU is a roofline per stage: max(FLOPs / (peak x
:data:`COMPUTE_EFFICIENCY`), bytes / (bandwidth x :data:`BANDWIDTH_EFFICIENCY`)),
from the card's published dense peak for the model's dtype. Such times are
predictions, not measurements.
"""
from __future__ import annotations

import functools
import json
import operator
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils import flop_counter as flop_counter_rules
from torch.utils.flop_counter import FlopCounterMode

from .lm import LM, InputError

CONFIG_DIR = Path(__file__).parent / "plan_configs"
# name -> config file shipped in kncore/plan_configs (the published Hugging Face configs)
SHIPPED = {
    "gpt2-xl": "gpt2-xl.json",
    "gpt-j-6b": "gpt-j-6b.json",
    "llama-2-7b": "llama-2-7b.json",
    "llama-2-13b": "llama-2-13b.json",
    "mistral-7b": "mistral-7b.json",
    "llama-3-8b": "llama-3-8b.json",
}
_ALIASES = {
    "openai-community/gpt2-xl": "gpt2-xl", "eleutherai/gpt-j-6b": "gpt-j-6b", "gptj-6b": "gpt-j-6b",
    "meta-llama/llama-2-7b-hf": "llama-2-7b", "llama-2-7b-hf": "llama-2-7b",
    "meta-llama/llama-2-13b-hf": "llama-2-13b", "llama-2-13b-hf": "llama-2-13b",
    "mistralai/mistral-7b-v0.1": "mistral-7b", "mistral-7b-v0.1": "mistral-7b",
    "meta-llama/meta-llama-3-8b": "llama-3-8b", "meta-llama-3-8b": "llama-3-8b",
}

# name: (dense bf16/fp16 tensor peak FLOP/s, fp32 (non-tensor) peak FLOP/s,
#        memory bandwidth B/s, memory bytes), from each vendor's data sheet.
GPUS = {
    "A100-40GB": (312e12, 19.5e12, 1.555e12, 40e9),
    "A100-80GB": (312e12, 19.5e12, 2.039e12, 80e9),
    "H100": (989e12, 67e12, 3.35e12, 80e9),      # SXM5
    "H200": (989e12, 67e12, 4.8e12, 141e9),
    "L4": (121e12, 30.3e12, 0.3e12, 24e9),
    "RTX4090": (165e12, 82.6e12, 1.008e12, 24e9),  # fp16/bf16 with fp32 accumulation
}
# Stated assumptions, not measurements: the fraction of the peak a
# well-shaped matmul reaches, and of the bandwidth a streaming op reaches.
COMPUTE_EFFICIENCY = 0.5
BANDWIDTH_EFFICIENCY = 0.7


# ---------------------------------------------------------------------------
# the model, on the meta device
# ---------------------------------------------------------------------------
def _read_config(src) -> tuple[dict, str]:
    if isinstance(src, dict):
        return dict(src), src.get("_name_or_path") or src.get("model_type", "model")
    s = str(src)
    key = _ALIASES.get(s.lower(), s.lower())
    if key in SHIPPED:
        return json.loads((CONFIG_DIR / SHIPPED[key]).read_text()), key
    p = Path(s)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise InputError(f"no model config at {s!r}: give a config.json, a folder holding one, a loaded model, "
                         f"or one of the shipped names {sorted(SHIPPED)}")
    try:
        return json.loads(p.read_text()), p.parent.name if p.name == "config.json" else p.stem
    except ValueError as e:
        raise InputError(f"{p} is not valid JSON: {e}") from None


@functools.lru_cache(maxsize=8)
def _meta_model(cfg_json: str, dtype: str, name: str):
    import transformers as tf

    from .models import ADAPTERS
    d = json.loads(cfg_json)
    mt = d.get("model_type")
    planned = sorted(k for k, a in ADAPTERS.items() if not getattr(a, "encoder_decoder", False))
    if mt not in planned:
        # T5 runs its own loop (kncore.runtime_t5), whose schedule the planner does not cost yet
        raise InputError(f"unsupported architecture {mt!r} for the planner; supported: {', '.join(planned)}")
    cfg = tf.AutoConfig.for_model(**d)
    auto = tf.AutoModelForMaskedLM if mt == "bert" else tf.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg)
    model = model.to(getattr(torch, dtype)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    return LM(model, tok, name=name)


def _dtype_name(dtype) -> str:
    from .loading import torch_dtype
    return str(torch_dtype(dtype)).replace("torch.", "")


def meta_lm(model, dtype=None) -> LM:
    """The model's architecture on the meta device (no weights), in ``dtype``
    (default: a loaded model's own dtype, else the config's ``torch_dtype``,
    else float32)."""
    if isinstance(model, LM):
        d = model.model.config.to_dict()
        dtype = dtype or model.dtype
        name = model.name
    else:
        d, name = _read_config(model)
        dtype = dtype or d.get("torch_dtype") or d.get("dtype") or "float32"
    d.pop("torch_dtype", None)
    d.pop("dtype", None)
    d.pop("quantization_config", None)
    return _meta_model(json.dumps(d, sort_keys=True, default=str), _dtype_name(dtype), str(name))


# ---------------------------------------------------------------------------
# the meter
# ---------------------------------------------------------------------------
def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _sdpa(q, k, v, *a, out_val=None, **kw):
    return flop_counter_rules.sdpa_flop_count(q.shape, k.shape, v.shape)


def _sdpa_bwd(g, q, k, v, *a, out_val=None, **kw):
    return flop_counter_rules.sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape)


_sdpa._get_raw = _sdpa_bwd._get_raw = True


def cov_flops(rows: int, d: int) -> int:
    """FLOPs of ``kncore::cov_accumulate_`` over ``rows`` kept rows of width d:
    C's lower triangle, d (d + 1) / 2 multiply-adds per row."""
    return int(rows) * d * (d + 1)


def _cov_rule(C, s, n, X, mask=None, *a, out_val=None, **kw):
    rows = X.shape[0] if mask is None or mask.is_meta else int(mask.sum())
    return cov_flops(rows, X.shape[1])


_cov_rule._get_raw = True


def flop_rules() -> dict:
    """The FLOP rules kncore counts with beyond FlopCounterMode's own: attention on
    the CPU (:data:`CPU_SDPA_RULES`) and the C++ covariance op, when it is built."""
    from . import _ext
    rules = dict(CPU_SDPA_RULES)
    _ext.load()
    try:
        rules[torch.ops.kncore.cov_accumulate_] = _cov_rule
    except (AttributeError, RuntimeError):  # the extension is not built: the reference's aten ops count
        pass
    return rules
# FlopCounterMode counts the CUDA attention kernels but not the CPU one that
# an fp32 CPU run dispatches to: the same rules, registered for it.
CPU_SDPA_RULES = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_bwd}


class FlopCount(TorchDispatchMode):
    """FLOPs by torch's FlopCounterMode rules (and :func:`flop_rules`),
    of the ops on real devices (``meta=False``: what ``--profile`` counts a
    run with, leaving out the planning that ``batch_size="auto"`` does on the
    meta device inside it) or of those on the meta device (``meta=True``)."""

    def __init__(self, meta: bool = False):
        super().__init__()
        self.meta = meta
        self.flops = 0
        self.rules = FlopCounterMode(display=False, custom_mapping=flop_rules()).flop_registry

    def get_total_flops(self) -> int:
        return self.flops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        rule = self.rules.get(func._overloadpacket)
        if rule is None and func is not torch.ops.prim.device.default:
            # as FlopCounterMode does: an op without a rule counts as its decomposition
            # (under inference_mode, aten.linear reaches the mode whole, not as mm/addmm)
            with self:
                out = func.decompose(*args, **(kwargs or {}))
            if out is not NotImplemented:
                return out
        out = func(*args, **(kwargs or {}))
        if rule is not None:
            # the device of the output (of the first input for an in-place op that returns none)
            first = next((t for t in tree_flatten((out, args))[0] if isinstance(t, torch.Tensor)), None)
            if first is not None and first.is_meta == self.meta:
                self.flops += rule(*args, **(kwargs or {}), out_val=out)
        return out


class _Meter(TorchDispatchMode):
    """FLOPs (FlopCounterMode's own per-op rules), bytes moved by every op
    and the live bytes of every storage created under it (released when its
    last tensor is freed)."""

    def __init__(self, weights: set):
        super().__init__()
        self.weights = weights
        self.live: dict = {}
        self.cur = self.peak = 0
        self.weight_bytes = self.act_bytes = 0
        self.flops = 0
        self.rules = FlopCounterMode(display=False).flop_registry

    def _drop(self, key):
        ent = self.live.get(key)
        if ent is not None:
            ent[1] -= 1
            if ent[1] == 0:
                del self.live[key]
                self.cur -= ent[0]

    def _track(self, t: torch.Tensor):
        key = _key(t)
        ent = self.live.get(key)
        if ent is None:
            if key in self.weights:
                return
            ent = self.live[key] = [t.untyped_storage().nbytes(), 0]
            self.cur += ent[0]
            self.peak = max(self.peak, self.cur)
        ent[1] += 1
        weakref.finalize(t, self._drop, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rule = self.rules.get(func._overloadpacket)
        if rule is not None:
            self.flops += rule(*args, **(kwargs or {}), out_val=out)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not func.is_view:
            for t in tree_flatten((args, kwargs))[0] + outs:
                if isinstance(t, torch.Tensor):
                    nb = t.numel() * t.element_size()
                    if _key(t) in self.weights:
                        self.weight_bytes += nb
                    else:
                        self.act_bytes += nb
        for t in outs:
            self._track(t)
        return out


@dataclass
class Stage:
    """One stage of a job: ``calls`` identical repeats of what was costed."""
    name: str
    flops: float
    weight_bytes: float
    act_bytes: float
    peak_bytes: int      # live bytes above the weights, at the stage's peak
    calls: int = 1

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes


class _Costing:
    """Meter a block of meta-device work as one stage."""

    def __init__(self, lm: LM):
        self.lm = lm
        self.weights = {_key(p) for p in lm.model.parameters()} | {_key(b) for b in lm.model.buffers()}
        self.stages: list[Stage] = []
        self.peak = 0  # live bytes above the weights, over every stage
        self.carry = 0  # bytes that earlier stages left alive (kept in a caller's state)

    def stage(self, name: str, fn, calls: int = 1, *args, **kw):
        meter = _Meter(self.weights)
        with meter:
            res = fn(*args, **kw)
            del res
        st = Stage(name, float(meter.flops) * calls, meter.weight_bytes * calls,
                   meter.act_bytes * calls, self.carry + meter.peak, calls)
        self.stages.append(st)
        self.peak = max(self.peak, st.peak_bytes)
        self.carry += meter.cur
        return st


def _weights_bytes(lm: LM) -> int:
    seen, n = set(), 0
    for t in list(lm.model.parameters()) + list(lm.model.buffers()):
        if _key(t) not in seen:
            seen.add(_key(t))
            n += t.numel() * t.element_size()
    return n


# ---------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------
@dataclass
class JobPlan:
    """The cost of one job. ``peak_bytes`` includes the weights."""
    job: str
    params: dict
    stages: list
    weights_bytes: int
    peak_bytes: int
    notes: list = field(default_factory=list)

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.stages)

    @property
    def weight_bytes(self) -> float:
        return sum(s.weight_bytes for s in self.stages)

    @property
    def act_bytes(self) -> float:
        return sum(s.act_bytes for s in self.stages)

    def seconds(self, gpu: str, dtype: torch.dtype) -> float:
        """Predicted time on a named GPU (a roofline per stage, see the module doc)."""
        peak16, peak32, bw, _ = GPUS[gpu]
        peak = peak32 if dtype in (torch.float32, torch.float64) else peak16
        if dtype == torch.float64:
            peak /= 32  # consumer and data-centre fp64 rates differ; a floor, not a figure
        return sum(max(s.flops / (peak * COMPUTE_EFFICIENCY), s.bytes / (bw * BANDWIDTH_EFFICIENCY))
                   for s in self.stages)

    def to_dict(self) -> dict:
        return {"job": self.job, "params": self.params, "flops": self.flops, "weight_bytes": self.weight_bytes,
                "act_bytes": self.act_bytes, "peak_bytes": self.peak_bytes, "notes": self.notes,
                "stages": [vars(s) | {"bytes": s.bytes} for s in self.stages]}


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _ids(B: int, T: int):
    return torch.zeros(B, T, dtype=torch.long, device="meta")


def _mask(lengths: Sequence[int], T: int):
    return (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).to("meta")


def _target_pos(lm: LM, lengths: Sequence[int]) -> list:
    """Target position of each item: the last token for decoders, the [MASK]
    (taken as the token before the last, [SEP]) for BERT."""
    return [n - 1 if lm.adapter.causal else max(0, n - 2) for n in lengths]


# -- attribute ----------------------------------------------------------------------------
def attribute_chunk(lm: LM, lengths: list, layers: list, site: str, scheme: str, steps: int):
    """One chunk of :func:`kncore.attribution.attribute` on the meta device:
    ``attribution.ig_chunk`` itself (its base pass, then its step pass with
    the backward and the reduction), over items of these context lengths,
    without gap_tol refinement."""
    from .attribution import Item, ig_chunk

    items = [Item(i, [0] * n, p, 0) for i, (n, p) in enumerate(zip(lengths, _target_pos(lm, lengths)))]
    with torch.enable_grad():
        return ig_chunk(lm, items, list(layers), site, scheme, steps, make_patch=_rows_patch)


def _rows_patch(pb, off: int, n_rows: int, n_pos: int):
    """The IG leaf patch of ``attribution.run_segments`` (an index_put of the
    leaf rows at their target columns) as a patch over every entry of the
    call: the meta device cannot build the row index the runtime would."""
    from .runtime import Patch
    site, L, z, where = pb

    def put(sel):
        x = sel.reshape(-1, n_pos, sel.shape[-1])
        rows = torch.arange(off, off + n_rows, device=x.device)
        return x.index_put((rows, where), z.to(x.dtype)).reshape(sel.shape)
    return Patch(site, L, fn=put)


def attribute_chunk_memory(lm: LM, T: int, layers: list, per_group: int, site: str) -> tuple[int, int]:
    """(fixed bytes, bytes per item) of one attribution chunk of prompts of T
    tokens, above the weights: the planned peak of a one-item chunk. Every
    tensor of a chunk (the base pass, its cache, the step rows and what
    autograd saves of them) has the items as a factor, so the peak of k items
    is k times it; the fixed part is 0."""
    ml = lm if lm.device.type == "meta" else meta_lm(lm)
    return 0, _attr_memory(ml, T, tuple(layers), per_group, site)


@functools.lru_cache(maxsize=64)
def _attr_memory(ml: LM, T: int, layers: tuple, per_group: int, site: str) -> int:
    # the rows, not their alphas, set the memory: riemann-left has per_group rows at per_group steps
    c = _Costing(ml)
    c.stage("chunk", attribute_chunk, 1, ml, [T], list(layers), site, "riemann-left", per_group)
    return max(1, c.peak)


def plan_attribute(lm: LM, *, prompts: int = 1, tokens: int = 16, target_tokens: int = 1, steps: int = 20,
                   layers=None, scheme: str = "riemann-left", site: str = "act", batch_size="auto",
                   memory_bytes: int | None = None, device_type: str = "cuda",
                   lengths: Sequence[int] | None = None) -> JobPlan:
    """Integrated gradients of ``prompts`` prompts of ``tokens`` tokens, each
    with a target of ``target_tokens`` tokens (teacher forcing: one item per
    target token, its context one token longer than the last); or of items
    whose context lengths are ``lengths``. ``batch_size="auto"`` plans for
    ``memory_bytes`` above the weights (default: this machine's free memory)
    on a ``device_type`` device."""
    from .attribution import (check_layers, check_options, chunk_items, chunk_size, rows_per_group)

    layers = check_layers(lm, layers)
    check_options(lm, scheme, site, steps, "teacher", None, None)
    _positive(prompts=prompts, tokens=tokens, target_tokens=target_tokens)
    if not lm.adapter.causal and target_tokens != 1:
        raise InputError("a masked LM predicts one target token")
    if lengths is None:
        lengths = [tokens + j for _ in range(prompts) for j in range(target_tokens)]
    else:
        lengths = [int(n) for n in lengths]
        _positive(**{f"lengths[{i}]": n for i, n in enumerate(lengths)})
    per_group = rows_per_group(scheme, steps)
    k = chunk_size(lm, lengths, layers, per_group, site, batch_size, budget_bytes=memory_bytes,
                   device_type=device_type)
    chunks = chunk_items(lengths, k)
    c = _Costing(lm)
    shapes: dict = {}
    for ch in chunks:
        key = tuple(lengths[i] for i in ch)
        shapes[key] = shapes.get(key, 0) + 1
    for key, n in shapes.items():
        c.stage(f"chunk of {len(key)} items", attribute_chunk, n, lm, list(key), layers, site, scheme, steps)
    return JobPlan("attribute", dict(prompts=prompts, tokens=tokens, target_tokens=target_tokens, steps=steps,
                                     layers=len(layers), scheme=scheme, site=site, batch=k,
                                     rows_per_chunk=k * per_group * len(layers)),
                   c.stages, _weights_bytes(lm), _weights_bytes(lm) + c.peak,
                   ["no gap_tol refinement (it adds steps only where a gap exceeds the tolerance)"])


# -- trace ----------------------------------------------------------------------------------
def _no_restorations(L, code, lo, hi, t, clean) -> list:
    """The walk's restorations on the meta device: none. Each is an index copy
    of the clean state into some rows ([rows, d_model], no FLOPs), and the
    runtime cannot select rows by index on the meta device."""
    return []


def trace_run(lm: LM, T: int, b: int, e: int, kinds: tuple, samples: int, window: int, max_tokens: int):
    """:func:`kncore.tracing.trace` on the meta device: its clean and
    corrupted runs and its grid walk (``tracing.core.run_grid``), the same
    functions the real trace calls, after the noise scale ("3sd": the std of
    the embedding matrix, an fp32 copy of it for a bf16 model). The noise (an
    add at the subject's embeddings, no FLOPs) and the restorations are left
    out."""
    from .tracing.core import clean_run, corrupted_run, embedding_matrix_std, run_grid

    tpos = T - 1 if lm.adapter.causal else max(0, T - 2)
    x = _ids(1, T)
    with torch.no_grad():
        embedding_matrix_std(lm)
        clean = clean_run(lm, x, kinds, tpos)
        # as trace() does: the clean distribution and the corrupted run stay alive
        p_clean = clean.logits.float().softmax(-1)[0]  # noqa: F841
        cor = corrupted_run(lm, x, samples, tpos, [])
        cor.logits.float().softmax(-1)[:, 0].mean()
        run_grid(lm, kinds, b, window, samples, clean, cor, 0, tpos, max_tokens, _no_restorations)


def plan_trace(lm: LM, *, tokens: int = 10, subject: tuple = (0, 3), kinds=("hidden", "mlp", "attn"),
               samples: int = 10, window: int = 10, max_tokens: int | None = None) -> JobPlan:
    """Causal tracing of one prompt of ``tokens`` tokens whose subject is
    tokens ``subject = (b, e)``."""
    from .tracing.core import DEFAULT_MAX_TOKENS, check_args

    kinds = check_args(kinds, samples, window, 1)
    _positive(tokens=tokens)
    b, e = subject
    if not 0 <= b < e <= tokens:
        raise InputError(f"subject tokens {b}:{e} are not inside a prompt of {tokens} tokens")
    mt = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    c = _Costing(lm)
    c.stage("trace", trace_run, 1, lm, tokens, b, e, kinds, samples, window, mt)
    return JobPlan("trace", dict(tokens=tokens, subject=[b, e], kinds=list(kinds), samples=samples,
                                 window=window, max_tokens=mt),
                   c.stages, _weights_bytes(lm), _weights_bytes(lm) + c.peak)


def _positive(**kw):
    for k, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{k} must be a positive integer, got {v!r}")


# -- layer statistics --------------------------------------------------------------------------
def _stats_batch(lm: LM, B: int, width: int, layers: list, acc_dtype):
    """One batch of ``rome.stats._compute`` on the meta device: the forward up
    to the last layer, capturing the keys. The covariance updates are costed by
    the caller (:func:`cov_flops` over the batch's real tokens: on the meta
    device the mask that picks them holds no values)."""
    with torch.no_grad():
        out = lm.run(_ids(B, width), attention_mask=_mask([width] * B, width), stop_layer=max(layers) + 1,
                     logits=None, capture=[("act", L) for L in layers])
        for L in layers:
            X = out.captured[("act", L)].reshape(-1, lm.d_ff).to(acc_dtype)
            del X
    return None


def plan_stats(lm: LM, *, layers=None, texts: int = 100000, text_tokens: int | None = None,
               batch_tokens: int | None = None, dtype: str = "float32",
               chunk_texts: int | None = None, lengths: Sequence[int] | None = None) -> JobPlan:
    """ROME's layer statistics over ``texts`` texts of ``text_tokens`` tokens
    each (default: the truncation length, ``min(context, 2048)``: an upper
    bound for a corpus of shorter texts), or over texts of the given token
    ``lengths`` (after truncation, in corpus order). ``layers``: default, the
    layer a ROME edit of this model uses (:func:`edit_hparams`)."""
    from .rome.stats import DEFAULT_CHUNK_TEXTS, _chunks

    max_len = min(lm.adapter.n_ctx, 2048)
    if lengths is None:
        n = max_len if text_tokens is None else min(int(text_tokens), max_len)
        _positive(texts=texts, text_tokens=n)
        lengths = [n] * texts
    else:
        try:
            lengths = [min(operator.index(x), max_len) for x in lengths]
        except TypeError:
            lengths = None
        if not lengths or min(lengths) < 1:
            raise InputError("lengths must be a non-empty list of positive integer token counts")
    chunks = list(_chunks(lengths, chunk_texts or DEFAULT_CHUNK_TEXTS))
    return stats_schedule(lm, layers, chunks, batch_tokens, dtype)


def stats_schedule(lm: LM, layers, chunks: list, batch_tokens: int | None = None,
                   dtype: str = "float32") -> JobPlan:
    """The plan of ``rome.stats._compute`` over ``chunks``: the token lengths of
    each chunk's texts as it encodes them, cut into batches by the run's own
    ``_batches``. The covariance FLOPs are those of the C++ op over the real
    (unpadded) tokens, :func:`cov_flops`."""
    from .rome.stats import _DTYPES, DEFAULT_BATCH_TOKENS, _batches

    layers = sorted(set([layers] if isinstance(layers, int) else (layers or edit_hparams(lm).layers[:1])))
    for L in layers:
        if not isinstance(L, int) or not 0 <= L < lm.n_layers:
            raise InputError(f"layer {L!r} is outside the model's {lm.n_layers} layers")
    if dtype not in _DTYPES:
        raise InputError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    bt = batch_tokens or DEFAULT_BATCH_TOKENS
    shapes: dict = {}  # (batch, padded width) -> [batches, real tokens]
    for chunk in chunks:
        seqs = [range(n) for n in chunk]  # _batches reads only the lengths
        for idx in _batches(seqs, bt):
            key = (len(idx), max(chunk[i] for i in idx))
            s = shapes.setdefault(key, [0, 0])
            s[0] += 1
            s[1] += sum(chunk[i] for i in idx)
    from .ops.cov_accumulate import CovAccumulator

    acc = _DTYPES[dtype]
    c = _Costing(lm)
    accs = []

    def setup():
        accs.extend(CovAccumulator(lm.d_ff, dtype=acc, device="meta") for _ in layers)

    def results():  # as _compute ends: each layer's mirrored second moment and mean, the sums still held
        return [(a.second_moment(), a.mean()) for a in accs]

    c.stage("accumulators", setup)
    el = torch.finfo(acc).bits // 8
    tokens = 0
    for (B, w), (k, real) in shapes.items():
        st = c.stage(f"batch of {B} x {w} tokens", _stats_batch, k, lm, B, w, layers, acc)
        st.flops += len(layers) * cov_flops(real, lm.d_ff)
        st.act_bytes += len(layers) * k * (lm.d_ff * lm.d_ff * el * 2 + B * w * lm.d_ff * el)
        tokens += real
    c.stage("second moments", results)
    peak = c.peak  # the accumulators (carried), then the largest batch or the results
    accs.clear()
    lens = [n for ch in chunks for n in ch]
    return JobPlan("stats", dict(layers=layers, texts=len(lens), text_tokens=max(lens, default=0), tokens=tokens,
                                 batch_tokens=bt, dtype=dtype, batches=sum(v[0] for v in shapes.values())),
                   c.stages, _weights_bytes(lm), _weights_bytes(lm) + peak,
                   ["texts of text_tokens tokens each: an upper bound for a corpus of shorter texts"
                    if len(set(lens)) <= 1 else "texts of the given lengths",
                    "covariance FLOPs: the C++ op's lower triangle, d_ff (d_ff + 1) per real token",
                    "not counted: the covariance op's packing workspace, kept between calls (at most 64 MiB "
                    "per thread)"])


# -- ROME edit ---------------------------------------------------------------------------------
def edit_rows(hp, tokens: int, subject_end: int, target_tokens: int):
    """ROME's rows (``rome.editing.build_rows``) when only lengths are known: one
    rewriting row per context template (prefix + prompt + target[:-1]), then the
    KL prompts (``"{} is a"``: the subject, taken to be the prompt's first
    ``subject_end`` tokens, and two more). The context
    templates are ``"{}"`` and one per generated prefix of its nominal length
    (ROME's ``get_context_templates``), followed by ". "; token ids are zeros."""
    from .rome.editing import _Rows
    prefixes = [0] + [length + 1 for length, n in hp.context_template_length_params
                      for _ in range(n // len(hp.context_prompts) * len(hp.context_prompts))]
    ids = [[0] * (t + tokens + target_tokens - 1) for t in prefixes]
    look = [t + subject_end - 1 for t in prefixes]
    ids += [[0] * (subject_end + 2) for _ in hp.kl_prompts]
    look += [subject_end - 1] * len(hp.kl_prompts)
    return _Rows(ids, look, len(prefixes), [t + tokens for t in prefixes], [0] * target_tokens)


def _edit_keys(lm: LM, layer: int, rows, fact_token: str):
    """ROME's keys: ``rome.editing.compute_keys`` over the rows' key rows."""
    from .rome.editing import compute_keys
    compute_keys(lm, layer, rows.key_rows(fact_token))


def _edit_base(lm: LM, layer: int, rows, state: dict):
    """The base pass and suffix cache of ROME's v* loop: ``rome.editing.v_prepare``."""
    from .rome.editing import v_prepare
    state["v"] = v_prepare(lm, layer, [rows], "mlp_out")


def _edit_step(hp, state: dict, backward: bool):
    """One evaluation of the v* loss (``rome.editing.v_loss``) and, but for the
    last, its gradient with respect to delta, as ``optimise_deltas`` takes them."""
    from .rome.editing import v_loss
    st = state["v"]
    deltas = [torch.zeros(st.lm.adapter.d_model, dtype=st.vd, device=st.dev, requires_grad=True)]
    with torch.enable_grad():
        loss, _ = v_loss(st, torch.stack(deltas), hp)
        if backward:
            torch.autograd.grad(loss.sum(), deltas)


def edit_hparams(lm: LM, hparams=None):
    """ROME's hyper-parameters for a plan: ``hparams`` (an ROMEHparams, a
    shipped name or a file), else the model's shipped file, else ROME's
    defaults at the middle layer."""
    from .rome.hparams import ROMEHparams, available, load_hparams

    if hparams is None:
        name = str(lm.name).lower()
        return load_hparams(name) if name in available() else ROMEHparams(layers=[lm.n_layers // 2])
    return hparams if isinstance(hparams, ROMEHparams) else load_hparams(hparams)


def plan_edit(lm: LM, *, tokens: int = 8, subject_end: int | None = None, target_tokens: int = 1,
              hparams=None, layer: int | None = None, rows=None) -> JobPlan:
    """One ROME edit of a prompt of ``tokens`` tokens whose subject ends at
    token ``subject_end`` (default: the prompt's middle), with a target of
    ``target_tokens`` tokens. ``hparams``: a :class:`~kncore.rome.ROMEHparams`,
    a shipped name or a file (default: the model's shipped file when kncore
    has one, else ROME's defaults at the middle layer). ``rows``: the request's
    own rows (``rome.editing.build_rows``, as ``--profile`` passes them) instead
    of :func:`edit_rows` from the lengths. The work runs through ROME's own
    ``compute_keys``, ``v_prepare`` and ``v_loss`` on the meta device."""
    hp = edit_hparams(lm, hparams)
    L = hp.layers[0] if layer is None else int(layer)
    if not 0 <= L < lm.n_layers:
        raise InputError(f"edit layer {L} outside the model's {lm.n_layers} layers")
    _positive(tokens=tokens, target_tokens=target_tokens)
    se = max(1, tokens // 2) if subject_end is None else int(subject_end)
    if not 1 <= se <= tokens:
        raise InputError(f"subject_end {se} outside a prompt of {tokens} tokens")
    if rows is None:
        rows = edit_rows(hp, tokens, se, target_tokens)
    c = _Costing(lm)
    state: dict = {}
    c.stage("keys", _edit_keys, 1, lm, L, rows, hp.fact_token)
    c.stage("base pass", _edit_base, 1, lm, L, rows, state)
    if hp.v_num_grad_steps > 1:
        c.stage("optimisation step (forward and backward)", _edit_step, hp.v_num_grad_steps - 1, hp, state, True)
    c.stage("last evaluation", _edit_step, 1, hp, state, False)
    state.clear()
    if hp.mom2_adjustment:
        # u = C^-1 k*: the Cholesky factor of C (d_ff^3 / 3, cached per layer) and
        # its solve; linear algebra that FlopCounterMode does not count.
        d = lm.d_ff
        c.stages.append(Stage("cholesky of C (once per layer)", d ** 3 / 3 + 2 * d * d, 0.0, 3 * d * d * 8.0,
                              2 * d * d * 8))
    return JobPlan("edit", dict(layer=L, tokens=tokens, subject_end=se, target_tokens=target_tokens,
                                rows=len(rows.ids), v_num_grad_steps=hp.v_num_grad_steps),
                   c.stages, _weights_bytes(lm), _weights_bytes(lm) + c.peak,
                   ["no early stop: all v_num_grad_steps evaluated",
                    "context templates' generation (once per model) not included"])


# ---------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------
@dataclass
class Plan:
    model: str
    dtype: torch.dtype
    config: dict
    weights_bytes: int
    jobs: list
    auto_batch: dict  # GPU name -> the attribute batch "auto" picks for its memory

    def times(self) -> dict:
        return {g: {j.job: j.seconds(g, self.dtype) for j in self.jobs} for g in GPUS}

    def to_dict(self) -> dict:
        return {"model": self.model, "dtype": str(self.dtype).replace("torch.", ""), "config": self.config,
                "weights_bytes": self.weights_bytes, "jobs": [j.to_dict() for j in self.jobs],
                "gpus": {g: {"peak_flops": GPUS[g][0 if self.dtype not in (torch.float32, torch.float64) else 1],
                             "bandwidth": GPUS[g][2], "memory": GPUS[g][3]} for g in GPUS},
                "efficiency": {"compute": COMPUTE_EFFICIENCY, "bandwidth": BANDWIDTH_EFFICIENCY},
                "seconds": self.times(), "auto_batch": self.auto_batch,
                "note": "predictions from the engine's schedule costed on the meta device; not measured on GPU"}

    def __str__(self) -> str:
        c = self.config
        lines = [f"plan for {self.model} ({c['arch']}, {c['n_layers']} layers, d_model {c['d_model']}, d_ff "
                 f"{c['d_ff']}, vocab {c['vocab']}), {str(self.dtype).replace('torch.', '')}: weights "
                 f"{_gb(self.weights_bytes)}",
                 "", f"{'job':10s} {'FLOPs':>10s} {'weights moved':>14s} {'activations moved':>18s} "
                     f"{'peak memory':>12s}  parameters"]
        for j in self.jobs:
            ps = ", ".join(f"{k}={v}" for k, v in j.params.items())
            lines.append(f"{j.job:10s} {_si(j.flops):>10s} {_gb(j.weight_bytes):>14s} {_gb(j.act_bytes):>18s} "
                         f"{_gb(j.peak_bytes):>12s}  {ps}")
        lines += ["", f"predicted time (roofline at {COMPUTE_EFFICIENCY:.0%} of peak FLOP/s and "
                      f"{BANDWIDTH_EFFICIENCY:.0%} of bandwidth; not measured on GPU):",
                  f"{'GPU':10s} " + " ".join(f"{j.job:>10s}" for j in self.jobs) + f" {'memory':>8s} {'fits':>6s}"
                  + ("  auto batch (attribute)" if self.auto_batch else "")]
        for g, t in self.times().items():
            fits = all(j.peak_bytes <= GPUS[g][3] for j in self.jobs)
            row = f"{g:10s} " + " ".join(f"{_sec(t[j.job]):>10s}" for j in self.jobs)
            row += f" {_gb(GPUS[g][3]):>8s} {'yes' if fits else 'NO':>6s}"
            if self.auto_batch:
                b = self.auto_batch.get(g)
                row += f"  {b if b else 'does not fit'}"
            lines.append(row)
        for j in self.jobs:
            for n in j.notes:
                lines.append(f"note ({j.job}): {n}")
        return "\n".join(lines)


def _si(x: float) -> str:
    for unit, v in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= v:
            return f"{x / v:.3g} {unit}"
    return f"{x:.3g}"


def _gb(x: float) -> str:
    return f"{x / 1e9:.3g} GB" if x >= 1e8 else f"{x / 1e6:.3g} MB"


def _sec(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.3g} h"
    if s >= 60:
        return f"{s / 60:.3g} min"
    if s >= 1:
        return f"{s:.3g} s"
    return f"{s * 1e3:.3g} ms"


JOBS = ("attribute", "trace", "stats", "edit")


def plan(model, *, jobs: Sequence[str] = JOBS, dtype=None, attribute: dict | None = None,
         trace: dict | None = None, stats: dict | None = None, edit: dict | None = None) -> Plan:
    """FLOPs, bytes moved, peak memory and predicted GPU time of each job.

    ``model``: a loaded :class:`~kncore.LM`, a ``config.json``, a folder
    holding one, or a shipped name (:data:`SHIPPED`). No weights are read.
    ``dtype``: the dtype the jobs run in (default: the model's, or the
    config's ``torch_dtype``). ``attribute``/``trace``/``stats``/``edit``:
    keyword arguments of :func:`plan_attribute`, :func:`plan_trace`,
    :func:`plan_stats` and :func:`plan_edit`.
    """
    jobs = [jobs] if isinstance(jobs, str) else list(jobs)
    for j in jobs:
        if j not in JOBS:
            raise InputError(f"unknown job {j!r}; choose from {JOBS}")
    ml = meta_lm(model, dtype)
    if ml.adapter.causal is False:
        jobs = [j for j in jobs if j in ("attribute", "trace")]
    fns = {"attribute": (plan_attribute, attribute), "trace": (plan_trace, trace), "stats": (plan_stats, stats),
           "edit": (plan_edit, edit)}
    out = [fns[j][0](ml, **(fns[j][1] or {})) for j in jobs]
    auto = {}
    if "attribute" in jobs:
        kw = dict(attribute or {})
        kw.pop("batch_size", None)
        kw.pop("memory_bytes", None)
        from .attribution import AUTO_MEMORY_FRACTION
        for g, (_, _, _, mem) in GPUS.items():
            budget = int((mem - _weights_bytes(ml)) * AUTO_MEMORY_FRACTION["cuda"])
            auto[g] = _auto_batch(ml, budget, kw) if budget > 0 else 0
    ad = ml.adapter
    cfg = {"arch": ad.arch, "n_layers": ad.n_layers, "d_model": ad.d_model, "d_ff": ad.d_ff,
           "n_heads": ad.n_heads, "n_kv_heads": getattr(ad, "n_kv_heads", ad.n_heads), "vocab": ad.vocab_size}
    return Plan(ml.name, ml.dtype, cfg, _weights_bytes(ml), out, auto)


def _auto_batch(ml: LM, budget: int, kw: dict) -> int:
    """The items per chunk ``batch_size="auto"`` picks under ``budget`` bytes
    above the weights, for a job of enough prompts to fill it (0: not even one
    item fits)."""
    from .attribution import check_layers, chunk_size, rows_per_group
    layers = check_layers(ml, kw.get("layers"))
    per_group = rows_per_group(kw.get("scheme", "riemann-left"), kw.get("steps", 20))
    lengths = [kw.get("tokens", 16) + kw.get("target_tokens", 1) - 1]
    fixed, per = attribute_chunk_memory(ml, max(lengths), layers, per_group, kw.get("site", "act"))
    if fixed + per > budget:
        return 0
    # a job of one item more than fits: chunk_size then says how many it packs
    return chunk_size(ml, lengths * int((budget - fixed) // per + 1), layers, per_group, kw.get("site", "act"),
                      "auto", budget_bytes=budget, device_type="cuda")
