"""I3S subspace sampling (docs/algorithms.md §9) and Fira-Adam (§8)."""

import functools
import itertools
import math

import pytest
import torch
from conftest import closed_loop_grad

from qtrain.optim import FiraMethod, GaLoreMethod
from qtrain.optim.fira import fira_residual
from qtrain.optim.projection import orient
from qtrain.optim.svd_projection import i3s_indices, singular_basis

toy_grad = functools.partial(closed_loop_grad, seed_base=2000)


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- I3S (§9)


def test_i3s_indices_distinct_sorted_in_range():
    gen = torch.Generator().manual_seed(0)
    for a, r in [(10, 3), (16, 16), (7, 1), (32, 12)]:
        sigma = torch.rand(a, generator=gen).sort(descending=True).values
        for _ in range(20):
            idx = i3s_indices(sigma, r, gen)
            assert idx.dtype == torch.int64 and idx.shape == (r,)
            assert idx.unique().numel() == r  # distinct
            assert torch.equal(idx, idx.sort().values)  # sorted ascending
            assert 0 <= int(idx.min()) and int(idx.max()) < a  # in [0, a)


def test_i3s_rank_equal_a_selects_all_and_equals_galore():
    g = rand((8, 13), 1)
    gen = torch.Generator().manual_seed(0)
    _, sigma = singular_basis(g)
    assert torch.equal(i3s_indices(sigma, 8, gen), torch.arange(8))
    galore, i3s = GaLoreMethod(rank=8), GaLoreMethod(rank=8, i3s=True)
    s1, s2 = galore.init_state(g.shape, g.device, 1), i3s.init_state(g.shape, g.device, 1)
    assert torch.equal(galore.direction(g, s1).dense, i3s.direction(g, s2).dense)


@pytest.mark.parametrize("shape", [(9, 14), (14, 9)])
def test_i3s_projection_is_a_subset_of_singular_vectors(shape):
    g = rand(shape, 2)
    method = GaLoreMethod(rank=4, i3s=True, seed=7)
    state = method.init_state(shape, g.device, uid=3)
    method.direction(g, state)
    p = state["proj"]
    torch.testing.assert_close(p.t() @ p, torch.eye(4), rtol=0, atol=1e-5)  # PᵀP = I_r
    vecs, _ = singular_basis(g)
    hits = (vecs.t() @ p).abs() > 0.999  # each column of P is one singular vector, same sign convention
    assert hits.sum(dim=0).tolist() == [1] * 4
    cols = hits.float().argmax(dim=0)
    assert torch.equal(cols, cols.sort().values)  # sorted: P's k-th column is the k-th most important pick


def test_i3s_draw_is_a_function_of_seed_uid_window():
    g = rand((9, 14), 3)
    def proj(seed, uid, steps, gap=2):
        m = GaLoreMethod(rank=3, i3s=True, seed=seed, update_proj_gap=gap)
        s = m.init_state(g.shape, g.device, uid)
        out = []
        for _ in range(steps):
            m.direction(g, s)  # same G every step: only the window's generator changes P
            out.append(s["proj"].clone())
        return out
    a, b = proj(0, 1, 5), proj(0, 1, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # stateless regeneration
    assert torch.equal(a[0], a[1]) and torch.equal(a[2], a[3])  # fixed within a window
    draws = {tuple(p.abs().sum(0).tolist()) for p in proj(0, 1, 40, gap=1)}
    assert len(draws) > 1  # windows draw different subsets (C(9,3) = 84 possible)


def test_i3s_inclusion_frequency_non_increasing_in_index():
    """Statistical: N draws, each inclusion frequency has std <= 0.5/√N; adjacent ones may tie within 4√2 std."""
    a, r, n = 10, 3, 4000
    sigma = 2.0 ** (-torch.arange(a, dtype=torch.float32) / 2)  # strictly decreasing σ
    gen = torch.Generator().manual_seed(11)
    counts = torch.zeros(a)
    for _ in range(n):
        counts[i3s_indices(sigma, r, gen)] += 1
    freq = counts / n
    tol = 4 * math.sqrt(2) * 0.5 / math.sqrt(n)
    assert bool((freq[1:] <= freq[:-1] + tol).all()), freq
    assert float(freq[0]) > float(freq[-1]) + tol
    assert abs(float(freq.sum()) - r) < 1e-6


def test_i3s_equal_sigma_gives_frequency_r_over_a():
    a, r, n = 8, 3, 4000
    gen = torch.Generator().manual_seed(12)
    counts = torch.zeros(a)
    for _ in range(n):
        counts[i3s_indices(torch.ones(a), r, gen)] += 1
    p = r / a
    torch.testing.assert_close(counts / n, torch.full((a,), p), rtol=0, atol=4 * math.sqrt(p * (1 - p) / n))


def test_i3s_matches_the_sequential_draw_probabilities():
    """Pr(I_k = i) = w_i / (1 − Σ_{j<k} w_{I_j}) ([003] Alg. 2): exact inclusion probabilities for a = 4, r = 2."""
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0])
    w = (sigma / sigma.sum()).tolist()
    exact = [0.0] * 4
    for i, j in itertools.permutations(range(4), 2):
        pr = w[i] * w[j] / (1 - w[i])
        exact[i] += pr
        exact[j] += pr
    gen, n = torch.Generator().manual_seed(13), 6000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[i3s_indices(sigma, 2, gen)] += 1
    torch.testing.assert_close(counts / n, torch.tensor(exact), rtol=0, atol=4 * 0.5 / math.sqrt(n))


def test_i3s_zero_gradient_does_not_fail():
    idx = i3s_indices(torch.zeros(6), 4, torch.Generator().manual_seed(0))
    assert idx.unique().numel() == 4


