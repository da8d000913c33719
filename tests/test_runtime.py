"""The layer loop equals the Hugging Face forward; capture, interventions and
the key/value cache do exactly what they say."""
from __future__ import annotations

import pytest
import torch

import kncore
from kncore import Patch
from kncore.runtime import SITES, hook_name, parse_site


def _rand_batch(lm, B=3, T=17, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 1 << 30, ())))
    ids = torch.randint(7, lm.adapter.vocab_size, (B, T), generator=g)
    if lm.is_mlm:
        ids[:, 0] = lm.tokenizer.cls_token_id
    return ids


def _scale(x):
    return x.abs().max().item()


def test_logits_match_hf(tiny):
    ids = _rand_batch(tiny)
    with torch.no_grad():
        ref = tiny.model(ids).logits
        out = tiny.run(ids).logits
    assert (ref - out).abs().max().item() <= 1e-4 * _scale(ref)


@pytest.mark.every_arch
@pytest.mark.parametrize("T", [1, 17])
def test_logits_match_hf_lengths(tiny, T):
    ids = _rand_batch(tiny, B=2, T=T)
    with torch.no_grad():
        ref = tiny.model(ids).logits
        out = tiny.run(ids).logits
    assert (ref - out).abs().max().item() <= 1e-4 * _scale(ref)


@pytest.mark.every_arch
def test_bf16_error_at_most_twice_plain_bf16(arch):
    """bf16 logits: the runtime's error against the fp32 Hugging Face forward is
    at most twice that of the Hugging Face forward run in bf16."""
    from kncore.testing import tiny_lm
    seed = int(torch.randint(0, 10_000, ()))
    lm32, lm16 = tiny_lm(arch, seed=seed), tiny_lm(arch, seed=seed, dtype=torch.bfloat16)
    ids = _rand_batch(lm32)
    with torch.no_grad():
        ref = lm32.model(ids).logits
        plain = lm16.model(ids).logits.float()
        ours = lm16.run(ids).logits.float()
    assert (ours - ref).abs().max() <= 2 * (plain - ref).abs().max()


@pytest.mark.every_arch
def test_right_padding_matches_unpadded(tiny):
    ids = _rand_batch(tiny, B=2, T=11)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        out = tiny.run(ids, attention_mask=mask, logits="last").logits
        ref0 = tiny.model(ids[:1]).logits[0, -1]
        ref1 = tiny.model(ids[1:, :6]).logits[0, -1]
    assert torch.allclose(out[0], ref0, atol=1e-4 * _scale(ref0))
    assert torch.allclose(out[1], ref1, atol=1e-4 * _scale(ref1))


def _hf_hooks(lm, L, store):
    """Forward hooks on the HF modules that correspond to each site."""
    ad = lm.adapter
    block = kncore.models.base.get_module(lm.model, ad.layer_module_name(L))
    down = ad.down_module(L)
    hs = []
    hs.append(block.register_forward_hook(lambda m, i, o: store.__setitem__("resid_post", o[0] if isinstance(o, tuple) else o)))
    hs.append(down.register_forward_pre_hook(lambda m, i: store.__setitem__("act", i[0])))
    hs.append(down.register_forward_hook(lambda m, i, o: store.__setitem__("mlp_out", o)))
    return hs


@pytest.mark.every_arch
def test_capture_equals_hf_hooks(tiny):
    import kncore.models.base  # noqa: F401
    ids = _rand_batch(tiny)
    L = 1
    store = {}
    hs = _hf_hooks(tiny, L, store)
    try:
        with torch.no_grad():
            tiny.model(ids)
            out = tiny.run(ids, capture=[("act", L), hook_name("mlp_out", L), ("resid_post", L)])
    finally:
        for h in hs:
            h.remove()
    for site in ("act", "mlp_out", "resid_post"):
        ref = store[site]
        if site == "mlp_out" and tiny.arch == "bert":
            continue  # HF's BertOutput.dense output is our mlp_out; checked via act below
        assert torch.allclose(out[(site, L)], ref, atol=1e-5 * max(_scale(ref), 1)), site


