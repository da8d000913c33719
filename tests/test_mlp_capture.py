"""The fused MLP capture kernel (kernels/mlp_capture.py) equals its reference,
meets the low-precision bar, differentiates like PyTorch, and the runtime gives
the same numbers with it as without it.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors (set here
before triton's first import, or by `make test`); with CUDA it also runs on the
GPU, compiled unless TRITON_INTERPRET=1 was set.
"""
import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


from kncore.ops._kernels import kernel_module  # noqa: E402

K = kernel_module("mlp_capture")
from kncore import Patch  # noqa: E402
from kncore.ops import dispatch  # noqa: E402
from kncore.ops import mlp_capture as op  # noqa: E402
from kncore.testing import ARCHS, tiny_lm  # noqa: E402

DEVICES = (["cpu"] if K.INTERPRETED else []) + (["cuda"] if torch.cuda.is_available() else [])
needs_kernel = pytest.mark.skipif(
    not DEVICES, reason="no device can run the kernel: no CUDA, and triton missing or imported "
                        "before TRITON_INTERPRET=1 was set")
D, F = 40, 123


def _gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))


def _case(M, gated, device, *, dtype=torch.float32, transposed=True, g=None):
    """Fresh random inputs; transposed: W as a Linear's weight.t() (strided) view."""
    g = g or _gen()
    r = lambda *s: torch.randn(*s, generator=g)
    w = (r(F, D).t() if transposed else r(D, F)) / D ** 0.5 * 2
    kw = dict(b=r(F) * 0.3)
    if gated:
        kw.update(w_up=r(F, D).t() / D ** 0.5 * 2, b_up=r(F) * 0.3)
    x = r(M, D)
    kw.update(neuron_scale=r(F),
              neuron_rows=torch.rand(M, generator=g) > 0.4)
    # Round the inputs to the low dtype first: the fp64 reference sees the same numbers.
    cast = lambda t: t.to(dtype).to(device) if t.is_floating_point() else t.to(device)
    return cast(x), cast(w), {k: cast(v) for k, v in kw.items()}


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", K.ACTIVATIONS)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("M", [1, 5, 17])
def test_matches_reference_fp32(device, act, gated, M):
    x, w, kw = _case(M, gated, device, transposed=(M != 5))
    out = K.mlp_capture(x, w, act=act, return_pre=True, **kw)
    ref = K.mlp_capture_ref(x, w, act=act, return_pre=True, **kw)
    scale = ref.act.abs().max().item()
    assert scale > 1e-3  # never compare zeros
    for got, want in zip(out, ref):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert _err(got, want) <= 2e-6 * max(scale, want.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_plain_call_has_no_extras(device):
    x, w, kw = _case(9, False, device)
    out = K.mlp_capture(x, w, kw["b"], act="gelu")
    assert out.pre is None and out._fields == ("act", "pre")
    ref = K.mlp_capture_ref(x, w, kw["b"], act="gelu")
    assert _err(out.act, ref.act) <= 2e-6 * ref.act.abs().max().item()


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act,gated", [("gelu_tanh", False), ("gelu", False), ("silu", True), ("relu", False)])
def test_low_precision_bar(device, dtype, act, gated):
    """The rule for a low-precision fast path: its error against fp64 is at most 2x a plain PyTorch run's
    in the same dtype.

    bf16 also runs under the interpreter: its tl.dot mishandles bf16 and it
    truncates fp32 -> bf16, so there the kernel upcasts before the dot (bf16
    products are exact in fp32) and rounds to nearest even by hand, as the GPU does.
    """
    x, w, kw = _case(17, gated, device, dtype=dtype)
    ref = K.mlp_capture_ref(x.double(), w.double(), act=act, return_pre=True,
                            **{k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()})
    plain = K.mlp_capture_ref(x, w, act=act, return_pre=True, **kw)
    fast = K.mlp_capture(x, w, act=act, return_pre=True, **kw)
    for name, f, p, r in zip(ref._fields, fast, plain, ref):
        assert f.dtype == dtype
        assert _err(p, r) > 0, "the plain low-precision run should not be exact"
        assert _err(f, r) <= 2 * _err(p, r), f"{name}: kernel {_err(f, r):.3g} vs plain {_err(p, r):.3g}"


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act,gated", [("gelu_tanh", False), ("gelu", False), ("silu", True), ("relu", True)])
def test_backward_matches_reference(device, act, gated):
    x, w, kw = _case(17, gated, device)
    grads = []
    for fn in (K.mlp_capture, K.mlp_capture_ref):
        xg = x.clone().requires_grad_(True)
        out = fn(xg, w, act=act, return_pre=True, **kw)
        g = torch.Generator().manual_seed(7)
        loss = sum((t * torch.randn(t.shape, generator=g).to(device)).sum() for t in out)
        loss.backward()
        grads.append(xg.grad)
    assert grads[1].abs().max() > 0.1
    assert _err(grads[0], grads[1]) <= 5e-6 * grads[1].abs().max().item()


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_autograd_function_path(device):
    """The torch.autograd.Function used where torch.library.triton_op is missing (torch < 2.6)."""
    x, w, kw = _case(5, True, device)
    fn = K.autograd_function()
    xg = x.clone().requires_grad_(True)
    act, pre, up = fn(xg, w, kw["b"], kw["w_up"], kw["b_up"], kw["neuron_scale"], None, "silu", True, True)
    ref = K.mlp_capture_ref(x, w, kw["b"], act="silu", w_up=kw["w_up"], b_up=kw["b_up"],
                            neuron_scale=kw["neuron_scale"], return_pre=True)
    assert _err(act, ref.act) <= 2e-6 * ref.act.abs().max().item()
    assert _err(pre, ref.pre) <= 2e-6 * ref.pre.abs().max().item()
    act.sum().backward()
    xr = x.clone().requires_grad_(True)
    K.mlp_capture_ref(xr, w, kw["b"], act="silu", w_up=kw["w_up"], b_up=kw["b_up"],
                      neuron_scale=kw["neuron_scale"]).act.sum().backward()
    assert _err(xg.grad, xr.grad) <= 5e-6 * xr.grad.abs().max().item()


@needs_kernel
def test_bad_arguments_raise():
    x, w, kw = _case(4, False, DEVICES[0])
    with pytest.raises(ValueError, match="neuron_scale"):
        K.mlp_capture(x, w, act="gelu", neuron_scale=kw["neuron_scale"][:3])
    with pytest.raises(ValueError, match=r"x \[M, d\]"):
        K.mlp_capture(x[:, :7], w, act="gelu")
    with pytest.raises(ValueError, match="neuron_rows has shape"):
        K.mlp_capture(x, w, act="gelu", neuron_scale=kw["neuron_scale"], neuron_rows=kw["neuron_rows"][:3])
    with pytest.raises(ValueError, match="activation"):
        K.mlp_capture(x, w, act="tanh")
    with pytest.raises(ValueError, match="requires grad"):
        K.mlp_capture(x, w.detach().requires_grad_(True), act="gelu")


# --------------------------------------------------------------------------- dispatch

def test_cpu_dispatch_uses_reference(monkeypatch):
    monkeypatch.delenv("KNCORE_KERNELS", raising=False)
    x, w, kw = _case(6, True, "cpu")
    assert any("device cpu" in r for r in op.not_supported_reasons(x, w, act="silu", **kw))
    out = op.mlp_capture(x, w, act="silu", return_pre=True, **kw)
    ref = K.mlp_capture_ref(x, w, act="silu", return_pre=True, **kw)
    assert torch.equal(out.act, ref.act) and torch.equal(out.pre, ref.pre)


def test_not_supported_reasons_name_the_problem(monkeypatch):
    x, w, kw = _case(3, False, "cpu")
    monkeypatch.setenv("KNCORE_KERNELS", "off")
    assert any("KNCORE_KERNELS=off" in r for r in op.not_supported_reasons(x, w, act="gelu"))
    monkeypatch.setenv("KNCORE_KERNELS", "force")
    assert any("float64" in r for r in op.not_supported_reasons(x.double(), w.double(), act="gelu"))
    assert any("has dtype" in r for r in op.not_supported_reasons(x, w.half(), act="gelu"))
    assert any("'tanh'" in r for r in op.not_supported_reasons(x, w, act="tanh"))
    assert any("requires grad" in r for r in op.not_supported_reasons(x, w.requires_grad_(True), act="gelu"))
    monkeypatch.setenv("KNCORE_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="KNCORE_KERNELS"):
        op.not_supported_reasons(x, w, act="gelu")


def test_fallback_is_logged(monkeypatch, caplog):
    monkeypatch.setenv("KNCORE_KERNELS", "force")  # a fallback is then as loud as on a GPU
    dispatch.forget_fallbacks()
    x, w, kw = _case(3, False, "cpu")
    with caplog.at_level(logging.WARNING, logger="kncore.ops"):
        out = op.mlp_capture(x.double(), w.double(), act="gelu")
    assert any("float64" in rec.getMessage() and rec.levelno == logging.WARNING for rec in caplog.records)
    assert torch.equal(out.act, K.mlp_capture_ref(x.double(), w.double(), act="gelu").act)


def test_activation_names():
    import transformers.activations as A

    assert op.activation_name(A.NewGELUActivation()) == "gelu_tanh"
    assert op.activation_name(A.GELUActivation()) == "gelu"
    assert op.activation_name(A.ACT2FN["silu"]) == "silu"
    assert op.activation_name(torch.nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert op.activation_name(torch.nn.functional.relu) == "relu"
    assert op.activation_name(A.QuickGELUActivation()) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_params_reproduce_the_adapter(arch):
    lm = tiny_lm(arch, seed=int(torch.randint(0, 10_000, ())))
    ad = lm.adapter
    p, why = op.mlp_params(ad, 1)
    assert why is None
    assert p["act"] == {"gpt2": "gelu_tanh", "gptj": "gelu_tanh", "bert": "gelu", "llama": "silu",
                        "gpt_neox": "gelu", "gpt_neox_seq": "gelu", "qwen2": "silu", "qwen3": "silu",
                        "gemma2": "gelu_tanh", "gemma3": "gelu_tanh"}[arch]
    gated = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
    assert (p["w_up"] is not None) == (arch in gated)
    x = torch.randn(7, ad.d_model)
    pre, aux = ad.mlp_pre(1, x)
    act = ad.mlp_act(1, pre, aux)
    ref = K.mlp_capture_ref(x, **p, return_pre=True)
    assert _err(ref.pre, pre) <= 1e-5 * pre.abs().max().item()
    assert _err(ref.act, act) <= 1e-5 * act.abs().max().item()


# --------------------------------------------------------------------------- runtime

def _ids(lm, B=2, T=9):
    ids = torch.randint(7, lm.adapter.vocab_size, (B, T), generator=_gen())
    if lm.is_mlm:
        ids[:, 0] = lm.tokenizer.cls_token_id
    return ids


@pytest.mark.every_arch
@pytest.mark.skipif("cpu" not in DEVICES, reason="needs the Triton interpreter on CPU")
def test_runtime_fused_equals_plain(tiny, monkeypatch):
    ids = _ids(tiny)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 6:] = False
    caps = [("act", 0), ("pre_act", 2), ("mlp_out", 1)]
    patch = Patch("act", 1, positions=[3, 8], neurons=[0, 5, 122], scale=0.0)
    outs = []
    for mode in ("auto", "force"):
        monkeypatch.setenv("KNCORE_KERNELS", mode)
        with torch.no_grad():
            outs.append(tiny.run(ids, attention_mask=mask, capture=caps, patches=[patch]))
    plain, fused = outs
    scale = plain.logits.abs().max().item()
    assert _err(fused.logits, plain.logits) <= 1e-5 * scale
    for c in caps:
        assert _err(fused[c], plain[c]) <= 1e-5 * plain[c].abs().max().item()
    assert fused[("act", 0)].shape == plain[("act", 0)].shape


@pytest.mark.skipif("cpu" not in DEVICES, reason="needs the Triton interpreter on CPU")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_runtime_fused_gradients(arch, monkeypatch):
    lm = tiny_lm(arch, seed=int(torch.randint(0, 10_000, ())))
    ids = _ids(lm)
    with torch.no_grad():
        h = lm.run(ids, stop_layer=1, logits=None).hidden
    grads = []
    for mode in ("auto", "force"):
        monkeypatch.setenv("KNCORE_KERNELS", mode)
        hg = h.clone().requires_grad_(True)
        out = lm.run(hidden=hg, start_layer=1, logits="last")
        out.logits.log_softmax(-1)[:, 11].sum().backward()
        grads.append(hg.grad)
    assert grads[0].abs().max() > 0
    assert _err(grads[1], grads[0]) <= 1e-5 * grads[0].abs().max().item()


@pytest.mark.skipif("cpu" not in DEVICES, reason="needs the Triton interpreter on CPU")
def test_runtime_pre_act_patch_falls_back(monkeypatch, caplog):
    lm = tiny_lm("gpt2", seed=3)
    ids = _ids(lm)
    patch = Patch("pre_act", 1, positions=4, scale=1.5)
    outs = []
    dispatch.forget_fallbacks()
    for mode in ("auto", "force"):
        monkeypatch.setenv("KNCORE_KERNELS", mode)
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="kncore.ops"):
            outs.append(lm.run(ids, patches=[patch]).logits)
    assert any("pre_act" in rec.getMessage() for rec in caplog.records)
    assert _err(outs[1], outs[0]) <= 1e-5 * outs[0].abs().max().item()


# --------------------------------------------------------------------------- GPU only

compiled_cuda = pytest.mark.skipif(not torch.cuda.is_available() or K.INTERPRETED,
                                   reason="needs CUDA and compiled Triton (TRITON_INTERPRET unset)")


@compiled_cuda
def test_opcheck_cuda():
    x, w, kw = _case(17, True, "cuda")
    args = (x, w, kw["b"], kw["w_up"], kw["b_up"], kw["neuron_scale"], kw["neuron_rows"], "silu", True, False)
    torch.library.opcheck(torch.ops.kncore.mlp_capture.default, args)


@pytest.mark.slow
@compiled_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smollm_cuda_fused_equals_plain(smollm, monkeypatch, dtype):
    orig = smollm.dtype  # the fixture is shared: put the model back as it was
    smollm.model.to("cuda", dtype)
    try:
        ids = smollm.batch(["The capital of Canada is"]).input_ids.cuda()
        outs = []
        for mode in ("off", "auto"):
            monkeypatch.setenv("KNCORE_KERNELS", mode)
            with torch.no_grad():
                outs.append(smollm.run(ids, logits="last").logits.float())
        assert outs[1].argmax(-1).item() == outs[0].argmax(-1).item()
        tol = 1e-3 if dtype == torch.float32 else 0.15
        assert _err(outs[1], outs[0]) <= tol * outs[0].abs().max().item()
    finally:
        smollm.model.to("cpu", orig)


# --------------------------------------------------------------------------- patch_neurons in the kernel

def _kernel_as_reference(monkeypatch, calls):
    """The runtime's fused path with the reference standing in for the Triton
    kernel (no triton here): what the runtime hands the kernel is recorded."""
    def fake(*args, **kwargs):
        calls.append(kwargs)
        return K.mlp_capture_ref(*args, **kwargs)

    monkeypatch.setattr(K, "mlp_capture", fake)
    monkeypatch.setattr(op, "not_supported_reasons", lambda *a, **k: [])
    monkeypatch.setattr(dispatch, "wants_kernels", lambda device: True)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["suppress", "enhance"])
