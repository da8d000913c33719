"""MEMIT and EMMET: the solver's formulas against a plain float64 reference,
whole edits against kncore.rome.reference.memit_ref (HF hooks, full forwards,
torch.linalg.solve / torch.inverse), the batched v* loop against the
one-request loop, bit-exact undo for batches of 1, 7 and 64 in fp32 and bf16,
sequential batches, bad input, hparams files, and (slow) 10 CounterFact edits
on SmolLM2."""
from __future__ import annotations

import random

import pytest
import torch

import kncore
from kncore import rome
from kncore.rome import editing, memit, reference, solver
from kncore.testing import WORDS, tiny_lm
from test_rome import CAUSAL, _one_thread  # noqa: F401  (autouse: tiny models on one thread)

PROMPTS = ["the capital of {} is", "{} speaks", "the language of {} is", "{} was born in"]


def _seed():
    return int(torch.randint(0, 1 << 30, ()).item())


def _requests(n, seed):
    """n requests with distinct subjects (two words each, so 64 are distinct)."""
    r = random.Random(seed)
    subs = []
    while len(subs) < n:
        s = " ".join(r.sample(WORDS, 2))
        if s not in subs:
            subs.append(s)
    return [{"prompt": r.choice(PROMPTS), "subject": s, "target_new": r.choice(WORDS)} for s in subs]


def _texts(n, seed):
    r = random.Random(seed)
    return [" ".join(r.choices(WORDS, k=r.randint(5, 30))) for _ in range(n)]


def _stats(lm, layers, n=80, dtype="float64"):
    return rome.layer_stats(lm, layers, _texts(n, _seed()), n_samples=None, dtype=dtype, progress=False,
                            use_cache=False)


def _bits(t):
    return t.detach().contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]).clone()


def _snapshot(lm):
    return {k: _bits(v) for k, v in lm.model.state_dict().items() if v.is_floating_point()}


def _same_bits(lm, snap):
    now = _snapshot(lm)
    return all(torch.equal(now[k], snap[k]) for k in snap)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _hp(cls, layers, **kw):
    base = dict(layers=layers, v_num_grad_steps=6, context_template_length_params=[[5, 5]],
                mom2_update_weight=10.0, context_seed=_seed() % 1000)
    base.update(kw)
    return cls(**base)


def _logical(lm, W):
    """W as [d_model, d_ff] (MEMIT's orientation)."""
    return W if W.shape == (lm.d_model, lm.d_ff) else W.T


# -- the solver, line by line ------------------------------------------------------------

def test_solver_matches_plain_formulas():
    g = torch.Generator().manual_seed(_seed())
    d, B = 40, 7
    X = torch.randn(200, d, generator=g, dtype=torch.float64)
    C = X.T @ X / 200
    K = torch.randn(d, B, generator=g, dtype=torch.float64)
    R = torch.randn(17, B, generator=g, dtype=torch.float64)
    lam = 3.0
    # MEMIT: Delta = R K^T (lam C + K K^T)^-1
    want = R @ K.T @ torch.inverse(lam * C + K @ K.T)
    got = R @ solver.memit_keys(C, K, lam).T
    assert _rel(got, want) < 1e-10
    # EMMET: Delta = R (K^T C'^-1 K + ridge I)^-1 K^T C'^-1, C' = lam C + mu I
    mu, ridge = 0.5, 0.1
    Cp = lam * C + mu * torch.eye(d, dtype=torch.float64)
    Ci = torch.inverse(Cp)
    want = R @ torch.inverse(K.T @ Ci @ K + ridge * torch.eye(B, dtype=torch.float64)) @ K.T @ Ci
    got = R @ solver.emmet_keys(C, K, lam, ridge, mu).T
    assert _rel(got, want) < 1e-10
    # EMMET's equality constraint: with no ridge the edited keys map exactly to their targets.
    got = R @ solver.emmet_keys(C, K, lam, 0.0).T
    assert _rel(got @ K, R) < 1e-9
    # B = 1, no ridge: ROME's update (v* - W k) (C^-1 k)^T / (k^T C^-1 k).
    k, r = K[:, :1], R[:, :1]
    u = torch.linalg.solve(C, k)
    assert _rel(r @ solver.emmet_keys(C, k, lam, 0.0).T, r @ u.T / (k.T @ u)) < 1e-10


# -- whole edits against the plain reference -----------------------------------------------

