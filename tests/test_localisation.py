"""Localisation statistics: R1^2 on constructed matrices, KN counts, tau,
layer distribution."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

import kncore
from kncore import localisation as Lc
from kncore.selection import KNSet, refine


def test_r1_identical_rows_is_one():
    n, L, d = random.randint(2, 9), 3, 123
    v = torch.randn(L, d)
    x = torch.stack([v * (0.1 + 5 * random.random()) for _ in range(n)])  # same direction, any length
    assert Lc.r1_squared(x) == pytest.approx(1.0, abs=1e-12)
    assert Lc.r1_squared(x.reshape(n, -1)) == pytest.approx(1.0, abs=1e-12)


def test_r1_orthogonal_rows_is_zero():
    n, m = random.randint(2, 12), 3 * 123
    q, _ = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64))
    x = (q.T * torch.rand(n, 1, dtype=torch.float64).add(0.1)).reshape(n, 3, 123)
    assert Lc.r1_squared(x) == pytest.approx(0.0, abs=1e-12)


def test_r1_matches_svd_definition():
    n = random.randint(2, 10)
    x = torch.randn(n, 4, 57) + torch.randn(4, 57) * random.random() * 3  # partly shared direction
    u = x.reshape(n, -1).double()
    u = u / u.norm(dim=1, keepdim=True)
    s1 = torch.linalg.svdvals(u)[0].item()
    r = Lc.r1_squared(x)
    assert r == pytest.approx((s1 ** 2 - 1) / (n - 1), abs=1e-10)
    assert 0 <= r <= 1
    groups = [torch.randn(random.randint(2, 5), 2, 9) for _ in range(4)] + [torch.randn(1, 2, 9)]
    assert Lc.mean_r1_squared(groups) == pytest.approx(sum(Lc.r1_squared(g) for g in groups[:4]) / 4)


def test_r1_errors():
    with pytest.raises(kncore.InputError, match="at least 2"):
        Lc.r1_squared(torch.randn(1, 3, 5))
    x = torch.randn(3, 10)
    x[1] = 0
    with pytest.raises(kncore.InputError, match=r"\[1\] are all zero"):
        Lc.r1_squared(x)


def _random_coarse(n_facts, n_par, n_layers, d_ff):
    facts = []
    for _ in range(n_facts):
        core = {(random.randrange(n_layers), random.randrange(d_ff)) for _ in range(6)}
        facts.append([{c for c in core if random.random() < 0.8}
                      | {(random.randrange(n_layers), random.randrange(d_ff)) for _ in range(5)}
                      for _ in range(n_par)])
    return facts


def test_counts_tau_and_layers(tmp_path):
    n_layers, d_ff = 5, 123
    r1 = refine(_random_coarse(12, 8, n_layers, d_ff), p="adaptive")
    r2 = refine(_random_coarse(7, 6, n_layers, d_ff), p=0.5)
    assert Lc.mean_kn_count(r1) == pytest.approx(sum(len(s) for s in r1.sets) / 12)
    assert Lc.mean_kn_count([r1, r2]) == pytest.approx(sum(len(s) for s in r1.sets + r2.sets) / 19)
    assert Lc.mean_kn_count([[(0, 1), (2, 3)], []]) == 1.0
    assert Lc.mean_threshold([r1, r2]) == pytest.approx((r1.p + r2.p) / 2)
    assert Lc.mean_threshold(r2) == 0.5

    cnt = Lc.layer_counts([r1, r2], n_layers)
    want = Counter(layer for s in r1.sets + r2.sets for layer, _ in s)
    assert cnt == [want.get(i, 0) for i in range(n_layers)]
    assert Lc.layer_counts(KNSet(((4, 0), (4, 7), (1, 2))), n_layers) == [0, 1, 0, 0, 2]
    with pytest.raises(kncore.InputError, match="outside"):
        Lc.layer_counts([[(9, 0)]], n_layers)

    row = Lc.localisation_row("P36", [r1, r2], [torch.randn(8, n_layers, d_ff) for _ in range(3)])
    assert row["task"] == "P36" and row["n_facts"] == 19 and row["tau"] == Lc.mean_threshold([r1, r2])
    assert 0 <= row["r1_sq"] <= 1

    out = Lc.plot_layer_distribution({"syntactic": r1, "factual": cnt}, tmp_path / "layers.png", n_layers=n_layers)
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert [f.name for f in tmp_path.iterdir()] == ["layers.png"]