def test_patch_neurons_scale_in_the_kernel_epilogue(arch, mode, monkeypatch):
    """patch_neurons' act patches (a factor on some neurons at each row's target
    position) go to the kernel as neuron_scale / neuron_rows, not through the
    site afterwards; the numbers equal the plain path's."""
    import kncore

    lm = tiny_lm(arch, seed=int(torch.randint(0, 10_000, ())))
    ids = _ids(lm, B=3, T=7)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 4:] = False  # row 1's target is position 3, the others' position 6
    g = _gen()
    kns = [(L, int(i)) for L in (0, 2) for i in torch.randint(0, lm.d_ff, (3,), generator=g)]
    caps = [("act", 0), ("act", 2)]
    with torch.no_grad(), kncore.patch_neurons(lm, kns, mode=mode, factor=2.0):
        plain = lm.run(ids, attention_mask=mask, capture=caps)
        calls = []
        _kernel_as_reference(monkeypatch, calls)
        fused = lm.run(ids, attention_mask=mask, capture=caps)
    scaled = [c for c in calls if c.get("neuron_scale") is not None]
    assert len(calls) == lm.n_layers and len(scaled) == 2  # layers 0 and 2 carry the neurons
    want = 0.0 if mode == "suppress" else 2.0
    for c in scaled:
        s = c["neuron_scale"]
        assert set(s.unique().tolist()) == {1.0, want} and int((s == want).sum()) <= 3
        rows = c["neuron_rows"].view(3, 7)
        assert rows.sum().item() == 3 and rows[1, 3] and rows[0, 6] and rows[2, 6]
    assert _err(fused.logits, plain.logits) <= 1e-5 * plain.logits.abs().max().item()
    for c in caps:
        assert _err(fused[c], plain[c]) <= 1e-5 * plain[c].abs().max().item()
    # the capture sees the patched neurons: zero (suppress) or twice the unpatched value (enhance)
    L0 = [i for L, i in kns if L == 0]
    with torch.no_grad():
        base = lm.run(ids, attention_mask=mask, capture=caps)[("act", 0)][0, 6, L0]
    assert torch.allclose(fused[("act", 0)][0, 6, L0], base * want, rtol=1e-5, atol=1e-6)


