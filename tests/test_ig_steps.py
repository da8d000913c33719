"""The IG-step kernels (kernels/ig_steps.py) equal their references and the
literal definition (m scaled copies of the neurons), meet the low-precision bar,
and give the runtime's integrated gradients through the linearity trick.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (set here
before triton's first import, or by `make test`).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


from kncore.ops._kernels import kernel_module  # noqa: E402

K = kernel_module("ig_steps")
from kncore import Patch  # noqa: E402
from kncore.ops import ig_steps as op  # noqa: E402
from kncore.testing import tiny_lm  # noqa: E402

DEVICES = (["cpu"] if K.INTERPRETED else []) + (["cuda"] if torch.cuda.is_available() else [])
needs_kernel = pytest.mark.skipif(
    not DEVICES, reason="no device can run the kernels: no CUDA, and triton missing or imported "
                        "before TRITON_INTERPRET=1 was set")
D, F = 40, 123


def _gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def _case(B, m, device, *, per_prompt=False, bias="shared", dtype=torch.float32):
    g = _gen()
    r = lambda *s: torch.randn(*s, generator=g)
    a = r(B, F)
    w = r(F, D) / F ** 0.5 * 2
    b = {"none": None, "shared": r(D), "per_prompt": r(B, D)}[bias]
    alphas = torch.rand(B, m, generator=g) if per_prompt else torch.linspace(0, 1, m + 1)[1:]
    weights = torch.rand(B, m, generator=g) if per_prompt else torch.rand(m, generator=g)
    grads = r(B, m, D)
    cast = lambda t: None if t is None else t.to(dtype).to(device)
    return cast(a), cast(w), cast(b), alphas.to(device), weights.to(device), cast(grads)


def _rows_case(G, R, width, device, *, dtype=torch.float32, per_group_bias=False):
    """Rows in a random group order; some groups may get no row."""
    g = _gen()
    base = torch.randn(G, width, generator=g)
    index = torch.randint(0, G, (R,), generator=g)
    alphas = torch.rand(R, generator=g)
    bias = torch.randn(G, width, generator=g) if per_group_bias else torch.randn(width, generator=g)
    cast = lambda t: t.to(dtype).to(device)
    return cast(base), index.to(device), alphas.to(device), cast(bias)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G,R", [(1, 1), (3, 17), (17, 5)])
@pytest.mark.parametrize("per_group_bias", [False, True])
def test_expand_steps_matches_reference(device, G, R, per_group_bias):
    base, index, alphas, bias = _rows_case(G, R, D, device, per_group_bias=per_group_bias)
    base = base.t().contiguous().t()  # column-major: strides are honoured
    for b in (None, bias):
        out = K.expand_steps(base, index, alphas, b)
        ref = K.expand_steps_ref(base, index, alphas, b)
        assert out.shape == (R, D)
        assert _err(out, ref) <= 1e-6 * ref.abs().max().item()


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G,R", [(1, 3), (5, 17), (17, 9)])
@pytest.mark.parametrize("weighted", [False, True])
def test_segment_sum_matches_reference(device, G, R, weighted):
    gen = _gen()
    rows = torch.randn(R, D, generator=gen).to(device)
    index = torch.randint(0, G, (R,), generator=gen).to(device)  # unsorted, maybe empty groups
    w = torch.rand(R, generator=gen).to(device) if weighted else None
    out = K.segment_sum(rows, index, G, w)
    ref = K.segment_sum_ref(rows, index, G, w)
    assert out.dtype == torch.float32 and out.shape == (G, D)
    assert _err(out, ref) <= 1e-6 * ref.abs().max().item()
    assert torch.equal(out, K.segment_sum(rows, index, G, w)), "not deterministic"


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_w_down", [True, False])
def test_reduce_steps_matches_reference(device, with_w_down):
    G, R = 5, 23
    gen = _gen()
    grads = torch.randn(R, D, generator=gen).to(device)
    index = torch.randint(0, G, (R,), generator=gen).to(device)
    weights = torch.rand(R, generator=gen).to(device)
    act = torch.randn(G, F if with_w_down else D, generator=gen).to(device)
    w = (torch.randn(F, D, generator=gen) / F ** 0.5).to(device) if with_w_down else None
    for wts in (None, weights):
        ig = K.reduce_steps(grads, index, G, act, w, wts)
        ref = K.reduce_steps_ref(grads, index, G, act, w, wts)
        assert ig.dtype == torch.float32 and ig.shape == act.shape
        assert _err(ig, ref) <= 2e-6 * ref.abs().max().item()


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,m", [(1, 1), (1, 7), (5, 3), (17, 2)])
@pytest.mark.parametrize("bias,per_prompt", [("none", False), ("shared", False), ("per_prompt", True)])
def test_dense_expand_matches_reference_and_definition(device, B, m, bias, per_prompt):
    a, w, b, alphas, _, _ = _case(B, m, device, per_prompt=per_prompt, bias=bias)
    y = a @ w
    out = K.ig_expand(y, b, alphas)
    ref = K.ig_expand_ref(y, b, alphas)
    literal, _ = K.ig_steps_ref(a, w, b, alphas)
    scale = ref.abs().max().item()
    assert out.shape == (B, m, D) and scale > 1e-3
    assert _err(out, ref) <= 1e-6 * scale
    assert _err(out, literal) <= 1e-5 * scale


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,m", [(1, 1), (5, 7), (17, 3)])
@pytest.mark.parametrize("per_prompt", [False, True])
def test_dense_reduce_matches_reference_and_definition(device, B, m, per_prompt):
    a, w, b, alphas, weights, g = _case(B, m, device, per_prompt=per_prompt)
    ig = K.ig_reduce(a, w, g, weights)
    ref = K.ig_reduce_ref(a, w, g, weights)
    _, literal = K.ig_steps_ref(a, w, b, alphas, g, weights)
    scale = ref.abs().max().item()
    assert ig.dtype == torch.float32 and ig.shape == (B, F) and scale > 1e-3
    assert _err(ig, ref) <= 2e-6 * scale
    assert _err(ig, literal) <= 1e-5 * scale


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_dense_reduce_takes_step_major_gradients_and_default_weights(device):
    a, w, _, _, _, _ = _case(5, 4, device)
    g = torch.randn(4, 5, D, generator=_gen()).to(device).transpose(0, 1)  # [B, m, D] view
    ig = K.ig_reduce(a, w, g)
    ref = K.ig_reduce_ref(a, w, g.contiguous(), torch.full((4,), 0.25, device=device))
    assert _err(ig, ref) <= 2e-6 * ref.abs().max().item()


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_bar(device, dtype):
    """The rule for a low-precision fast path: its error against fp64 is at most 2x a plain run's in the
    same dtype."""
    a, w, b, alphas, weights, g = _case(5, 7, device, dtype=dtype)
    y = a @ w
    dbl = lambda t: t.double()
    pairs = {
        "expand": (K.ig_expand(y, b, alphas), K.ig_expand_ref(y, b, alphas),
                   K.ig_expand_ref(dbl(y), dbl(b), dbl(alphas))),
        "reduce": (K.ig_reduce(a, w, g, weights), K.ig_reduce_ref(a, w, g, weights),
                   K.ig_reduce_ref(dbl(a), dbl(w), dbl(g), dbl(weights))),
    }
    for name, (fast, plain, ref) in pairs.items():
        assert _err(plain, ref) > 0
        assert _err(fast, ref) <= 2 * _err(plain, ref), f"{name}: {_err(fast, ref):.3g} vs {_err(plain, ref):.3g}"


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_group_bias", [False, True])
def test_expand_steps_backward(device, per_group_bias):
    base, index, alphas, bias = _rows_case(4, 13, D, device, per_group_bias=per_group_bias)
    g = torch.randn(13, D, generator=_gen()).to(device)
    grads = []
    for fn in (K.expand_steps, K.expand_steps_ref):
        ts = [t.clone().requires_grad_(True) for t in (base, alphas, bias)]
        (fn(ts[0], index, ts[1], ts[2]) * g).sum().backward()
        grads.append([t.grad for t in ts])
    for got, want in zip(*grads):
        assert got.shape == want.shape
        assert _err(got, want) <= 2e-6 * want.abs().max().item()


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_autograd_function_path(device):
    """The torch.autograd.Function used where torch.library.triton_op is missing (torch < 2.6)."""
    base, index, alphas, bias = _rows_case(3, 8, D, device)
    fn = K.autograd_function(K._expand_impl, K._expand_setup, K._expand_backward)
    base = base.requires_grad_(True)
    out = fn(base, index, alphas, bias)
    assert _err(out, K.expand_steps_ref(base, index, alphas, bias)) <= 1e-6 * out.abs().max().item()
    g = torch.randn(8, D, generator=_gen()).to(device)
    (out * g).sum().backward()
    assert _err(base.grad, K.segment_sum_ref(g, index, 3, alphas)) <= 2e-6 * base.grad.abs().max().item()


@needs_kernel
def test_bad_arguments_raise():
    a, w, b, alphas, weights, g = _case(3, 4, DEVICES[0])
    y = a @ w
    with pytest.raises(ValueError, match="alphas"):
        K.ig_expand(y, b, alphas[None].expand(2, -1))
    with pytest.raises(ValueError, match="bias"):
        K.ig_expand(y, b[:5], alphas)
    with pytest.raises(ValueError, match="weights"):
        K.ig_reduce(a, w, g, weights[:3])
    with pytest.raises(ValueError, match="w_down"):
        K.ig_reduce(a, w[:, :7], g, weights)
    with pytest.raises(ValueError, match="index"):
        K.segment_sum(g[0], torch.zeros(3, 1, dtype=torch.long, device=g.device), 2)


def test_drop_in_for_the_ig_engine():
    """Same signature and numbers as kncore.attribution's swappable pieces."""
    attribution = pytest.importorskip("kncore.attribution")
    base, index, alphas, bias = _rows_case(4, 19, D, "cpu")
    gen = _gen()
    act = torch.randn(4, F, generator=gen)
    w = torch.randn(F, D, generator=gen) / F ** 0.5
    g = torch.randn(19, D, generator=gen)
    rows = attribution.expand_steps(base, index, alphas, bias)
    assert _err(K.expand_steps_ref(base, index, alphas, bias), rows) == 0
    want = attribution.reduce_steps(g, index, 4, act, w)
    assert _err(K.reduce_steps_ref(g, index, 4, act, w), want) <= 1e-6 * want.abs().max().item()
    if "cpu" in DEVICES:
        assert _err(K.expand_steps(base, index, alphas, bias), rows) <= 1e-6 * rows.abs().max().item()
        assert _err(K.reduce_steps(g, index, 4, act, w), want) <= 2e-6 * want.abs().max().item()


