"""Full-width numerics: LLaMA-2-7B, Mistral-7B and GPT-J-6B at their real
widths (2 layers, random weights) in bf16, every method compared with an fp32
run of the same weights. The bar: kncore's bf16 error is at most 2x the error
of plain PyTorch (the HF forward and autograd) in bf16 on the same inputs.
Each test prints its errors (pytest -s shows them)."""
from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys

import pytest
import torch

import kncore
from kncore import rome
from kncore.lm import LM
from kncore.rome import editing, reference
from kncore.testing import FULL_WIDTH, fullwidth_lm, ig_plain, rel_err, save_sharded, second_moment_plain
from kncore.tracing.reference import trace_ref

pytestmark = pytest.mark.slow

PROMPT, TARGET, SUBJECT = "the capital of canada is", " ottawa", "canada"
REQ = {"prompt": "the capital of {} is", "subject": "canada", "target_new": "rome"}
TEXTS = ["the dog was born in paris and speaks french", "one two three four five six seven",
         "this city is the capital of japan , tokyo", "they have a small red apple and a big blue cat",
         "music and painting were his field", "she works in berlin , germany"]


@pytest.fixture(scope="module", params=sorted(FULL_WIDTH))
def pair(request):
    """(bf16 LM, fp32 LM) with the same (bf16-representable) weights."""
    bf = fullwidth_lm(request.param)
    fp = LM(copy.deepcopy(bf.model).float(), bf.tokenizer, name=bf.name + "-fp32")
    yield bf, fp
    del bf, fp
    gc.collect()


def _bar(what, err_kn, err_plain):
    print(f"\n{what}: kncore bf16 err {err_kn:.3e}, plain torch bf16 err {err_plain:.3e}, "
          f"ratio {err_kn / err_plain:.2f}")
    assert err_kn <= 2 * err_plain, (what, err_kn, err_plain)


def test_logits_match_hf(pair):
    bf, fp = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(7, bf.adapter.vocab_size, (2, 17), generator=g)
    with torch.no_grad():
        ref = fp.model(ids).logits
        assert rel_err(fp.run(ids).logits, ref) < 1e-5  # kncore fp32 = HF fp32
        hf = bf.model(ids).logits
        kn = bf.run(ids).logits
        one = bf.run(ids[:1, :1]).logits  # a sequence of one token
    assert kn.dtype == torch.bfloat16
    _bar(f"{bf.name} logits", rel_err(kn, ref), rel_err(hf, ref))
    assert rel_err(one, ref[:1, :1]) <= 2 * rel_err(hf[:1, :1], ref[:1, :1]) + 1e-2


def test_attribute(pair):
    bf, fp = pair
    steps = 8
    kw = dict(steps=steps, progress=False)
    a_fp = kncore.attribute(fp, PROMPT, TARGET, **kw)
    a_bf = kncore.attribute(bf, PROMPT, TARGET, **kw)
    # The baseline computes what kncore does (checked once per adapter: Mistral runs LLaMA's).
    if bf.adapter.config.model_type != "mistral":
        plain_fp = torch.stack([ig_plain(fp, PROMPT, TARGET, L, steps) for L in range(fp.n_layers)])
        assert rel_err(a_fp.scores[0], plain_fp) < 1e-4
    plain_bf = torch.stack([ig_plain(bf, PROMPT, TARGET, L, steps) for L in range(bf.n_layers)])
    _bar(f"{bf.name} IG scores", rel_err(a_bf.scores[0], a_fp.scores[0]), rel_err(plain_bf, a_fp.scores[0]))
    print(f"completeness gap fp32 {a_fp.completeness_gap.max():.3g}, bf16 {a_bf.completeness_gap.max():.3g}")
    assert float(a_bf.completeness_gap.max()) <= max(2 * float(a_fp.completeness_gap.max()), 0.05)


def test_trace(pair):
    bf, fp = pair
    # Three tokens, the subject in the middle: the plain per-cell loop runs one
    # HF forward per (token, layer, kind) and is most of this test's time.
    prompt = "of canada is"
    kw = dict(samples=2, kinds=("hidden", "mlp", "attn"), noise=0.5)
    t_fp = kncore.trace(fp, prompt, SUBJECT, **kw)
    tgt = t_fp.target
    t_bf = kncore.trace(bf, prompt, SUBJECT, target=tgt, **kw)
    r_bf = trace_ref(bf, prompt, SUBJECT, target=tgt, **kw)
    grid = lambda t: torch.stack([t.scores[k] for k in kw["kinds"]])
    _bar(f"{bf.name} trace", rel_err(grid(t_bf), grid(t_fp)), rel_err(grid(r_bf), grid(t_fp)))


