"""ROME: layer statistics (plain-torch reference, cache, resume, torchrun
sharding), rank-one edits (reference formula, exact undo), hparams files and
bad input."""
from __future__ import annotations

import json
import random

import pytest
import torch

import kncore
from kncore import rome
from kncore.rome import editing, reference
from kncore.testing import WORDS, ARCHS, tiny_lm

CAUSAL = tuple(a for a in ARCHS if a != "bert")  # every causal tiny architecture
REQ = {"prompt": "the capital of {} is", "subject": "canada", "target_new": "rome"}


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models run fastest on one thread (on a busy 2-core machine, 2
    threads made test_layer_stats_match_plain_torch 40x slower)."""
    if "smollm" in request.fixturenames:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _seed():
    return int(torch.randint(0, 1 << 30, ()).item())


def _texts(n, seed, lo=1, hi=30):
    r = random.Random(seed)
    return [" ".join(r.choices(WORDS, k=r.randint(lo, hi))) for _ in range(n)]


def _bits(t):
    return t.detach().contiguous().view(torch.int64 if t.element_size() == 8 else torch.int32).clone()


def _snapshot(lm):
    return {k: _bits(v) for k, v in lm.model.state_dict().items() if v.is_floating_point()}


def _same_bits(lm, snap):
    now = _snapshot(lm)
    return all(torch.equal(now[k], snap[k]) for k in snap)


def _stats(lm, layers, n=80, dtype="float64", **kw):
    kw.setdefault("use_cache", False)
    return rome.layer_stats(lm, layers, _texts(n, _seed()), n_samples=None, dtype=dtype, progress=False, **kw)


# -- layer statistics ------------------------------------------------------------------

def _plain_second_moment(lm, L, texts):
    """One Hugging Face forward per text, keys read by a hook on the down-projection."""
    store = []
    h = lm.adapter.down_module(L).register_forward_pre_hook(lambda m, i: store.append(i[0][0].double()))
    try:
        with torch.no_grad():
            for t in texts:
                lm.model(torch.tensor([lm.tokenize(t)]))
    finally:
        h.remove()
    X = torch.cat(store)
    return X.T @ X / X.shape[0], X.mean(0), X.shape[0]


@pytest.mark.parametrize("arch", CAUSAL)
def test_layer_stats_match_plain_torch(arch):
    lm = tiny_lm(arch, seed=_seed())
    texts = _texts(37, _seed())
    # batch_tokens 60: many batches of mixed lengths, so padding must be masked out.
    st = rome.layer_stats(lm, [0, 2], texts, n_samples=None, dtype="float64", batch_tokens=60,
                          chunk_texts=16, use_cache=False, progress=False)
    assert sorted(st) == [0, 2]
    for L in (0, 2):
        C, mu, n = _plain_second_moment(lm, L, texts)
        assert st[L].n_tokens == n and st[L].n_texts == len(texts)
        assert st[L].second_moment.shape == (lm.d_ff, lm.d_ff)
        err = (st[L].second_moment.double() - C).abs().max() / C.abs().max()
        assert err < 1e-5, err
        assert torch.allclose(st[L].mean.double(), mu, atol=1e-5 * mu.abs().max().item())
        assert torch.equal(st[L].second_moment, st[L].second_moment.T)


def test_layer_stats_n_samples_counts_texts():
    lm = tiny_lm("gpt2", seed=_seed())
    texts = _texts(30, _seed())
    st = rome.layer_stats(lm, [1], texts, n_samples=11, use_cache=False, progress=False, dtype="float64")
    C, _, n = _plain_second_moment(lm, 1, texts[:11])
    assert st[1].n_texts == 11 and st[1].n_tokens == n
    assert (st[1].second_moment.double() - C).abs().max() / C.abs().max() < 1e-5


def test_layer_stats_cache(tmp_path):
    seed = _seed()
    lm = tiny_lm("llama", seed=seed)
    texts = _texts(25, _seed())
    calls = []
    kw = dict(n_samples=None, cache_dir=tmp_path, dtype="float32", progress=calls.append)
    a = rome.layer_stats(lm, [1, 2], texts, **kw)
    assert calls, "the first call computes"
    path = a[1].path
    assert path.is_file() and not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("partial-*"))
    meta = rome.read_meta(path)
    assert meta["fingerprint"] == lm.fingerprint() and meta["layer"] == 1 and meta["n_samples"] is None
    calls.clear()
    b = rome.layer_stats(lm, [2, 1], texts, **kw)
    assert not calls, "the second call reads the cache"
    assert torch.equal(a[1].second_moment, b[1].second_moment) and torch.equal(a[2].mean, b[2].mean)
    # The same name with other weights: the cache is addressed by content, so they get their
    # own file and both stay cached; a file of one model given to the other is refused.
    other = tiny_lm("llama", seed=seed + 1)
    c = rome.layer_stats(other, [1], texts, **kw)
    assert c[1].path != path and rome.read_meta(c[1].path)["fingerprint"] == other.fingerprint()
    assert rome.read_meta(path)["fingerprint"] == lm.fingerprint()
    assert not torch.equal(c[1].second_moment, a[1].second_moment)
    with pytest.raises(rome.StatsCacheMismatch, match="not this one"):
        rome.load_stats(path, other, 1)


def test_layer_stats_resume_after_interrupt(tmp_path):
    lm = tiny_lm("gpt2", seed=_seed())
    texts = _texts(40, _seed())
    kw = dict(n_samples=None, dtype="float32", batch_tokens=48, chunk_texts=16, checkpoint_every=2)
    seen = []

    def boom(info):
        seen.append(info["batches"])
        if info["batches"] == 5:
            raise KeyboardInterrupt("injected")

    with pytest.raises(KeyboardInterrupt):
        rome.layer_stats(lm, [0, 1], texts, cache_dir=tmp_path / "a", progress=boom, **kw)
    assert list((tmp_path / "a").rglob("partial-*")), "a checkpoint was left behind"
    seen.clear()
    resumed = rome.layer_stats(lm, [0, 1], texts, cache_dir=tmp_path / "a", progress=seen.append, **kw)
    assert seen[0]["batches"] == 5, "resumed after the checkpoint at batch 4, not from the start"
    assert not list((tmp_path / "a").rglob("partial-*"))
    whole = rome.layer_stats(lm, [0, 1], texts, cache_dir=tmp_path / "b", progress=False, **kw)
    for L in (0, 1):
        assert torch.equal(resumed[L].second_moment, whole[L].second_moment)
        assert resumed[L].n_tokens == whole[L].n_tokens and resumed[L].n_texts == whole[L].n_texts == 40


def _dist_worker(rank, world, init_file, out, texts, seed):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        lm = tiny_lm("gpt2", seed=seed)
        st = rome.layer_stats(lm, [0, 2], texts, n_samples=35, dtype="float64", batch_tokens=1,
                              use_cache=False, progress=False)
        if rank == 0:
            torch.save({L: (s.second_moment, s.n_tokens, s.n_texts) for L, s in st.items()}, out)
        # Both ranks done before either tears gloo down (one fresh-clone CI run
        # saw a rank abort at the end with "terminate called without an active
        # exception"; not reproduced in 13 runs of this test alone).
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_layer_stats_distributed_equals_single(tmp_path):
    import torch.multiprocessing as mp
    seed, texts = _seed(), _texts(41, _seed())
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt"), texts, seed), nprocs=2)
    got = torch.load(tmp_path / "out.pt")
    lm = tiny_lm("gpt2", seed=seed)
    # batch_tokens=1: one text per batch on both sides, so every key has the
    # same bits whatever the sharding and only the order of the float64 sums differs.
    one = rome.layer_stats(lm, [0, 2], texts, n_samples=35, dtype="float64", batch_tokens=1,
                           use_cache=False, progress=False)
    for L in (0, 2):
        C, n_tok, n_txt = got[L]
        assert n_tok == one[L].n_tokens and n_txt == one[L].n_texts == 35
        assert (C - one[L].second_moment).abs().max() <= 1e-12 * C.abs().max()


def test_corpus_formats(tmp_path):
    texts = _texts(6, _seed())
    (tmp_path / "a.txt").write_text("\n".join(texts[:3]) + "\n\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts[3:5])))
    (tmp_path / "c.json").write_text(json.dumps([texts[5]]))
    c = rome.open_corpus(tmp_path)
    assert list(rome.corpus.take(c, None)) == texts
    assert list(rome.corpus.take(rome.open_corpus(tmp_path / "b.jsonl"), 1)) == texts[3:4]
    assert rome.open_corpus(tmp_path / "a.txt").digest != rome.open_corpus(tmp_path / "b.jsonl").digest
    py = rome.open_corpus("pydoc")
    assert py.kind == "builtin" and len(list(rome.corpus.take(py, None))) > 500
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(kncore.InputError, match="text"):
        list(rome.corpus.take(rome.open_corpus(tmp_path / "bad.jsonl"), None))
    with pytest.raises(kncore.InputError, match="unknown corpus"):
        rome.open_corpus("no-such-corpus")
    with pytest.raises(kncore.InputError, match="does not exist"):
        rome.open_corpus(str(tmp_path / "missing.jsonl"))
    with pytest.raises(kncore.InputError, match="strings"):
        rome.open_corpus([1, 2])
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(kncore.InputError, match="datasets"):
            rome.open_corpus("wikipedia")


# -- edits ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("mom2", [True, False])
def test_edit_matches_reference(arch, mom2):
    """Same left/right vectors and weight change as plain ROME (HF hooks, full
    forwards, torch.inverse) in float64; undo restores every bit."""
    # HF's eager Gemma-2 attention takes the softmax "in fp32": in fp64 the
    # mask's fp64 minimum becomes -inf there, and a padded query with every key
    # outside its 5-token window turns the batch NaN. A window longer than the
    # rows keeps the reference finite (the windows are tested in test_runtime).
    kw = {"window": 64} if arch == "gemma2" else {}
    lm = tiny_lm(arch, seed=_seed(), dtype=torch.float64, **kw)
    L = 1
    hp = rome.ROMEHparams(layers=[L], mom2_adjustment=mom2, v_num_grad_steps=8, context_seed=_seed() % 1000)
    st = _stats(lm, [L], n=60)
    snap = _snapshot(lm)
    W = lm.adapter.down_module(L).weight
    W0 = W.detach().clone()
    e = rome.edit(lm, REQ, hp, stats=st)
    dW = (W.detach() - W0).double()
    s = e.steps[0]
    rows = editing.build_rows(lm, editing.parse_request(REQ), rome.context_templates(lm, hp), hp.fact_token,
                              hp.kl_prompts)
    e.undo()
    assert _same_bits(lm, snap)
    ref = reference.update_ref(lm, L, editing.parse_request(REQ), rows, hp, C=st[L].second_moment)
    assert len(s.losses) == len(ref["losses"])
    assert max(abs(a - b) for a, b in zip(s.losses, ref["losses"])) < 1e-5
    rel = lambda a, b: ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
    assert rel(s.left, ref["left"]) < 1e-5
    assert rel(s.right, ref["right"]) < 1e-4
    want = torch.outer(ref["left"], ref["right"])
    want = want if want.shape == dW.shape else want.T
    assert rel(dW, want) < 1e-4
    assert s.right.norm() > 0 and (s.losses[-1] < s.losses[0])


def test_update_formula_fp32_orientation():
    """fp32 models: the applied change is left right^T, recomputed in fp64 from
    the recorded vectors and C, in each weight layout (Conv1D and Linear)."""
    for arch in ("gpt2", "llama"):
        lm = tiny_lm(arch, seed=_seed())
        L = 2
        st = _stats(lm, [L], n=60, dtype="float32")
        hp = rome.ROMEHparams(layers=[L], v_num_grad_steps=5)
        W = lm.adapter.down_module(L).weight
        W0 = W.detach().clone()
        with rome.edit(lm, REQ, hp, stats=st) as e:
            dW = (W.detach() - W0).double()
            s = e.steps[0]
        assert torch.equal(W, W0)
        C = st[L].second_moment.double()
        u = torch.linalg.solve(C, s.k_star.double())
        left = u / u.norm()
        right = (s.v_star.double() - s.value.double()) / torch.dot(s.key.double(), left)
        want = torch.outer(left, right)  # [d_ff, d_model]
        if arch == "llama":
            want = want.T  # nn.Linear stores [d_model, d_ff]
        assert dW.shape == want.shape
        err = (dW - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item() + 4 * torch.finfo(torch.float32).eps * W0.abs().max().item()


def test_mom2_adjustment_is_measurable():
    lm = tiny_lm("gpt2", seed=_seed())
    st = _stats(lm, [1], n=80, dtype="float32")
    lefts = {}
    for mom2 in (True, False):
        hp = rome.ROMEHparams(layers=[1], mom2_adjustment=mom2, v_num_grad_steps=3)
        with rome.edit(lm, REQ, hp, stats=st) as e:
            lefts[mom2] = e.steps[0].left
    assert torch.allclose(lefts[False], e.steps[0].k_star / e.steps[0].k_star.norm(), atol=1e-6)
    cos = torch.dot(lefts[True], lefts[False]).item()
    assert cos < 0.99, cos


def test_sequential_edits_undo_in_reverse():
    lm = tiny_lm("llama", seed=_seed())
    st = _stats(lm, [0, 1], n=60, dtype="float32")
    hp = rome.ROMEHparams(layers=[0, 1], v_num_grad_steps=4)
    snap = _snapshot(lm)
    reqs = [REQ, {"prompt": "{} speaks", "subject": "france", "target_new": {"str": "german"}}]
    e = rome.edit(lm, reqs, hp, stats=st)
    assert len(e.steps) == 4 and [s.layer for s in e.steps] == [0, 1, 0, 1]
    assert not _same_bits(lm, snap)
    e.undo()
    assert _same_bits(lm, snap)
    with pytest.raises(kncore.InputError, match="already undone"):
        e.undo()
    # Two separate edits of the same weight: the older cannot be undone first.
    e1 = rome.edit(lm, REQ, hp.replace(layers=[1]), stats=st)
    e2 = rome.edit(lm, reqs[1], hp.replace(layers=[1]), stats=st)
    mid = _snapshot(lm)
    with pytest.raises(RuntimeError, match="checksum"):
        e1.undo()
    assert _same_bits(lm, mid)
    e2.undo()
    e1.undo()
    assert _same_bits(lm, snap)


def test_context_templates_are_seeded():
    lm = tiny_lm("gpt2", seed=_seed())
    hp = rome.ROMEHparams(layers=[1], context_seed=3)
    a = rome.context_templates(lm, hp)
    rome.clear_cache()
    b = rome.context_templates(lm, hp)
    assert a == b and len(a) == 21 and a[0] == "{}"
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in a[1:])
    # ROME's lengths count the seed word: at most 5 and 10 tokens (fewer when
    # the random model samples special tokens, which decoding drops).
    lens = [len(lm.tokenizer(t[: -len(". {}")])["input_ids"]) for t in a[1:]]
    assert max(lens[:10]) <= 5 and max(lens[10:]) <= 10 and max(lens[10:]) > 5
    assert rome.context_templates(lm, hp.replace(context_seed=4)) != a


def test_locate_finds_the_slot_not_an_earlier_mention():
    lm = tiny_lm("llama", seed=0)
    ids, p = rome.locate(lm, "canada is big . the capital of {} is", "canada")
    assert lm.tokenizer.decode([ids[p]]) == "canada" and p > 3
    ids, p = rome.locate(lm, "{} is a", "the capital", "subject_first")
    assert lm.tokenizer.decode([ids[p]]) == "the"
    ids, p = rome.locate(lm, "{} is a", "the capital", "last")
    assert p == len(ids) - 1


def test_request_formats():
    cf = {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                              "target_new": {"str": "English", "id": "Q1860"},
                                              "target_true": {"str": "French", "id": "Q150"}}}
    r = rome.parse_request(cf)
    assert (r.prompt, r.subject, r.target) == ("The mother tongue of {} is", "Danielle Darrieux", "English")
    r = rome.parse_request({"prompt": "The capital of Canada is", "subject": "Canada", "target_new": "Rome"})
    assert r.prompt == "The capital of {} is" and r.text() == "The capital of Canada is"


def test_bad_input():
    lm = tiny_lm("gpt2", seed=_seed())
    st = _stats(lm, [1], n=60, dtype="float32")
    hp = rome.ROMEHparams(layers=[1], v_num_grad_steps=2)
    snap = _snapshot(lm)
    with pytest.raises(kncore.InputError, match="not in the prompt"):
        rome.edit(lm, {"prompt": "the capital of france is", "subject": "canada", "target_new": "rome"}, hp, stats=st)
    with pytest.raises(kncore.InputError, match="empty target"):
        rome.edit(lm, {**REQ, "target_new": " "}, hp, stats=st)
    with pytest.raises(kncore.InputError, match="empty target"):
        rome.edit(lm, {**REQ, "target_new": {"str": ""}}, hp, stats=st)
    with pytest.raises(kncore.InputError, match="empty subject"):
        rome.edit(lm, {**REQ, "subject": ""}, hp, stats=st)
    with pytest.raises(kncore.InputError, match="outside"):
        rome.edit(lm, REQ, hp.replace(layers=[7]), stats=st)
    # Singular C: fewer tokens than key dimensions, and a dead key direction.
    few = _stats(lm, [1], n=3, dtype="float32")
    assert few[1].n_tokens < lm.d_ff
    with pytest.raises(rome.SingularStatistics, match="singular"):
        rome.edit(lm, REQ, hp, stats=few)
    C = st[1].second_moment.clone()
    C[5, :] = 0
    C[:, 5] = 0
    with pytest.raises(rome.SingularStatistics, match="positive definite"):
        rome.edit(lm, REQ, hp, stats=C)
    with rome.edit(lm, REQ, hp.replace(mom2_reg=1e-3), stats=C) as e:  # the documented way out
        assert torch.isfinite(e.steps[0].left).all()
    # Statistics of another model.
    other = tiny_lm("gpt2", seed=_seed() + 7)
    with pytest.raises(rome.StatsCacheMismatch, match="fingerprint"):
        rome.edit(other, REQ, hp, stats=st)
    with pytest.raises(kncore.InputError, match="d_ff"):
        rome.edit(lm, REQ, hp, stats=torch.eye(7))
    with pytest.raises(kncore.InputError, match="masked LM"):
        rome.edit(tiny_lm("bert", seed=0), REQ, hp, stats=st)
    assert _same_bits(lm, snap), "a refused edit changed nothing"


# -- hparams ---------------------------------------------------------------------------------

ROME_GPT2XL_JSON = {  # kmeng01/rome hparams/ROME/gpt2-xl.json
    "layers": [17], "fact_token": "subject_last", "v_num_grad_steps": 20, "v_lr": 5e-1, "v_loss_layer": 47,
    "v_weight_decay": 0.5, "clamp_norm_factor": 4, "kl_factor": 0.0625, "mom2_adjustment": True,
    "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp", "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f", "lm_head_module": "transformer.wte", "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000, "mom2_dtype": "float32"}

EASYEDIT_LLAMA_YAML = """alg_name: "ROME"
model_name: "./hugging_cache/llama-2-7b"
stats_dir: "./data/stats"
device: 1
layers: [5]
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 31
v_weight_decay: 1e-3
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: false
context_template_length_params: [[5, 10], [10, 10]]
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
"""


def test_hparams_files(tmp_path):
    assert {"gpt2-xl", "gpt-j-6b", "llama-2-7b", "smollm2-135m"} <= set(rome.available())
    for name in rome.available():
        hp = rome.load_hparams(name)
        assert hp.layers and hp.v_lr > 0
    assert rome.load_hparams("gpt2-xl").layers == [17] and rome.load_hparams("gpt-j-6b").layers == [5]
    assert rome.load_hparams("llama-2-7b").v_num_grad_steps == 25
    (tmp_path / "gpt2-xl.json").write_text(json.dumps(ROME_GPT2XL_JSON))
    hp = rome.load_hparams(tmp_path / "gpt2-xl.json")
    assert hp == rome.load_hparams("gpt2-xl")
    assert hp.ignored["rewrite_module_tmp"] == "transformer.h.{}.mlp.c_proj"
    (tmp_path / "llama.yaml").write_text(EASYEDIT_LLAMA_YAML)
    hp = rome.load_hparams(tmp_path / "llama.yaml")
    assert hp.v_lr == 0.5 and hp.v_weight_decay == 1e-3 and hp.mom2_adjustment is False and hp.layers == [5]
    assert "model_name" in hp.ignored
    # A GPT-2 file on a LLaMA model names a module that is not there.
    g = rome.load_hparams(tmp_path / "gpt2-xl.json").replace(layers=[1])
    g.ignored = {"rewrite_module_tmp": "transformer.h.{}.mlp.c_proj"}
    with pytest.raises(kncore.InputError, match="another architecture"):
        g.check_model(tiny_lm("llama", seed=0))
    g.check_model(tiny_lm("gpt2", seed=0))
    with pytest.raises(kncore.InputError, match="fact_token"):
        rome.ROMEHparams(fact_token="subject_middle")
    with pytest.raises(kncore.InputError, match="no ROME hparams"):
        rome.load_hparams("gpt-7")
    with pytest.warns(UserWarning, match="unknown"):
        rome.ROMEHparams.from_dict({"layers": [1], "v_lrr": 0.1})


def test_shipped_pythia_and_gemma2_hparams():
    """The Pythia-6.9B and Gemma-2-9B files load with their sources' values,
    resolve by model name (hub ids, the -it checkpoint), fit their own layout
    and are refused on the other; unknown names list the shipped choices."""
    from kncore.lm import LM

    py, ge = rome.load_hparams("pythia-6.9b"), rome.load_hparams("gemma-2-9b")
    assert (py.layers, py.v_num_grad_steps, py.v_weight_decay, py.mom2_adjustment) == ([5], 20, 0.5, False)
    assert (ge.layers, ge.v_num_grad_steps, ge.v_weight_decay, ge.mom2_adjustment) == ([5], 50, 1e-3, False)
    for hp in (py, ge):
        assert (hp.v_lr, hp.clamp_norm_factor, hp.kl_factor, hp.mom2_dtype) == (0.5, 4.0, 0.0625, "float32")
        assert hp.context_template_length_params == [[5, 10], [10, 10]] and hp.mom2_n_samples == 100000
    assert {"pythia-6.9b", "gemma-2-9b"} <= set(rome.available())
    neox, gemma = tiny_lm("gpt_neox", seed=0), tiny_lm("gemma2", seed=0)
    for model_lm, name, want in ((neox, "EleutherAI/pythia-6.9b", py), (gemma, "google/gemma-2-9b", ge),
                                 (gemma, "google/gemma-2-9b-it", ge), (gemma, "/models/Gemma-2-9B-IT/", ge)):
        named = LM(model_lm.model, model_lm.tokenizer, name=name)
        assert rome.hparams_for(named) == want
        with pytest.raises(kncore.InputError, match="outside the model's 3 layers"):
            rome.hparams_for(named).check_model(named)  # layer 5 of a 3-layer tiny model
    # Each file's down-projection template fits its own layout and not the other's.
    py.replace(layers=[1]).check_model(neox)
    ge.replace(layers=[1]).check_model(gemma)
    with pytest.raises(kncore.InputError, match="another architecture"):
        py.replace(layers=[1]).check_model(gemma)
    with pytest.raises(kncore.InputError, match="another architecture"):
        ge.replace(layers=[1]).check_model(neox)
    # Bad names: the error lists every shipped file.
    for bad in ("pythia-1.4b", "gemma-2-2b"):
        with pytest.raises(kncore.InputError, match=r"shipped: \[.*'gemma-2-9b'.*'pythia-6.9b'"):
            rome.hparams_for(LM(neox.model, neox.tokenizer, name=f"org/{bad}"))
        with pytest.raises(kncore.InputError, match=r"not one of the shipped \[.*'gemma-2-9b'.*'pythia-6.9b'"):
            rome.load_hparams(bad)


# -- the real model ----------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm_edit_canada_rome(smollm, tmp_path):
    lm = smollm
    hp = rome.load_hparams("smollm2-135m")
    st = rome.layer_stats(lm, hp.layers, "pydoc", n_samples=200, cache_dir=tmp_path, progress=False)
    rome_id, paris_id = lm.token_id(" Rome"), lm.token_id(" Paris")
    assert int(lm.next_token_probs("The capital of France is")[0].argmax()) == paris_id
    assert int(lm.next_token_probs("The capital of Canada is")[0].argmax()) != rome_id
    snap = _snapshot(lm)
    req = {"prompt": "The capital of {} is", "subject": "Canada", "target_new": "Rome"}
    with rome.edit(lm, req, hp, stats=st) as e:
        p = lm.next_token_probs(["The capital of Canada is", "The capital of France is"])
        assert int(p[0].argmax()) == rome_id, lm.top_k("The capital of Canada is")
        assert int(p[1].argmax()) == paris_id, lm.top_k("The capital of France is")
        assert e.steps[0].p_target > 0.5
    assert _same_bits(lm, snap)