def test_cpu_dispatch_uses_reference(monkeypatch):
    monkeypatch.delenv("KNCORE_KERNELS", raising=False)
    a, w, b, alphas, weights, g = _case(3, 4, "cpu")
    assert any("device cpu" in r for r in op.not_supported_reasons(a, w, g))
    assert torch.equal(op.ig_reduce(a, w, g, weights), K.ig_reduce_ref(a, w, g, weights))
    assert torch.equal(op.ig_expand(a @ w, b, alphas), K.ig_expand_ref(a @ w, b, alphas))
    base, index, al, bias = _rows_case(3, 7, D, "cpu")
    assert torch.equal(op.expand_steps(base, index, al, bias), K.expand_steps_ref(base, index, al, bias))
    assert torch.equal(op.reduce_steps(g[0], index[:4], 3, base, None), K.reduce_steps_ref(g[0], index[:4], 3, base))
    monkeypatch.setenv("KNCORE_KERNELS", "force")
    assert any("float64" in r for r in op.not_supported_reasons(a.double(), w))
    # fp64 step factors (kncore.attribution's quadrature points) do not send the call to the reference
    assert not any("float64" in r for r in op.not_supported_reasons(base, index, coefficients=(al.double(),)))
    if "cpu" in DEVICES:
        want = K.expand_steps_ref(base, index, al, bias)
        assert _err(op.expand_steps(base, index, al.double(), bias), want) <= 1e-6 * want.abs().max().item()