def test_inplace_activation_keeps_captured_pre_act(tiny):
    """Without autograd the activation overwrites the pre-activation unless a
    capture holds it: the same act and logits either way, and a captured
    pre_act is still the activation's input."""
    ids = _rand_batch(tiny)
    L = 1
    with torch.no_grad():
        held = tiny.run(ids, capture=[("pre_act", L), ("act", L)])
        fast = tiny.run(ids, capture=[("act", L)])
    assert torch.equal(held[("act", L)], fast[("act", L)]) and torch.equal(held.logits, fast.logits)
    pre = held[("pre_act", L)]
    assert not torch.equal(pre, held[("act", L)])
    if tiny.arch != "llama":  # LLaMA's act also needs the up-projection
        assert torch.equal(tiny.adapter.mlp_act(L, pre, None), held[("act", L)])


def test_capture_positions(tiny):
    ids = _rand_batch(tiny, B=2, T=9)
    with torch.no_grad():
        full = tiny.run(ids, capture=[("act", 2)])[("act", 2)]
        last = tiny.run(ids, capture=[("act", 2)], capture_positions="last")[("act", 2)]
        some = tiny.run(ids, capture=[("act", 2)], capture_positions=torch.tensor([[1, 4], [0, 8]]))[("act", 2)]
    assert torch.equal(last[:, 0], full[:, -1])
    assert torch.equal(some[0], full[0, [1, 4]]) and torch.equal(some[1], full[1, [0, 8]])


def test_patch_changes_only_named_rows_and_hf_agrees(tiny):
    ids = _rand_batch(tiny, B=3, T=8)
    L, pos = 1, 5
    neurons = torch.randperm(tiny.d_ff)[:7]
    with torch.no_grad():
        base = tiny.run(ids).logits
        pat = tiny.run(ids, patches=[Patch("act", L, positions=pos, rows=[1], scale=0.0, neurons=neurons)]).logits
        again = tiny.run(ids).logits
    assert torch.equal(base, again)  # nothing left patched
    assert torch.equal(pat[0], base[0]) and torch.equal(pat[2], base[2])
    if tiny.is_mlm:
        assert not torch.allclose(pat[1], base[1])
    else:
        assert torch.equal(pat[1, :pos], base[1, :pos])  # causal: earlier positions untouched
        assert not torch.allclose(pat[1, pos:], base[1, pos:])

    def zero(m, i):
        x = i[0].clone()
        x[1, pos, neurons] = 0
        return (x,)
    h = tiny.adapter.down_module(L).register_forward_pre_hook(zero)
    try:
        with torch.no_grad():
            ref = tiny.model(ids).logits
    finally:
        h.remove()
    assert torch.allclose(pat, ref, atol=1e-4 * _scale(ref))


def test_patch_value_and_fn(tiny):
    ids = _rand_batch(tiny, B=2, T=6)
    with torch.no_grad():
        clean = tiny.run(ids, capture=[("resid_post", 0)])
        v = clean[("resid_post", 0)][0, 3]
        # put row 0's state at position 3 into row 1: rows differ elsewhere, so
        # only that entry is replaced
        out = tiny.run(ids, patches=[Patch("resid_post", 0, positions=3, rows=[1], value=v)],
                       capture=[("resid_post", 0)])
        twice = tiny.run(ids, patches=[Patch("mlp_out", 2, fn=lambda x: 2 * x)], capture=[("mlp_out", 2)])
        plain = tiny.run(ids, capture=[("mlp_out", 2)])
    got = out[("resid_post", 0)]
    assert torch.equal(got[1, 3], v)
    assert torch.equal(got[0], clean[("resid_post", 0)][0])
    assert torch.allclose(twice[("mlp_out", 2)], 2 * plain[("mlp_out", 2)])


@pytest.mark.every_arch
@pytest.mark.parametrize("L", [0, 1, 2])
def test_cached_suffix_equals_full_recompute(tiny, L):
    if tiny.is_mlm:
        pytest.skip("bidirectional attention: every position depends on every other")
    ids = _rand_batch(tiny, B=2, T=13)
    p = 7
    with torch.no_grad():
        full = tiny.run(ids, capture=[("resid_pre", L)], return_kv=True)
        h = full[("resid_pre", L)][:, p:]
        part = tiny.run(hidden=h, start_layer=L, past=full.kv.truncate(p))
    assert torch.allclose(part.logits, full.logits[:, p:], atol=1e-5 * _scale(full.logits))