# ---------------------------------------------------------------- Fira (§8)


def naive_fira(grads, rank, alpha, zeta, gap, betas=(0.9, 0.999), eps=1e-6, gamma=1.01):
    """§8 written out column by column on Ĝ (test twin of fira_update); returns the D̂ of each step."""
    b1, b2 = betas
    out, m, v, phi, p = [], None, None, None, None
    for t, g in enumerate(grads, start=1):
        g = orient(g)
        if (t - 1) % gap == 0:
            p = torch.linalg.svd(g, full_matrices=False).U[:, :rank]  # callers use m < n: Ĝ = G
        r = p.t() @ g
        m = (1 - b1) * r if m is None else b1 * m + (1 - b1) * r
        v = (1 - b2) * r * r if v is None else b2 * v + (1 - b2) * r * r
        n = m / (v.sqrt() + eps)
        s = torch.stack([n[:, j].norm() / (r[:, j].norm() + 1e-8) for j in range(g.shape[1])])
        y = (g - zeta * p @ r) * s
        if phi is not None:
            y = y / max(float(y.norm()) / (phi + 1e-8) / gamma, 1.0)
        phi = float(y.norm())
        kappa = math.sqrt(1 - b2**t) / (1 - b1**t)
        out.append(kappa * (alpha * p @ n + y))
    return out


@pytest.mark.parametrize("residual", ["official", "paper"])
def test_fira_matches_naive_twin_through_a_spike(residual):
    shape = (10, 16)  # m < n: P from the un-oriented G is U[:, :r] of Ĝ = G
    grads = [rand(shape, 30 + t) * (100.0 if t == 6 else 1.0) for t in range(1, 9)]
    method = FiraMethod(rank=3, galore_scale=0.25, update_proj_gap=4, fira_residual=residual)
    state = method.init_state(shape, torch.device("cpu"), 1)
    expected = naive_fira(grads, 3, 0.25, 0.25 if residual == "official" else 1.0, gap=4)
    for t, (g, e) in enumerate(zip(grads, expected), start=1):
        torch.testing.assert_close(method.direction(g, state).dense, e, rtol=1e-5, atol=1e-6, msg=f"step {t}")


def test_fira_limiter_bounds_the_residual_norm():
    shape = (12, 8)
    method = FiraMethod(rank=2, update_proj_gap=100)
    state = method.init_state(shape, torch.device("cpu"), 1)
    phis = []
    for t in range(1, 10):
        g = rand(shape, 50 + t) * (100.0 if t == 5 else 1.0)  # 100× spike at t = 5
        method.direction(g, state)
        phis.append(float(state["limiter_norm"]))
    for prev, cur in zip(phis, phis[1:]):
        assert cur <= 1.01 * (prev + 1e-8) * (1 + 1e-6)  # ‖Y_t‖ <= γ(φ_{t−1} + 1e-8)
    assert math.isclose(phis[4], 1.01 * phis[3], rel_tol=1e-5)  # the spike is cut to exactly γ×


def test_fira_paper_residual_is_orthogonal_to_p():
    g = rand((9, 15), 60)
    p = singular_basis(g)[0][:, :4]
    s = fira_residual(g, p, p.t() @ g, zeta=1.0)
    torch.testing.assert_close(p.t() @ s, torch.zeros(4, 15), rtol=0, atol=1e-5)  # PᵀS = 0


def test_fira_full_rank_reductions():
    g = rand((9, 15), 61)
    p = singular_basis(g)[0]  # r = a
    r = p.t() @ g
    torch.testing.assert_close(fira_residual(g, p, r, 1.0), torch.zeros_like(g), rtol=0, atol=1e-5)  # S = 0
    torch.testing.assert_close(fira_residual(g, p, r, 0.25), 0.75 * g, rtol=0, atol=1e-5)  # S = (1−α)Ĝ


@pytest.mark.parametrize("shape", [(9, 15), (15, 9)])
def test_fira_paper_at_full_rank_equals_galore(shape):
    fira = FiraMethod(rank=9, galore_scale=0.25, update_proj_gap=3, fira_residual="paper")
    galore = GaLoreMethod(rank=9, galore_scale=0.25, update_proj_gap=3)
    sf, sg = fira.init_state(shape, torch.device("cpu"), 1), galore.init_state(shape, torch.device("cpu"), 1)
    for t in range(1, 7):
        g = rand(shape, 70 + t)
        torch.testing.assert_close(fira.direction(g, sf).dense, galore.direction(g, sg).dense, rtol=1e-5, atol=1e-5)


def test_fira_refresh_schedule_and_i3s_plug_in():
    method = FiraMethod(rank=3, update_proj_gap=2, i3s=True, seed=5)
    state = method.init_state((10, 7), torch.device("cpu"), 1)
    changes = []
    for t in range(1, 8):
        before = state["proj"].clone()
        method.direction(rand((10, 7), 80 + t), state)
        changes.append(not torch.equal(before, state["proj"]))
        p = state["proj"]
        torch.testing.assert_close(p.t() @ p, torch.eye(3), rtol=0, atol=1e-5)
    assert [t for t, c in enumerate(changes, 1) if c] == [1, 3, 5, 7]


@pytest.mark.parametrize("kwargs, key", [({"fira_residual": "both"}, "fira_residual"), ({"gamma": 0.5}, "gamma"),
                                         ({"rank": 20}, "rank")])
def test_fira_validate_names_the_hyperparameter(kwargs, key):
    with pytest.raises(ValueError, match=key):
        FiraMethod(**{"rank": 4, **kwargs}).validate((10, 20))
