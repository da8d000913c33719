"""Integrated-gradients KN attribution: kncore against the knowledge-neurons
package and captum's LayerIntegratedGradients, in one process, on the same
model and prompts; then the steps each quadrature scheme needs for complete
attributions on the real SmolLM2.

    python bench/bench_ig.py                 # GPT-2-small shape, CPU, 3 prompts, + completeness
    python bench/bench_ig.py --quick         # 1 prompt, 1 repeat, short completeness ladder
    python bench/bench_ig.py --device cuda --shape llama2-7b --dtype bf16

Model: random weights from ``transformers.GPT2Config()`` defaults (12 layers,
768/3072, 12 heads, vocab 50257); prompts are 12 random words of
``kncore.testing.tiny_tokenizer()``'s vocabulary (ids < 120, so the 50257-way
head is kept). m = 20 steps, every layer, every neuron.

What each side computes (the same scores, checked):

* knowledge-neurons 0.0.2 ``get_scores(prompt, target, batch_size=10,
  steps=20)``: for GPT models it scales the output of ``mlp.c_fc`` (the
  pre-activation, kncore ``site="pre_act"``) at the last position by
  ``linspace(0, 1, 20)`` (kncore ``scheme="linspace"``), one full forward and
  backward of 10 steps x 12 tokens per batch, 2 batches per layer. Shim: the
  package imports ``einops`` only for ``repeat(x, "b d -> (r b) d")``; when
  einops is absent a 3-line stand-in is put in ``sys.modules``.
* captum ``LayerIntegratedGradients`` (``method="riemann_left"``, 20 steps,
  ``internal_batch_size=10``; kncore ``scheme="riemann-left"``). captum
  interpolates a layer's output between its values for the input and for an
  input baseline, which cannot zero one position's activations alone; so the
  attributed layer is an identity module applied to ``c_fc``'s output at the
  last position times a gate ``g`` that is the attributed input (input 1,
  baseline 0). Its layer output is then ``a`` for the input and ``0`` for the
  baseline: captum scales exactly what the package scales. One full forward
  (logits at every position, as the HF model gives them) per 10 steps.
* kncore ``attribute(..., site="pre_act")`` with the matching scheme.

For ``--shape llama2-7b`` (no knowledge-neurons support for LLaMA) the peer is
the knowledge-neurons algorithm run by kncore's plain reference
(``attribute_ref(batch_size=10)``: one full recompute per 10 steps per layer).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kncore  # noqa: E402
from kncore.attribution import attribute, attribute_ref  # noqa: E402
from kncore.testing import WORDS, tiny_tokenizer  # noqa: E402

STEPS = 20


# ---------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of a block above what was in use when it started: CUDA
    allocator statistics, or resident set size sampled every 2 ms on CPU
    (after ``malloc_trim``, so heap kept from an earlier run is not reused
    unseen)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = 0

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                import ctypes
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            self.base = self._rss()
            self.top = self.base
            self.stop = False

            def watch():
                while not self.stop:
                    self.top = max(self.top, self._rss())
                    time.sleep(0.002)

            self.thread = threading.Thread(target=watch, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.thread.join()
            self.peak = max(self.top, self._rss()) - self.base


def timed(fn, device, repeats):
    """(median seconds, all times, peak bytes of the first run, last result).
    CUDA: CUDA events around each run."""
    times, peak, out = [], 0, None
    for r in range(repeats):
        with PeakMemory(device) as pm:
            if torch.device(device).type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t)
        if r == 0:
            peak = pm.peak
    return statistics.median(times), times, peak, out


def matmul_peak(device, dtype):
    """FLOP/s of a large square matmul (median of 5), the machine's ceiling."""
    n = 2048 if torch.device(device).type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    med, _, _, _ = timed(lambda: a @ b, device, 5)
    return 2 * n ** 3 / med