@pytest.mark.parametrize("method", ["MEMIT", "EMMET"])
@pytest.mark.parametrize("arch", CAUSAL)
def test_edit_matches_reference(arch, method):
    """z, keys and every layer's update equal MEMIT's line-by-line computation
    (float64 model); the applied change is their sum; undo restores every bit."""
    # Gemma: a window longer than the rows, as in test_rome's reference test
    # (HF's eager attention turns a padded fp64 batch NaN when a query has every
    # key outside its window); the windows are tested in test_runtime.
    kw = {"window": 64} if arch in ("gemma2", "gemma3") else {}
    lm = tiny_lm(arch, seed=_seed(), dtype=torch.float64, **kw)
    cls = memit.METHODS[method]
    hp = _hp(cls, [0, 1])
    layers = hp.layers
    # 1e-3 of the mean diagonal added: the tiny GPT-J's keys leave some directions unused.
    C = {L: s.second_moment + 1e-3 * s.second_moment.diagonal().mean() * torch.eye(lm.d_ff, dtype=torch.float64)
         for L, s in _stats(lm, layers).items()}
    reqs = _requests(3, _seed())
    snap = _snapshot(lm)
    W0 = {L: lm.adapter.down_module(L).weight.detach().clone() for L in layers}
    e = memit.batch_edit(lm, reqs, hp, method=method, stats=C)
    dW = {L: _logical(lm, lm.adapter.down_module(L).weight.detach() - W0[L]) for L in layers}
    steps = {s.layer: s for s in e.steps}
    e.undo()
    assert _same_bits(lm, snap)
    templates = rome.context_templates(lm, hp)
    ref = reference.memit_ref(lm, [editing.parse_request(r) for r in reqs], hp, C, templates,
                              memit.template_groups(hp, templates), method)
    assert _same_bits(lm, snap), "the reference restores the weights"
    assert _rel(steps[layers[-1]].z, ref["z"]) < 1e-6
    for L in layers:
        s = steps[L]
        # HF's eager Gemma attention takes its softmax in fp32, so the fp64
        # reference's keys carry fp32 rounding there (measured 6e-8).
        assert _rel(s.keys, ref["keys"][L]) < (1e-6 if arch.startswith("gemma") else 1e-9)
        assert _rel(s.residual, ref["resid"][L]) < 1e-5
        upd = s.right.double() @ s.left.double().T
        assert _rel(upd, ref["updates"][L]) < 1e-5
        assert _rel(dW[L], ref["updates"][L]) < 1e-5
        assert ref["updates"][L].abs().max() > 0
    # the update step alone on given z (bench_memit --step-sizes): the same updates without the z loop
    Z = steps[layers[-1]].z
    step = reference.memit_ref(lm, [editing.parse_request(r) for r in reqs], hp, C, templates,
                               memit.template_groups(hp, templates), method, z=Z)
    assert torch.equal(step["z"], Z.double())
    for L in layers:
        assert _rel(step["updates"][L], ref["updates"][L]) < 1e-5


def test_batched_v_loop_equals_one_request_loop():
    """Several requests in one v* batch: each gets the delta, losses and stop of its own loop."""
    lm = tiny_lm("llama", seed=_seed(), dtype=torch.float64)
    hp = _hp(memit.MEMITHparams, [1], v_num_grad_steps=8, early_stop_loss=0.0)
    templates = rome.context_templates(lm, hp)
    rows = [editing.build_rows(lm, editing.parse_request(r), templates, hp.fact_token, hp.kl_prompts)
            for r in _requests(4, _seed())]
    # An early-stop threshold between the requests' lowest losses: some stop early, some run on.
    lows = sorted(min(x[2]) for x in editing.optimise_deltas(lm, 1, rows, hp, init_site="resid_post"))
    hp = hp.replace(early_stop_loss=(lows[0] + lows[-1]) / 2)
    batched = editing.optimise_deltas(lm, 1, rows, hp, init_site="resid_post")
    for r, (d, v, losses, p) in zip(rows, batched):
        d1, v1, losses1, p1 = editing.optimise_deltas(lm, 1, [r], hp, init_site="resid_post")[0]
        assert len(losses) == len(losses1)
        assert max(abs(a - b) for a, b in zip(losses, losses1)) < 1e-9
        assert _rel(v, v1) < 1e-12
        assert torch.allclose(d, d1, rtol=1e-8, atol=1e-12)
        assert abs(p - p1) < 1e-9
    assert len({len(x[2]) for x in batched}) > 1, "some requests stop early, others do not"