@pytest.mark.skipif("cpu" not in DEVICES, reason="needs the Triton interpreter on CPU")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_runtime_ig_by_linearity_equals_scaled_neurons(arch, monkeypatch):
    """The recipe in kncore.ops.ig_steps: IG at the last token of one layer,
    (1) literally, by replacing the neurons with alpha_k * a and differentiating,
    (2) by replacing mlp_out with expanded step rows and reducing their gradients."""
    monkeypatch.setenv("KNCORE_KERNELS", "force")
    lm = tiny_lm(arch, seed=int(torch.randint(0, 10_000, ())))
    ad, L, m, target = lm.adapter, 1, 5, 11
    ids = torch.randint(7, ad.vocab_size, (2, 6), generator=_gen())
    last = ids.shape[1] - 1
    with torch.no_grad():
        a = lm.run(ids, capture=[("act", L)], capture_positions="last", logits=None)[("act", L)][:, 0]
    alphas = torch.linspace(0, 1, m + 1)[1:]
    rows = ids.repeat_interleave(m, 0)  # prompt-major rows: [B * m, T]

    def score(patch):
        logits = lm.run(rows, patches=[patch], logits="last").logits
        return logits.log_softmax(-1)[:, target].sum()

    steps = (alphas[None, :, None] * a[:, None, :]).reshape(-1, ad.d_ff).requires_grad_(True)
    score(Patch("act", L, positions=last, value=steps)).backward()
    literal = (a[:, None, :] * steps.grad.view(2, m, -1)).sum(1) / m

    w_down, b = ad.down_weight(L), ad.down_bias(L)
    outs = op.ig_expand(a @ w_down, b, alphas).reshape(-1, ad.d_model).detach().requires_grad_(True)
    score(Patch("mlp_out", L, positions=last, value=outs)).backward()
    ig = op.ig_reduce(a, w_down, outs.grad.view(2, m, -1))
    assert literal.abs().max() > 0
    assert _err(ig, literal) <= 1e-4 * literal.abs().max().item()
    # the index form, as kncore.attribution lays its rows out
    index = torch.arange(2).repeat_interleave(m)
    rows = op.expand_steps(a @ w_down, index, alphas.repeat(2), b)
    assert _err(rows, outs) <= 1e-6 * outs.abs().max().item()
    ig_rows = op.reduce_steps(outs.grad, index, 2, a, w_down, torch.full((2 * m,), 1.0 / m))
    assert _err(ig_rows, literal) <= 1e-4 * literal.abs().max().item()