def test_overlapping_neuron_patches_stay_on_the_site(monkeypatch):
    """Two patches on the same entries multiply twice: the kernel's single
    scale cannot say that, so the site applies them (and the numbers agree)."""
    lm = tiny_lm("gpt2", seed=int(torch.randint(0, 10_000, ())))
    ids = _ids(lm)
    patches = [Patch("act", 1, positions=[2, 5], neurons=[1, 7], scale=2.0),
               Patch("act", 1, positions=[5], neurons=[1, 7], scale=2.0)]
    with torch.no_grad():
        plain = lm.run(ids, patches=patches, capture=[("act", 1)])
        calls = []
        _kernel_as_reference(monkeypatch, calls)
        fused = lm.run(ids, patches=patches, capture=[("act", 1)])
    assert all(c.get("neuron_scale") is None for c in calls) and len(calls) == lm.n_layers
    assert _err(fused[("act", 1)], plain[("act", 1)]) <= 1e-5 * plain[("act", 1)].abs().max().item()
    base = lm.run(ids, capture=[("act", 1)])[("act", 1)]
    assert torch.allclose(fused[("act", 1)][:, 5, [1, 7]], 4 * base[:, 5, [1, 7]], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("cpu" not in DEVICES, reason="needs the Triton interpreter on CPU")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_patch_neurons_through_the_kernel(arch, monkeypatch):
    """The real kernel (Triton's interpreter) applies patch_neurons' factor in
    its epilogue and gives the plain path's numbers."""
    import kncore

    lm = tiny_lm(arch, seed=int(torch.randint(0, 10_000, ())))
    ids = _ids(lm, B=2, T=6)
    kns = [(1, int(i)) for i in torch.randint(0, lm.d_ff, (4,), generator=_gen())]
    real, calls = K.mlp_capture, []
    monkeypatch.setattr(K, "mlp_capture", lambda *a, **k: calls.append(k) or real(*a, **k))
    outs = []
    for mode in ("auto", "force"):
        monkeypatch.setenv("KNCORE_KERNELS", mode)
        with torch.no_grad(), kncore.patch_neurons(lm, kns, mode="enhance", factor=3.0):
            outs.append(lm.run(ids, capture=[("act", 1)]))
    assert sum(k.get("neuron_scale") is not None for k in calls) == 1
    plain, fused = outs
    assert _err(fused.logits, plain.logits) <= 1e-5 * plain.logits.abs().max().item()
    assert _err(fused[("act", 1)], plain[("act", 1)]) <= 1e-5 * plain[("act", 1)].abs().max().item()