# ---------------------------------------------------------------------------
# FLOP counts (multiply-adds x 2; backward = one matmul per forward matmul,
# activation gradients only)
# ---------------------------------------------------------------------------
def _layer_macs(ad, gated=False):
    """Matmul MACs of one token through one block (projections + MLP)."""
    q = ad.d_model * ad.n_heads * ad.head_dim
    kv = 2 * ad.d_model * ad.n_kv_heads * ad.head_dim
    o = ad.n_heads * ad.head_dim * ad.d_model
    mlp = (3 if gated else 2) * ad.d_model * ad.d_ff
    return q + kv + o + mlp


def flops_kncore(lm, T, steps, site):
    ad = lm.adapter
    N, gated = ad.n_layers, lm.arch == "llama"
    lay = _layer_macs(ad, gated)
    att = lambda ctx: 2 * ad.n_heads * ad.head_dim * ctx  # QK and PV for one query
    head = ad.d_model * ad.vocab_size
    base = T * N * lay + sum(att(t + 1) for t in range(T)) * N + head
    if site == "pre_act":  # the MLP input's up-projection(s) at the target position, per layer
        base += N * (2 if gated else 1) * ad.d_model * ad.d_ff
    steps_macs = 0
    for L in range(N):
        above = N - 1 - L
        fwd = above * (lay + att(T)) + head
        bwd = above * (lay + 2 * att(T)) + head
        if site == "pre_act":  # rows run layer L's activation and down-projection (and its backward)
            fwd += ad.d_ff * ad.d_model
            bwd += ad.d_ff * ad.d_model
        steps_macs += steps * (fwd + bwd)
    return 2 * (base + steps_macs)


def flops_kn(lm, T, steps, batch=10):
    """The knowledge-neurons algorithm: per layer, a baseline forward, then per
    step a full forward of T tokens (logits at every position) and a backward
    from the head down to layer L."""
    ad = lm.adapter
    N, gated = ad.n_layers, lm.arch == "llama"
    lay = _layer_macs(ad, gated)
    att_all = sum(2 * ad.n_heads * ad.head_dim * (t + 1) for t in range(T))
    head = ad.d_model * ad.vocab_size
    fwd = T * N * lay + N * att_all + T * head
    total = 0
    for L in range(N):
        above = N - 1 - L
        bwd = T * head + above * (T * lay + 2 * att_all) + T * ad.d_ff * ad.d_model
        total += fwd + steps * (fwd + bwd)
    return 2 * total


# ---------------------------------------------------------------------------
# models and prompts
# ---------------------------------------------------------------------------
def build_model(shape, device, dtype):
    import transformers as tf

    torch.manual_seed(0)
    if shape == "gpt2-small":
        cfg = tf.GPT2Config()
        cls = tf.GPT2LMHeadModel
    elif shape == "llama2-7b":
        cfg = tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                             max_position_embeddings=4096, bos_token_id=5, eos_token_id=6, pad_token_id=0)
        cls = tf.LlamaForCausalLM
    elif shape == "llama-small":  # runs the llama2-7b code path on a CPU
        cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=32000, bos_token_id=5, eos_token_id=6, pad_token_id=0)
        cls = tf.LlamaForCausalLM
    else:
        raise SystemExit(f"unknown --shape {shape}")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 7B model in fp32 would need 28 GB first
    try:
        with torch.device(device):
            model = cls(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_prompts(n, T, seed):
    g = torch.Generator().manual_seed(seed)
    words = list(WORDS)
    pick = lambda k: [words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g)]
    return [" ".join(pick(T)) for _ in range(n)], [pick(1)[0] for _ in range(n)]


def rel_err(a, b):
    """Largest |a - b| over a prompt's layers and neurons, relative to the
    largest |b| of that prompt; the worst prompt."""
    a, b = a.double().cpu(), b.double().cpu()
    return float(((a - b).abs().flatten(1).amax(1) / b.abs().flatten(1).amax(1)).max())