# -- undo, batches, dtypes -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_undo_restores_every_byte(n, dtype):
    arch = "gpt2" if n == 7 else "llama"  # both weight layouts (Conv1D [d_ff, d_model], Linear)
    lm = tiny_lm(arch, seed=_seed(), dtype=dtype)
    hp = _hp(memit.MEMITHparams, [0, 2], v_num_grad_steps=2, batch_requests=32)
    st = _stats(lm, [0, 2], dtype="float32")
    snap = _snapshot(lm)
    with memit.batch_edit(lm, _requests(n, _seed()), hp, stats=st) as e:
        assert [s.layer for s in e.steps] == [0, 2] and e.steps[0].left.shape == (lm.d_ff, n)
        assert not _same_bits(lm, snap)
    assert _same_bits(lm, snap)


def test_sequential_batches_are_one_edit():
    """[[a, b, c], [d, e]]: the second batch is computed on the model the first left,
    bit for bit as two separate calls; one undo takes both back."""
    lm = tiny_lm("llama", seed=_seed())
    hp = _hp(memit.EMMETHparams, [0, 1], v_num_grad_steps=3)
    st = _stats(lm, [0, 1], dtype="float32")
    reqs = _requests(5, _seed())
    snap = _snapshot(lm)
    e = memit.batch_edit(lm, [reqs[:3], reqs[3:]], hp, method="EMMET", stats=st)
    assert len(e.steps) == 4 and len(e.requests) == 5
    both = _snapshot(lm)
    e.undo()
    assert _same_bits(lm, snap)
    e1 = memit.batch_edit(lm, reqs[:3], hp, method="EMMET", stats=st)
    e2 = memit.batch_edit(lm, reqs[3:], hp, method="EMMET", stats=st)
    assert _same_bits(lm, both)
    e2.undo()
    e1.undo()
    assert _same_bits(lm, snap)


# -- bad input -------------------------------------------------------------------------------

EASYEDIT_ROME_YAML = """alg_name: "ROME"
model_name: "./hugging_cache/gpt2-xl"
layers: [1]
fact_token: "subject_last"
v_num_grad_steps: 2
v_lr: 5e-1
v_loss_layer: 2
v_weight_decay: 0.5
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: true
"""


def test_bad_input(tmp_path):
    lm = tiny_lm("gpt2", seed=_seed())
    hp = _hp(memit.MEMITHparams, [0, 1], v_num_grad_steps=2)
    st = _stats(lm, [0, 1], dtype="float32")
    reqs = _requests(3, _seed())
    snap = _snapshot(lm)
    clash = [reqs[0], {**reqs[0], "target_new": reqs[0]["target_new"] + "s"}]
    with pytest.raises(kncore.InputError, match="same subject .* different targets"):
        memit.memit_edit(lm, clash, hp, stats=st)
    with pytest.raises(kncore.InputError, match="empty batch"):
        memit.memit_edit(lm, [], hp, stats=st)
    with pytest.raises(kncore.InputError, match="batch 1 of 2 is empty"):
        memit.memit_edit(lm, [reqs, []], hp, stats=st)
    with pytest.raises(kncore.InputError, match="outside"):
        memit.memit_edit(lm, reqs, hp.replace(layers=[1, 3]), stats=st)
    with pytest.raises(kncore.InputError, match="no statistics given for layer 1"):
        memit.memit_edit(lm, reqs, hp, stats={0: st[0]})
    with pytest.raises(rome.StatsCacheMismatch, match="statistics for layer 0 given for layer 1"):
        memit.memit_edit(lm, reqs, hp, stats={0: st[0], 1: st[0]})
    other = tiny_lm("gpt2", seed=_seed() + 7)
    with pytest.raises(rome.StatsCacheMismatch, match="fingerprint"):
        memit.memit_edit(other, reqs, hp, stats=st)
    zero = torch.zeros(lm.d_ff, lm.d_ff)  # lambda C + K K^T has rank 3 < d_ff
    with pytest.raises(rome.SingularSystem, match="lambda C \\+ K K\\^T is singular"):
        memit.memit_edit(lm, reqs, hp, stats={0: zero, 1: zero})
    # EMMET without its ridge: two identical requests make K^T C^-1 K singular.
    with pytest.raises(rome.SingularSystem, match="emmet_lambda"):
        memit.emmet_edit(lm, [reqs[0], dict(reqs[0])], _hp(memit.EMMETHparams, [0, 1], v_num_grad_steps=2,
                                                           emmet_lambda=0.0), stats=st)
    (tmp_path / "rome.yaml").write_text(EASYEDIT_ROME_YAML)
    with pytest.raises(kncore.InputError, match="ROME hyper-parameters .* not MEMIT's"):
        memit.memit_edit(lm, reqs, tmp_path / "rome.yaml", stats=st)
    (tmp_path / "memit.yaml").write_text(EASYEDIT_ROME_YAML.replace('"ROME"', '"MEMIT"'))
    with pytest.raises(kncore.InputError, match="MEMIT hyper-parameters .* not ROME's"):
        rome.edit(lm, reqs[0], tmp_path / "memit.yaml", stats=st)
    with pytest.raises(kncore.InputError, match="masked LM"):
        memit.memit_edit(tiny_lm("bert", seed=0), reqs, hp, stats=st)
    assert _same_bits(lm, snap), "a refused edit changed nothing"
    # A failure after the first layer's update (layer 1's system is singular) undoes it.
    with pytest.raises(rome.SingularSystem):
        memit.memit_edit(lm, reqs, hp, stats={0: st[0], 1: zero})
    assert _same_bits(lm, snap)


