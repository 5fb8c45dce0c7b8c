"""RACS (docs/algorithms.md §10): fixed point, scale invariance, step-1 closed form, limiter."""

import math

import pytest
import torch

from qtrain.optim import RacsMethod
from qtrain.optim.racs import racs_fixed_point


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(48, 80), (64, 40)])
def test_fixed_point_residual_positivity_and_rank_one_fit(shape):
    h = rand(shape, 1).square()
    s_hat, q_hat = racs_fixed_point(h, iters=5)
    assert bool((s_hat > 0).all()) and bool((q_hat > 0).all())
    # q̂ = Hŝ/‖ŝ‖² holds by construction after the last half-step; ŝ's residual measures convergence
    res = (s_hat - h.t() @ q_hat / q_hat.square().sum()).norm() / s_hat.norm()
    assert float(res) < 1e-3  # rate (σ₂/σ₁)² ≈ 0.16 per iteration for these shapes
    u, sv, vh = torch.linalg.svd(h.double())
    best = sv[0] * torch.outer(u[:, 0], vh[0])  # σ₁u₁v₁ᵀ of G⊙G
    err = (torch.outer(q_hat, s_hat).double() - best).norm() / best.norm()
    assert float(err) < 1e-3


@pytest.mark.parametrize("c", [1e-12, 1e3])
def test_fixed_point_scale_split(c):
    """G → cG: ŝ → c²ŝ, q̂ unchanged (q̂ restarts at 1 and H is normalised by its max, so no underflow)."""
    g = rand((20, 30), 2)
    s1, q1 = racs_fixed_point(g.square())
    s2, q2 = racs_fixed_point((c * g).square())
    torch.testing.assert_close(q2, q1, rtol=1e-5, atol=0)
    torch.testing.assert_close(s2, c * c * s1, rtol=1e-5, atol=0)


@pytest.mark.parametrize("c", [1e-2, 1e2])
def test_update_is_invariant_to_gradient_scale(c):
    shape = (12, 18)
    m1, m2 = RacsMethod(), RacsMethod()
    st1, st2 = m1.init_state(shape, torch.device("cpu"), 1), m2.init_state(shape, torch.device("cpu"), 1)
    for t in range(1, 6):
        g = rand(shape, 10 + t)
        torch.testing.assert_close(m2.direction(c * g, st2).dense, m1.direction(g, st1).dense, rtol=1e-4, atol=1e-7,
                                   msg=f"step {t}")


def test_step_one_closed_form():
    """s₁ = (1−β)ŝ, q₁ = (1−β)q̂, η = 1 ⇒ D₁ = α G / ((1−β)√(q̂_i ŝ_j) + 1e-8)."""
    g = rand((10, 14), 3)
    beta, alpha = 0.9, 0.03
    method = RacsMethod(beta=beta, alpha=alpha)
    state = method.init_state(g.shape, torch.device("cpu"), 1)
    d = method.direction(g, state).dense
    s_hat, q_hat = racs_fixed_point(g.square())
    expected = alpha * g / ((1 - beta) * torch.outer(q_hat, s_hat).sqrt() + 1e-8)
    torch.testing.assert_close(d, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(state["col_scale"], (1 - beta) * s_hat)
    torch.testing.assert_close(state["row_scale"], (1 - beta) * q_hat)


@pytest.mark.parametrize("stores", ["limited", "pre_limit"])
def test_limiter_cuts_a_spike(stores):
    shape = (10, 14)
    alpha = 0.05
    method = RacsMethod(alpha=alpha, limiter_stores=stores)
    state = method.init_state(shape, torch.device("cpu"), 1)
    norms, phis = [], []
    for t in range(1, 8):
        # 1000× spike at t = 5: s jumps by only (1−β)·10⁶, so ‖G̃‖ grows ≈ 1000/√(10⁵) ≈ 3× and NL engages
        g = rand(shape, 20 + t) * (1e3 if t == 5 else 1.0)
        d = method.direction(g, state).dense
        norms.append(float(d.norm()) / alpha)
        phis.append(float(state["limiter_norm"]))
    assert math.isclose(phis[0], norms[0], rel_tol=1e-6)  # η = 1 at t = 1
    for t in range(1, len(norms)):
        assert norms[t] <= 1.01 * (phis[t - 1] + 1e-8) * (1 + 1e-6)  # ‖ηG̃‖ <= γ φ_{t−1}
    assert math.isclose(norms[4], 1.01 * phis[3], rel_tol=1e-5)  # the spike step is cut to exactly γ×
    if stores == "limited":
        assert phis == pytest.approx(norms, rel=1e-6)  # φ = ‖ηG̃‖ (A11 decision)
    else:
        assert phis[4] > norms[4] * 1.001  # the literal reading stores the pre-limit ‖G̃‖


@pytest.mark.parametrize("kwargs, key", [({"beta": 1.0}, "beta"), ({"alpha": 0.0}, "alpha"),
                                         ({"fixed_point_iters": 0}, "fixed_point_iters"),
                                         ({"limiter_stores": "x"}, "limiter_stores")])
def test_validate_names_the_hyperparameter(kwargs, key):
    with pytest.raises(ValueError, match=key):
        RacsMethod(**kwargs).validate((10, 20))