def test_layer_stats(pair):
    bf, fp = pair
    L = bf.n_layers - 1
    # The fp32 reference is the plain computation on the fp32 model (kncore's
    # fp32 statistics equal it to 1e-5: test_rome.py); one kncore run, in bf16,
    # because mirroring the d_ff x d_ff triangle takes 10 s of a 13 s run at d_ff 11008.
    ref = second_moment_plain(fp, L, TEXTS)
    kn = rome.layer_stats(bf, [L], TEXTS, n_samples=None, use_cache=False, progress=False,
                          dtype="float32")[L].second_moment
    err_kn = rel_err(kn, ref)
    del kn
    _bar(f"{bf.name} layer stats", err_kn, rel_err(second_moment_plain(bf, L, TEXTS), ref))


def test_rome_edit(pair):
    """The update vector of an edit at layer 0 (u = k*: the Cholesky solve with C
    is fp64 whatever the model's dtype, and takes 10-60 s at these widths)."""
    bf, fp = pair
    hp = rome.ROMEHparams(layers=[0], mom2_adjustment=False, v_num_grad_steps=5, early_stop_loss=0.0,
                          context_template_length_params=[])
    right = {}
    for lm in (fp, bf):
        w0 = lm.adapter.down_module(0).weight.detach().clone()
        e = rome.edit(lm, REQ, hp)
        right[lm] = e.steps[0].right.double()
        e.undo()
        assert torch.equal(lm.adapter.down_module(0).weight, w0)
    req = editing.parse_request(REQ)
    rows = editing.build_rows(bf, req, rome.context_templates(bf, hp), hp.fact_token, hp.kl_prompts)
    plain = reference.update_ref(bf, 0, req, rows, hp)["right"]
    _bar(f"{bf.name} ROME right vector", rel_err(right[bf], right[fp]), rel_err(plain, right[fp]))


# -- real checkpoint layouts -------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(pair, tmp_path_factory):
    """The bf16 model written as HF ships 7B checkpoints (several shards and their index)."""
    bf, _ = pair
    path = tmp_path_factory.mktemp(bf.name)
    save_sharded(bf.model, bf.tokenizer, path)
    return path


def test_sharded_checkpoint_loads_in_bf16(pair, ckpt):
    bf, _ = pair
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all((ckpt / s).exists() for s in shards)
    assert (ckpt / "config.json").exists() and (ckpt / "tokenizer.json").exists()
    lm = kncore.load(str(ckpt), dtype="bfloat16")
    assert lm.dtype == torch.bfloat16 and lm.d_ff == bf.d_ff and lm.adapter.n_kv_heads == bf.adapter.n_kv_heads
    assert lm.tokenize(PROMPT) == bf.tokenize(PROMPT)
    ids = torch.randint(7, bf.adapter.vocab_size, (1, 17))
    with torch.no_grad():
        assert torch.equal(lm.run(ids).logits, bf.run(ids).logits)


# VmHWM, the peak RSS of this process's own memory map: ru_maxrss would also
# count the parent's (pytest's) resident memory at fork.
_PEAK = """
import json, sys
import torch, transformers, kncore
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
base = hwm()
lm = kncore.load(sys.argv[1], dtype=sys.argv[2])
print(json.dumps({"grown": hwm() - base, "dtype": str(lm.dtype)}))
"""


def _load_peak(path, dtype):
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path), dtype], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bf16_load_builds_no_fp32_copy(pair, ckpt):
    """Peak RSS while loading, in a fresh process. Measured on LLaMA's two layers
    (774 MiB of bf16 weights): bf16 grows the peak by 0.29x the weights (the
    shards stay mapped), fp32 by 3.3x; an fp32 copy alone is 2x."""
    bf, _ = pair
    if bf.name != "llama-2-7b-2L":
        pytest.skip("one model is enough: the loading path does not depend on the architecture")
    size = sum(p.numel() * p.element_size() for p in bf.model.parameters())
    got = _load_peak(ckpt, "bfloat16")
    assert got["dtype"] == "torch.bfloat16"
    assert got["grown"] < 1.0 * size, got
    control = _load_peak(ckpt, "float32")  # the measurement sees an fp32 copy when there is one
    assert control["grown"] > 2.0 * size, control


def test_device_map(pair, ckpt):
    bf, _ = pair
    if bf.name != "llama-2-7b-2L":
        pytest.skip("one model is enough: the loading path does not depend on the architecture")
    ids = torch.randint(7, bf.adapter.vocab_size, (1, 5))
    with torch.no_grad():
        want = bf.run(ids).logits
    for dm in ("auto", "cpu", {"": "cpu"}):
        lm = kncore.load(str(ckpt), dtype="bfloat16", device_map=dm)
        with torch.no_grad():
            assert torch.equal(lm.run(ids).logits, want), dm
        del lm
    spread = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.norm": "cpu", "lm_head": "cpu"}
    with pytest.raises(ValueError, match="kncore runs a model on one device") as e:
        kncore.load(str(ckpt), dtype="bfloat16", device_map=spread)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not both"):
        kncore.load(str(ckpt), device="cpu", device_map="cpu")
