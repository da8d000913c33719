"""Full-width numerics: LLaMA-2-7B, Mistral-7B and GPT-J-6B at their real
widths (2 layers, random weights) in bf16, every method compared with an fp32
run of the same weights. The bar: kncore's bf16 error is at most 2x the error
of plain PyTorch (the HF forward and autograd) in bf16 on the same inputs.
Each test prints its errors (pytest -s shows them)."""
from __future__ import annotations

import copy
import gc

import pytest
import torch

import kncore
from kncore import rome
from kncore.lm import LM
from kncore.rome import editing, reference
from kncore.testing import FULL_WIDTH, fullwidth_lm, ig_plain, rel_err, second_moment_plain
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
    plain_fp = torch.stack([ig_plain(fp, PROMPT, TARGET, L, steps) for L in range(fp.n_layers)])
    assert rel_err(a_fp.scores[0], plain_fp) < 1e-4  # the baseline computes what kncore does
    plain_bf = torch.stack([ig_plain(bf, PROMPT, TARGET, L, steps) for L in range(bf.n_layers)])
    _bar(f"{bf.name} IG scores", rel_err(a_bf.scores[0], a_fp.scores[0]), rel_err(plain_bf, a_fp.scores[0]))
    print(f"completeness gap fp32 {a_fp.completeness_gap.max():.3g}, bf16 {a_bf.completeness_gap.max():.3g}")
    assert float(a_bf.completeness_gap.max()) <= max(2 * float(a_fp.completeness_gap.max()), 0.05)


def test_trace(pair):
    bf, fp = pair
    kw = dict(samples=3, kinds=("hidden", "mlp", "attn"), noise=0.5)
    t_fp = kncore.trace(fp, PROMPT, SUBJECT, **kw)
    tgt = t_fp.target
    t_bf = kncore.trace(bf, PROMPT, SUBJECT, target=tgt, **kw)
    r_bf = trace_ref(bf, PROMPT, SUBJECT, target=tgt, **kw)
    grid = lambda t: torch.stack([t.scores[k] for k in kw["kinds"]])
    _bar(f"{bf.name} trace", rel_err(grid(t_bf), grid(t_fp)), rel_err(grid(r_bf), grid(t_fp)))


def test_layer_stats(pair):
    bf, fp = pair
    L = bf.n_layers - 1
    kw = dict(n_samples=None, use_cache=False, progress=False, dtype="float32")
    ref = rome.layer_stats(fp, [L], TEXTS, **kw)[L].second_moment
    kn = rome.layer_stats(bf, [L], TEXTS, **kw)[L].second_moment
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