EASYEDIT_MEMIT_GPT2XL = """alg_name: "MEMIT"
model_name: "./hugging_cache/gpt2-xl"
stats_dir: "./data/stats"
device: 0
layers: [13, 14, 15, 16, 17]
clamp_norm_factor: 0.75
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 20
v_lr: 5e-1
v_loss_layer: 47
v_weight_decay: 0.5
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 20000
rewrite_module_tmp: "transformer.h.{}.mlp.c_proj"
layer_module_tmp: "transformer.h.{}"
mlp_module_tmp: "transformer.h.{}.mlp"
attn_module_tmp: "transformer.h.{}.attn"
ln_f_module: "transformer.ln_f"
lm_head_module: "transformer.wte"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
"""


def test_hparams_files(tmp_path):
    M = memit.MEMITHparams
    assert {"gpt2-xl", "gpt-j-6b", "llama-2-7b", "smollm2-135m"} <= set(rome.available(M))
    assert rome.load_hparams("gpt2-xl", M).layers == [13, 14, 15, 16, 17]
    assert rome.load_hparams("gpt-j-6b", M).layers == [3, 4, 5, 6, 7, 8]
    hp = rome.load_hparams("llama-2-7b", M)
    assert hp.layers == [4, 5, 6, 7, 8] and hp.mom2_update_weight == 15000 and hp.v_weight_decay == 1e-3
    (tmp_path / "gpt2-xl.yaml").write_text(EASYEDIT_MEMIT_GPT2XL)
    ee = rome.load_hparams(tmp_path / "gpt2-xl.yaml", M)
    assert ee == rome.load_hparams("gpt2-xl", M) and ee.mom2_update_weight == 20000.0
    assert ee.context_template_length_params == [[10, 5]]  # MEMIT's templates, not ROME's
    assert rome.load_hparams("smollm2-135m", memit.EMMETHparams).emmet_lambda == 0.1
    assert rome.available() == sorted(set(rome.available()))  # ROME's list holds no MEMIT files
    with pytest.raises(kncore.InputError, match="layer_selection"):
        M(layer_selection="random")
    with pytest.raises(kncore.InputError, match="no MEMIT hparams"):
        rome.load_hparams("gpt-7", M)


# -- the real model ----------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm_memit_ten_counterfact_edits(smollm, data_dir):
    from kncore.data import load_counterfact
    lm = smollm
    hp = rome.load_hparams("smollm2-135m", memit.MEMITHparams)
    # Cached under $KNCORE_CACHE/rome_stats, as the demo's statistics are.
    st = rome.layer_stats(lm, hp.layers, hp.mom2_dataset, n_samples=hp.mom2_n_samples, dtype=hp.mom2_dtype,
                          progress=False)
    recs = load_counterfact(data_dir=data_dir)[:10]
    reqs = [{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new, "relation_id": r.relation_id}
            for r in recs]
    prompts = [r.rewrite_prompt for r in recs]
    targets = [lm.target_ids(p, r.target_new)[0] for p, r in zip(prompts, recs)]
    paris = lm.token_id(" Paris")
    assert int(lm.next_token_probs("The capital of France is")[0].argmax()) == paris
    before = lm.next_token_probs(prompts).argmax(-1)
    assert (before != torch.tensor(targets)).any()
    snap = _snapshot(lm)
    with memit.memit_edit(lm, reqs, hp, stats=st):
        after = lm.next_token_probs(prompts).argmax(-1)
        assert after.tolist() == targets, [lm.tokenizer.decode([t]) for t in after.tolist()]
        assert int(lm.next_token_probs("The capital of France is")[0].argmax()) == paris
    assert _same_bits(lm, snap)