# ---------------------------------------------------------------------------
# the peers
# ---------------------------------------------------------------------------
def knowledge_neurons_class():
    try:
        import einops  # noqa: F401
    except ImportError:  # the package's only use: einops.repeat(x, "b d -> (r b) d", r=n)
        m = types.ModuleType("einops")

        def repeat(x, pattern, r):
            assert pattern == "b d -> (r b) d", pattern
            return x.repeat(r, 1)

        m.repeat = repeat
        sys.modules["einops"] = m
    from knowledge_neurons import KnowledgeNeurons

    return KnowledgeNeurons


class _Gate(torch.nn.Module):
    """The layer captum attributes: identity on the gated activations."""

    def forward(self, x):
        return x


def captum_scores(model, lm, prompt, target, pre_module):
    """[n_layers, d_ff] from captum's LayerIntegratedGradients (riemann_left)."""
    from captum.attr import LayerIntegratedGradients

    dev = lm.device
    ids = torch.tensor([lm.tokenize(prompt)], device=dev)
    tgt = lm.single_token(prompt, target)
    gate, state = _Gate(), {}

    def hook(mod, inp, out):
        out = out.clone()
        out[:, -1] = gate(out[:, -1] * state["g"].to(out.dtype))
        return out

    def forward(g):
        state["g"] = g
        logits = model(input_ids=ids.expand(g.shape[0], -1)).logits[:, -1]
        return logits.float().softmax(-1)[:, tgt]

    rows = []
    for L in range(lm.n_layers):
        h = pre_module(L).register_forward_hook(hook)
        try:
            lig = LayerIntegratedGradients(forward, gate)
            one = torch.ones(1, 1, device=dev)
            att = lig.attribute(one, baselines=torch.zeros_like(one), n_steps=STEPS, method="riemann_left",
                                internal_batch_size=10)
        finally:
            h.remove()
        rows.append(att[0].detach().float())
    return torch.stack(rows)