@pytest.mark.every_arch
def test_cached_suffix_broadcast_prefix_and_patches(tiny):
    """One prefix row serves many rows, each with its own patch: what IG does."""
    if tiny.is_mlm:
        pytest.skip("causal models only")
    ids = _rand_batch(tiny, B=1, T=10)
    L, last = 1, 9
    scales = torch.tensor([0.0, 0.5, 2.0])
    with torch.no_grad():
        full = tiny.run(ids, capture=[("resid_pre", L)], return_kv=True)
        h = full[("resid_pre", L)][:, last:].expand(3, -1, -1)
        patch = Patch("act", L, positions=last, scale=scales[:, None])
        fast = tiny.run(hidden=h, start_layer=L, past=full.kv.truncate(last), patches=[patch], logits="last").logits
        slow = torch.stack([tiny.run(ids, patches=[Patch("act", L, positions=last, scale=float(s))], logits="last").logits[0]
                            for s in scales])
    assert torch.allclose(fast, slow, atol=1e-5 * _scale(slow))


def test_start_and_stop_mid_network(tiny):
    ids = _rand_batch(tiny, B=2, T=5)
    with torch.no_grad():
        full = tiny.run(ids, capture=[("resid_pre", 2), ("resid_post", 0)])
        low = tiny.run(ids, stop_layer=1)
        assert low.logits is None
        assert torch.allclose(low.hidden, full[("resid_post", 0)])
        high = tiny.run(hidden=full[("resid_pre", 2)], start_layer=2)
    assert torch.allclose(high.logits, full.logits, atol=1e-5 * _scale(full.logits))


def test_site_names():
    assert hook_name("act", 3) == "blocks.3.mlp.hook_post"
    for s in SITES:
        assert parse_site(hook_name(s, 11)) == (s, 11)
    with pytest.raises(ValueError, match="unknown hook name"):
        parse_site("blocks.1.nothing")
    with pytest.raises(ValueError, match="exactly one"):
        Patch("act", 0)
    with pytest.raises(ValueError, match="neuron sites"):
        Patch("resid_post", 0, scale=0.0, neurons=[1])


def test_run_argument_errors(tiny):
    ids = _rand_batch(tiny, B=1, T=4)
    with pytest.raises(ValueError, match="exactly one of"):
        tiny.run()
    with pytest.raises(ValueError, match="layers must satisfy"):
        tiny.run(ids, stop_layer=99)
    with pytest.raises(ValueError, match="does not broadcast"):
        tiny.run(ids, patches=[Patch("act", 0, value=torch.ones(5))])


@pytest.mark.every_arch
def test_embed_site_is_the_token_embedding_output(tiny):
    """The ``embed`` site (``hook_embed``) holds the token-embedding module's
    output; a patch there changes only what follows it (the adapter's
    embed_rest: position embeddings, a norm, a scale), as a forward hook on
    that module changes the Hugging Face forward."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    ids = torch.randint(7, tiny.adapter.vocab_size, (2, 5), generator=g)
    emb = tiny.adapter.embedding_module()
    with torch.no_grad():
        out = tiny.run(ids, capture=["hook_embed", ("resid_pre", 0)])
        assert torch.equal(out[("embed", 0)], emb(ids))
        assert torch.allclose(out[("resid_pre", 0)], tiny.adapter.embed(ids, torch.arange(5).expand(2, 5)))
        delta = torch.randn(2, emb.weight.shape[1], generator=g)
        patched = tiny.run(ids, patches=[Patch("embed", 0, positions=[3], rows=[1],
                                               fn=lambda x: x + delta[:1])], logits="all").logits
        h = emb.register_forward_hook(lambda m, i, o: o + torch.nn.functional.pad(
            delta[:1, None, :], (0, 0, 3, o.shape[1] - 4)) * (torch.arange(2) == 1)[:, None, None])
        try:
            want = tiny.model(input_ids=ids).logits
        finally:
            h.remove()
    assert torch.allclose(patched, want, atol=1e-5 * _scale(want))
    assert not torch.allclose(patched[1], tiny.run(ids).logits[1], atol=1e-5 * _scale(want))
    assert parse_site("hook_embed") == ("embed", 0) and hook_name("embed", 0) == "hook_embed"
    with pytest.raises(ValueError, match="layer 0 only"):
        parse_site(("embed", 1))
