"""patch_neurons acts the same in the kncore runtime and the plain Hugging Face
forward, equals an independent weight-edit reference, patches where it says,
and leaves the model exactly as it was."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

import kncore
from kncore import InputError
from kncore.selection import KNSet

WORDS = ("the capital of canada is ottawa france paris city country language speaks "
         "works physics music born in red blue one two three").split()


def _gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))


def _neurons(lm, g, k=7):
    """k random distinct neurons spread over the layers."""
    idx = torch.randperm(lm.n_layers * lm.d_ff, generator=g)[:k]
    return [(int(i) // lm.d_ff, int(i) % lm.d_ff) for i in idx]


def _prompt(lm, g, n):
    words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)]
    if lm.is_mlm:
        words[int(torch.randint(0, n, (), generator=g))] = "[MASK]"
    return " ".join(words)


def _ids(lm, prompt):
    return torch.tensor([lm.tokenize(prompt)])


def _scale(x):
    return x.abs().max().item()


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.every_arch
@pytest.mark.parametrize("site", ["act", "pre_act"])
@pytest.mark.parametrize("mode", ["suppress", "scale"])
def test_runtime_equals_hf_forward(tiny, site, mode):
    g = _gen()
    ids = _ids(tiny, _prompt(tiny, g, 9))
    kns = _neurons(tiny, g)
    with torch.no_grad():
        base = tiny.model(ids).logits
        for pos in ("target", "all", [2, 5]):
            # scaling by -1.5 would show a double application (suppressing would not)
            with kncore.patch_neurons(tiny, kns, mode=mode, factor=-1.5, positions=pos, site=site):
                a = tiny.run(ids).logits
                b = tiny.model(ids).logits
            assert (a - b).abs().max().item() <= 1e-4 * _scale(b), pos
            assert (a - base).abs().max().item() > 1e-3 * _scale(base), pos  # it did something


def test_all_positions_equal_weight_edit(tiny):
    """Scaling neuron j at every position == scaling row j of W_down."""
    g = _gen()
    ids = _ids(tiny, _prompt(tiny, g, 8))
    kns = _neurons(tiny, g)
    ref = copy.deepcopy(tiny.model)
    ad = kncore.models.adapter_for(ref)
    w0 = {L: ad.down_weight(L).clone() for L, _ in kns}
    for mode, factor in [("suppress", 0.0), ("enhance", 2.0), ("scale", 0.37)]:
        with torch.no_grad():
            for L, i in kns:
                ad.down_weight(L)[i] = w0[L][i] * factor
            want = ref(ids).logits
            with kncore.patch_neurons(tiny, kns, mode=mode, factor=factor, positions="all"):
                got_rt = tiny.run(ids).logits
                got_hf = tiny.model(ids).logits
        for got in (got_rt, got_hf):
            assert (got - want).abs().max().item() <= 1e-4 * _scale(want), mode


def test_pre_act_equals_weight_edit(tiny):
    g = _gen()
    ids = _ids(tiny, _prompt(tiny, g, 8))
    kns = _neurons(tiny, g)
    ref = copy.deepcopy(tiny.model)
    ad = kncore.models.adapter_for(ref)
    f = 1.7
    with torch.no_grad():
        for L, i in kns:
            mod = ad.mlp_modules(L).up  # the module whose output is the pre_act site
            w = mod.weight
            if w.shape[0] == tiny.d_ff and not (tiny.arch == "gpt2"):
                w[i] *= f  # Linear [d_ff, d_model]
            else:
                w[:, i] *= f  # GPT-2 Conv1D [d_model, d_ff]
            if getattr(mod, "bias", None) is not None:
                mod.bias[i] *= f
        want = ref(ids).logits
        with kncore.patch_neurons(tiny, kns, mode="scale", factor=f, positions="all", site="pre_act"):
            got = tiny.run(ids).logits
    assert (got - want).abs().max().item() <= 1e-4 * _scale(want)


def test_target_is_last_token_or_mask(tiny):
    """Only the target position of the patched layer changes there (runtime and
    HF forward); for decoders nothing before the target changes at all."""
    g = _gen()
    ids = _ids(tiny, _prompt(tiny, g, 10))
    tpos = tiny.target_position(ids[0].tolist())
    L = int(torch.randint(0, tiny.n_layers, (), generator=g))
    idx = torch.randperm(tiny.d_ff, generator=g)[:5].tolist()
    caps = {}
    with torch.no_grad():
        clean = tiny.run(ids, capture=[("act", L)])[("act", L)][0]
        base = tiny.model(ids).logits[0]
        with kncore.patch_neurons(tiny, [(L, i) for i in idx], mode="enhance"):
            got = tiny.run(ids, capture=[("act", L)])[("act", L)][0]
            h = tiny.adapter.down_module(L).register_forward_pre_hook(lambda m, a: caps.__setitem__("x", a[0][0]))
            try:
                pat = tiny.model(ids).logits[0]
            finally:
                h.remove()
    want = clean.clone()
    want[tpos, idx] *= 2
    assert torch.equal(got, want)
    assert (caps["x"] - want).abs().max().item() <= 1e-5 * _scale(want)
    if tiny.adapter.causal:
        assert torch.equal(base[:tpos], pat[:tpos])
    assert (base[tpos] - pat[tpos]).abs().max() > 0


def test_padded_batch_patches_each_rows_target(tiny):
    g = _gen()
    prompts = [_prompt(tiny, g, n) for n in (4, 9, 6, 9)]
    kns = _neurons(tiny, g)
    with kncore.patch_neurons(tiny, kns, mode="enhance"):
        batch = tiny.next_token_probs(prompts)
        with torch.no_grad():
            each = []
            for p in prompts:
                ids = _ids(tiny, p)
                pos = tiny.target_position(ids[0].tolist())
                each.append(tiny.model(ids).logits[0, pos].float().softmax(-1))
    unpatched = tiny.next_token_probs(prompts)
    want = torch.stack(each)
    assert (batch - want).abs().max().item() <= 1e-5
    assert (batch - unpatched).abs().max().item() > 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_kv_cache_paths(arch):
    """Decoders: a suffix run from a KV cache (runtime) and an incremental HF
    forward with past_key_values patch the new last token, as a full run does."""
    lm = kncore.testing.tiny_lm(arch, seed=int(torch.randint(0, 1000, ())))
    g = _gen()
    ids = _ids(lm, _prompt(lm, g, 9))
    kns = _neurons(lm, g)
    with torch.no_grad():
        prefix_kv = lm.run(ids[:, :-1], return_kv=True, logits=None).kv  # unpatched prefix
        prefix_hf = _hf_cache(lm.model(ids[:, :-1], use_cache=True))
        with kncore.patch_neurons(lm, kns, mode="scale", factor=3.0):
            full = lm.run(ids).logits[0, -1]
            suf = lm.run(ids[:, -1:], past=prefix_kv, logits="last").logits[0]
            hf = lm.model(ids[:, -1:], **{_hf_cache_kw(lm.model): prefix_hf}).logits[0, -1]
        base = lm.run(ids).logits[0, -1]
    assert (suf - full).abs().max().item() <= 1e-4 * _scale(full)
    assert (hf - full).abs().max().item() <= 1e-4 * _scale(full)
    assert (full - base).abs().max().item() > 1e-3 * _scale(base)


def _hf_cache_kw(model) -> str:
    # transformers >= 5.2x renamed past_key_values to cache
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _hf_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_absolute_positions_in_an_incremental_hf_forward(arch):
    """A patch at an absolute position hits the right token when Hugging Face
    runs the suffix from its cache (the position is counted past the cache)."""
    lm = kncore.testing.tiny_lm(arch, seed=int(torch.randint(0, 1000, ())))
    g = _gen()
    ids = _ids(lm, _prompt(lm, g, 9))
    T = ids.shape[1]
    kns = _neurons(lm, g)
    with torch.no_grad():
        prefix_hf = _hf_cache(lm.model(ids[:, :-2], use_cache=True))
        with kncore.patch_neurons(lm, kns, mode="scale", factor=3.0, positions=[T - 2]):
            full = lm.model(ids).logits[0, -2:]
            hf = lm.model(ids[:, -2:], **{_hf_cache_kw(lm.model): prefix_hf}).logits[0]
        base = lm.model(ids).logits[0, -2:]
    assert (hf - full).abs().max().item() <= 1e-4 * _scale(full)
    assert (full[0] - base[0]).abs().max().item() > 1e-3 * _scale(base)


def test_as_patches_share_a_forward(tiny):
    """as_patches: patched and unpatched rows in one runtime call."""
    g = _gen()
    ids = _ids(tiny, _prompt(tiny, g, 7))
    pos = tiny.target_position(ids[0].tolist())
    kns = _neurons(tiny, g)
    p = kncore.patch_neurons(tiny, kns, mode="scale", factor=-3.0, site="pre_act")
    with torch.no_grad():
        both = tiny.run(ids.repeat(2, 1), patches=p.as_patches(rows=[1], positions=[pos])).logits
        clean = tiny.run(ids).logits
        with p:
            patched = tiny.run(ids).logits
    assert (both[0] - clean[0]).abs().max().item() <= 1e-5 * _scale(clean)
    assert (both[1] - patched[0]).abs().max().item() <= 1e-5 * _scale(patched)
    assert (patched - clean).abs().max().item() > 1e-3 * _scale(clean)
    with pytest.raises(InputError, match="absolute"):
        p.as_patches()


def test_nested_patches_compose(tiny):
    g = _gen()
    ids = _ids(tiny, _prompt(tiny, g, 7))
    kns = _neurons(tiny, g)
    with torch.no_grad():
        with kncore.patch_neurons(tiny, kns, mode="scale", factor=6.0):
            want = tiny.run(ids).logits
        with kncore.patch_neurons(tiny, kns, mode="scale", factor=2.0), \
                kncore.patch_neurons(tiny, kns, mode="scale", factor=3.0):
            rt = tiny.run(ids).logits
            hf = tiny.model(ids).logits
    assert (rt - want).abs().max().item() <= 1e-4 * _scale(want)
    assert (hf - want).abs().max().item() <= 1e-4 * _scale(want)


def test_exact_restore_after_exit_and_exception(tiny):
    g = _gen()
    ids = _ids(tiny, _prompt(tiny, g, 8))
    kns = _neurons(tiny, g)
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with torch.no_grad():
        base_rt, base_hf = tiny.run(ids).logits, tiny.model(ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with kncore.patch_neurons(tiny, kns, mode="enhance"):
            with torch.no_grad():
                tiny.model(ids)
            raise RuntimeError("boom")
    with kncore.patch_neurons(tiny, kns, mode="suppress", positions="all", site="pre_act") as p:
        assert p.active
        with torch.no_grad():
            tiny.run(ids)
    assert not p.active
    # an exception inside the HF forward itself (bad input) must not leave state
    # behind: afterwards the runtime (which calls the pre-activation module)
    # still applies the patch once, as the HF forward does
    with kncore.patch_neurons(tiny, kns, mode="scale", factor=-2.0, site="pre_act"), torch.no_grad():
        with pytest.raises(Exception):
            tiny.model(torch.full((1, 3), 10 ** 6))
        rt, hf = tiny.run(ids).logits, tiny.model(ids).logits
        assert (rt - hf).abs().max().item() <= 1e-4 * _scale(hf)
    with torch.no_grad():
        after_rt, after_hf = tiny.run(ids).logits, tiny.model(ids).logits
    assert torch.equal(after_rt, base_rt) and torch.equal(after_hf, base_hf)
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert _no_hooks(tiny.model) and tiny.adapter.persistent_patches == []


def test_apply_remove_and_gradients(tiny):
    """Autograd through a patched runtime forward: a neuron suppressed at every
    position passes no gradient back to its pre-activation; the others do."""
    g = _gen()
    ids = _ids(tiny, _prompt(tiny, g, 6))
    kns = _neurons(tiny, g, k=3)
    p = kncore.patch_neurons(tiny, kns, mode="suppress", positions="all").apply()
    with pytest.raises(RuntimeError, match="already"):
        p.apply()
    L = kns[0][0]
    idx = KNSet.of(kns).by_layer()[L]
    emb = tiny.adapter.embed(ids, torch.arange(ids.shape[1])[None]).detach().requires_grad_(True)
    out = tiny.run(hidden=emb, capture=[("pre_act", L)], capture_grad=True, logits="last")
    pre = out[("pre_act", L)]
    (gp,) = torch.autograd.grad(out.logits.float().log_softmax(-1)[0, 7], pre)
    assert torch.equal(gp[..., idx], torch.zeros_like(gp[..., idx]))
    others = torch.ones(tiny.d_ff, dtype=torch.bool)
    others[idx] = False
    assert gp[..., others].abs().max() > 0
    p.remove()
    p.remove()  # twice is fine
    assert _no_hooks(tiny.model) and tiny.adapter.persistent_patches == []


def test_bad_input(tiny):
    with pytest.raises(InputError, match="layer"):
        kncore.patch_neurons(tiny, [(tiny.n_layers, 0)])
    with pytest.raises(InputError, match="index"):
        kncore.patch_neurons(tiny, [(0, tiny.d_ff)])
    with pytest.raises(InputError, match="mode"):
        kncore.patch_neurons(tiny, [(0, 1)], mode="erase")
    with pytest.raises(InputError, match="positions"):
        kncore.patch_neurons(tiny, [(0, 1)], positions="first")
    with pytest.raises(InputError, match="positions"):
        kncore.patch_neurons(tiny, [(0, 1)], positions=[-1])
    with pytest.raises(InputError, match="site"):
        kncore.patch_neurons(tiny, [(0, 1)], site="mlp_out")
    with pytest.raises(InputError, match="finite"):
        kncore.patch_neurons(tiny, [(0, 1)], mode="scale", factor=float("inf"))
    with pytest.raises(InputError, match="pair"):
        kncore.patch_neurons(tiny, [(0, 1, 2)])


def test_mlm_target_needs_mask():
    lm = kncore.testing.tiny_lm("bert", seed=int(torch.randint(0, 1000, ())))
    ids = torch.tensor([lm.tokenizer("the capital of canada is ottawa")["input_ids"]])
    with kncore.patch_neurons(lm, [(1, 3)]), torch.no_grad():
        with pytest.raises(InputError, match=r"\[MASK\]"):
            lm.run(ids)
        with pytest.raises(InputError, match=r"\[MASK\]"):
            lm.model(ids)
        h = torch.randn(1, ids.shape[1], lm.d_model)
        with pytest.raises(InputError, match="hidden states"):
            lm.run(hidden=h, start_layer=1)
    with kncore.patch_neurons(lm, [(1, 3)], positions="all"), torch.no_grad():
        lm.run(ids)  # fine: no [MASK] needed
    assert _no_hooks(lm.model) and lm.adapter.persistent_patches == []


@pytest.mark.slow
def test_smollm_suppress_runtime_equals_hf(smollm):
    prompt = "The capital of Canada is"
    ids = torch.tensor([smollm.tokenize(prompt)])
    g = _gen()
    kns = _neurons(smollm, g, k=20)
    ott = smollm.single_token(prompt, " Ottawa")
    with torch.no_grad():
        base = smollm.next_token_probs(prompt)[0, ott]
        with kncore.patch_neurons(smollm, kns, mode="enhance", site="act"):
            rt = smollm.next_token_probs(prompt)[0]
            hf = smollm.model(ids).logits[0, -1].float().softmax(-1)
    assert (rt - hf).abs().max().item() <= 1e-4
    assert abs(rt[ott].item() - base.item()) > 0