# ---------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------
def speed(args, rows, notes):
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = build_model(args.shape, dev, dtype)
    lm = kncore.from_hf(model, tiny_tokenizer(), name=args.shape)
    n = 1 if args.quick else args.prompts
    prompts, targets = make_prompts(n, args.tokens, seed=args.seed)
    T = len(lm.tokenize(prompts[0]))
    peak = matmul_peak(dev, dtype)
    print(f"{args.shape} {args.dtype} on {dev}: {n} prompts x {T} tokens, m={STEPS}, all {lm.n_layers} layers; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s")
    reps = 1 if args.quick else args.repeats
    kw = dict(steps=STEPS, site="pre_act", progress=False)
    # Warm-up: one full call per scheme (all layers). A one-layer warm-up left the
    # first timed scheme 30-50% slow on the CPU (allocator and thread-pool growth).
    for scheme in ("linspace", "riemann-left"):
        attribute(lm, prompts, targets, scheme=scheme, **kw)

    res = {}
    for scheme in ("linspace", "riemann-left"):
        res[scheme] = timed(lambda: attribute(lm, prompts, targets, scheme=scheme, **kw).scores, dev, reps)
    fl_k = flops_kncore(lm, T, STEPS, "pre_act")
    fl_p = flops_kn(lm, T, STEPS)

    def add(peer, scheme, t_peer, peak_peer, err, note=""):
        t_k, _, peak_k, _ = res[scheme]
        ratio = t_peer / t_k
        rows.append(dict(part="speed", shape=args.shape, dtype=args.dtype, device=str(dev), prompts=n, tokens=T,
                         steps=STEPS, scheme=scheme, site="pre_act", peer=peer,
                         peer_s_per_prompt=round(t_peer / n, 4), kncore_s_per_prompt=round(t_k / n, 4),
                         ratio=round(ratio, 2), max_rel_err=f"{err:.2e}",
                         kncore_gflops=round(n * fl_k / t_k / 1e9, 1),
                         kncore_pct_peak=round(100 * n * fl_k / t_k / peak, 1),
                         peer_gflops=round(n * fl_p / t_peer / 1e9, 1), flop_ratio=round(fl_p / fl_k, 1),
                         matmul_peak_gflops=round(peak / 1e9, 1), peak_mem_mb_kncore=round(peak_k / 2**20),
                         peak_mem_mb_peer=round(peak_peer / 2**20), note=note))
        print(f"  {peer:>22} {t_peer / n:8.3f} s/prompt | kncore {t_k / n:7.3f} s/prompt | {ratio:5.1f}x | "
              f"max rel err {err:.1e} | kncore {n * fl_k / t_k / 1e9:.0f} GFLOP/s "
              f"({100 * n * fl_k / t_k / peak:.0f}% of matmul peak) | FLOP ratio {fl_p / fl_k:.1f}x | "
              f"peak mem kncore {peak_k / 2**20:.0f} MiB, peer {peak_peer / 2**20:.0f} MiB")

    if args.shape == "gpt2-small" and not args.skip_peers:
        KN = knowledge_neurons_class()
        kn = KN(model, lm.tokenizer, model_type="gpt2", device=str(dev))
        t_kn, _, peak_kn, kn_scores = timed(
            lambda: torch.stack([kn.get_scores(p, t, batch_size=10, steps=STEPS, pbar=False)
                                 for p, t in zip(prompts, targets)]), dev, reps)
        add("knowledge-neurons", "linspace", t_kn, peak_kn, rel_err(res["linspace"][3], kn_scores))
        pre = lambda L: model.transformer.h[L].mlp.c_fc
        t_c, _, peak_c, c_scores = timed(
            lambda: torch.stack([captum_scores(model, lm, p, t, pre) for p, t in zip(prompts, targets)]), dev, reps)
        add("captum-LayerIG", "riemann-left", t_c, peak_c, rel_err(res["riemann-left"][3], c_scores))
    elif not args.skip_peers:
        t_r, _, peak_r, r_scores = timed(
            lambda: attribute_ref(lm, prompts, targets, steps=STEPS, scheme="linspace", site="pre_act",
                                  batch_size=10).scores, dev, 1)
        add("kn-algorithm (ref)", "linspace", t_r, peak_r, rel_err(res["linspace"][3], r_scores),
            "knowledge-neurons' algorithm on kncore's runtime (attribute_ref, 10 steps per batch)")
    if dev.type == "cpu":
        notes.append("GPU targets (LLaMA-2-7B shape, bf16, >= 30x vs the knowledge-neurons algorithm, "
                     ">= 8 prompts/s): not measured on GPU (`--device cuda --shape llama2-7b --dtype bf16`).")


def completeness(args, rows):
    """Steps each scheme needs for a median completeness gap < 1% on SmolLM2."""
    try:
        lm = kncore.load("smollm2-135m", device=args.device)
    except ValueError as e:
        print(f"completeness part skipped: {e}")
        return
    facts = [("The capital of Canada is", " Ottawa"), ("The capital of France is", " Paris"),
             ("The capital of Japan is", " Tokyo"), ("The capital of Germany is", " Berlin"),
             ("The capital of Italy is", " Rome"), ("The chemical symbol for gold is", " Au"),
             ("The Eiffel Tower is located in the city of", " Paris"), ("The capital of Spain is", " Madrid")]
    if args.quick:
        facts = facts[:2]
    P, T = [f[0] for f in facts], [f[1] for f in facts]
    cap = 64 if args.quick else 512
    print(f"completeness on SmolLM2-135M: {len(P)} prompts x {lm.n_layers} layers; steps for median gap < 1%")
    for scheme in ("gauss", "midpoint", "trapezoid", "riemann-left", "linspace"):
        m, tried = 2, []
        while True:
            t0 = time.perf_counter()
            a = attribute(lm, P, T, steps=m, scheme=scheme, progress=False)
            dt = time.perf_counter() - t0
            med = float(a.completeness_gap.median())
            tried.append(f"{m}:{med:.3g}")
            if med < 0.01 or 2 * m > cap:
                break
            m *= 2
        ok = med < 0.01
        rows.append(dict(part="completeness", shape="smollm2-135m", dtype="fp32", device=args.device,
                         prompts=len(P), tokens="", steps=m if ok else f">{m}", scheme=scheme, site="act",
                         kncore_s_per_prompt=round(dt / len(P), 4), note=f"median gap by steps: {' '.join(tried)}; "
                         f"worst (prompt, layer) gap at that step count {float(a.completeness_gap.max()):.3g}"))
        print(f"  {scheme:>13}: {'m = ' + str(m) if ok else 'not reached by m = ' + str(m)} "
              f"(median gap {med:.2%}, {dt:.2f} s for {len(P)} prompts); tried {' '.join(tried)}")


def machine(device):
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name().lower().replace("nvidia", "").strip().replace(" ", "-")
        return f"gpu-{name}"
    return f"cpu-{os.cpu_count()}core"


def write(rows, notes, args, cmd):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or "nocommit"
    except OSError:
        commit = "nocommit"
    threads = "" if torch.device(args.device).type == "cuda" or torch.get_num_threads() == os.cpu_count() \
        else f"_{torch.get_num_threads()}thread"
    stem = out / f"ig_{machine(args.device)}{threads}_{commit}{'_quick' if args.quick else ''}"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = stem.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, stem.with_suffix(".csv"))
    md = [f"# bench_ig ({machine(args.device)}, {torch.get_num_threads()} torch threads, commit {commit})", "",
          f"`{cmd}`", "",
          "| peer | scheme | prompts x tokens | peer s/prompt | kncore s/prompt | ratio | max rel err | "
          "kncore GFLOP/s (% matmul peak) | FLOP ratio | peak MiB kncore / peer |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] == "speed":
            md.append(f"| {r['peer']} | {r['scheme']} | {r['prompts']} x {r['tokens']} | {r['peer_s_per_prompt']} | "
                      f"{r['kncore_s_per_prompt']} | {r['ratio']}x | {r['max_rel_err']} | {r['kncore_gflops']} "
                      f"({r['kncore_pct_peak']}%) | {r['flop_ratio']}x | {r['peak_mem_mb_kncore']} / "
                      f"{r['peak_mem_mb_peer']} |")
    comp = [r for r in rows if r["part"] == "completeness"]
    if comp:
        md += ["", "Completeness on SmolLM2-135M (all 30 layers): steps for a median gap < 1%", "",
               "| scheme | steps | s/prompt at those steps | median gap by steps |", "|---|---|---|---|"]
        for r in comp:
            md.append(f"| {r['scheme']} | {r['steps']} | {r['kncore_s_per_prompt']} | {r['note']} |")
    md += [""] + [f"- {n}" for n in notes]
    tmp = stem.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, stem.with_suffix(".md"))
    print(f"wrote {stem}.csv and .md")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 prompt, 1 repeat, short completeness ladder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="gpt2-small", choices=("gpt2-small", "llama2-7b", "llama-small"))
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--skip-completeness", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    torch.set_grad_enabled(True)
    rows, notes = [], []
    cmd = "python bench/bench_ig.py " + " ".join(sys.argv[1:])
    if not args.skip_speed:
        speed(args, rows, notes)
    if not args.skip_completeness:
        completeness(args, rows)
    notes.append("knowledge-neurons needed one shim: an `einops` stand-in when einops is not installed.")
    notes.append("captum: LayerIntegratedGradients on an identity gate at c_fc's last position (see the docstring).")
    write(rows, notes, args, cmd)


if __name__ == "__main__":
    main()
