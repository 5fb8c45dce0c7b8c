"""Alice / Alice-0 (docs/algorithms.md §11): subspace iteration, switching, compensation, Q tracking."""

import math

import pytest
import torch

from qtrain.optim import AliceMethod, alice0, alice_compensation_
from qtrain.optim.alice import subspace_iteration, switch_basis, tracked_cov_matmul
from qtrain.optim.projection import orient

CPU = torch.device("cpu")


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def orthonormal(m, r, seed):
    return torch.linalg.qr(rand((m, r), seed)).Q


def explicit_q_tilde(g, u, q, beta3):
    """Q̃ = β3·U Q Uᵀ + (1−β3)·G Gᵀ, materialised (test twin only)."""
    out = (1 - beta3) * g @ g.t()
    return out + beta3 * u @ q @ u.t() if q is not None else out


def assert_orthonormal(u, atol=1e-5):
    torch.testing.assert_close(u.t() @ u, torch.eye(u.shape[1]), rtol=0, atol=atol)


def test_tracked_cov_matmul_equals_the_explicit_product():
    g, u, x = rand((10, 16), 1), orthonormal(10, 4, 2), rand((10, 3), 3)
    q = rand((4, 4), 4)
    q = q @ q.t()
    for beta3, qq in [(0.999, q), (0.0, None)]:
        torch.testing.assert_close(tracked_cov_matmul(x, g, u, qq, beta3), explicit_q_tilde(g, u, qq, beta3) @ x,
                                   rtol=1e-5, atol=1e-5)


def test_subspace_iteration_returns_ritz_pairs_in_descending_order():
    g, u, q = rand((12, 20), 5), orthonormal(12, 5, 6), torch.diag(torch.tensor([5.0, 4, 3, 2, 1]))
    a = explicit_q_tilde(g, u, q, 0.9)
    ritz, mu = subspace_iteration(g, u, q, 0.9, iters=1)
    assert_orthonormal(ritz)
    assert bool((mu[:-1] >= mu[1:]).all())  # descending Ritz order
    torch.testing.assert_close(torch.diag(ritz.t() @ a @ ritz), mu, rtol=1e-5, atol=1e-4)  # μ_i = u_iᵀ A u_i
    torch.testing.assert_close(ritz.t() @ a @ ritz, torch.diag(mu), rtol=0, atol=1e-3)  # Ritz vectors diagonalise B


def test_subspace_iteration_converges_to_the_top_eigenvectors():
    g = rand((10, 30), 7) * torch.logspace(0, -2, 10).unsqueeze(1)  # well separated spectrum of G Gᵀ
    ritz, _ = subspace_iteration(g, orthonormal(10, 3, 8), None, 0.0, iters=60)
    top = torch.linalg.svd(g).U[:, :3]
    torch.testing.assert_close(ritz @ ritz.t(), top @ top.t(), rtol=0, atol=1e-4)  # same subspace


def test_switch_keeps_leading_ritz_vectors_and_draws_the_complement_of_all_r():
    m, r, l = 14, 5, 2
    ritz = orthonormal(m, r, 9)
    u = switch_basis(ritz, l, torch.Generator().manual_seed(3))
    assert u.shape == (m, r)
    assert_orthonormal(u)  # UᵀU = I_r
    assert torch.equal(u[:, :l], ritz[:, :l])  # U₁ = U'[:, :l]
    torch.testing.assert_close(ritz.t() @ u[:, l:], torch.zeros(r, r - l), rtol=0, atol=1e-6)  # ⟂ span(U')
    # U_c[:, J] are columns r+J of the complete QR of U' (J from the same generator stream)
    j = torch.randperm(m - r, generator=torch.Generator().manual_seed(3))[: r - l]
    full_q = torch.linalg.qr(ritz, mode="complete").Q  # (m, m)
    torch.testing.assert_close(u[:, l:], full_q[:, r + j], rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_basis_is_orthonormal_after_every_switch_and_first_step_is_exact(shape):
    method = AliceMethod(rank=4, leading=2, update_interval=2)
    state = method.init_state(shape, CPU, uid=1)
    w = rand(shape, 10)
    bases = []
    for t in range(1, 8):
        g = 0.5 * w + rand(shape, 20 + t)
        d = method.direction(g, state).dense
        if t == 1:  # A3: exact top eigenvectors of Q̃₁ ∝ ĜĜᵀ, i.e. Ĝ's left singular vectors
            assert torch.equal(state["basis"][:, :2], torch.linalg.svd(orient(g), full_matrices=False).U[:, :2])
        assert_orthonormal(state["basis"])
        bases.append(state["basis"].clone())
        w = w - 0.02 * d
    switched = [t for t in range(2, 8) if not torch.equal(bases[t - 2], bases[t - 1])]
    assert switched == [2, 4, 6]  # t mod K == 0 (and t = 1)


def test_switch_inside_a_step_keeps_the_ritz_order_of_q_tilde():
    shape, k = (12, 20), 3
    method = AliceMethod(rank=5, leading=3, update_interval=k, beta3=0.9)
    state = method.init_state(shape, CPU, 1)
    for t in range(1, k):
        method.direction(rand(shape, 30 + t), state)
    g = rand(shape, 30 + k)
    a = explicit_q_tilde(orient(g), state["basis"], state["cov"], 0.9)  # Q̃ with the pre-switch U, Q
    method.direction(g, state)  # t = K: switch
    u1 = state["basis"][:, :3]
    ritz_values = torch.diag(u1.t() @ a @ u1)
    assert bool((ritz_values[:-1] >= ritz_values[1:]).all())


def test_compensation_is_orthogonal_to_u_with_the_t1_column_norms():
    m, n, r, beta1 = 10, 16, 4, 0.9
    g, u = rand((m, n), 11), orthonormal(m, r, 12)
    p, phi = torch.zeros(n), torch.zeros(())
    c = alice_compensation_(g, u, u.t() @ g, p, phi, beta=beta1)
    torch.testing.assert_close(u.t() @ c, torch.zeros(r, n), rtol=0, atol=1e-5)  # UᵀC = 0
    # t = 1 (φ = 0, no limiting): ‖C[:, j]‖² = (m − r)/(1 − β1) for every column with a non-zero residual
    torch.testing.assert_close(c.square().sum(0), torch.full((n,), (m - r) / (1 - beta1)), rtol=1e-5, atol=0)
    assert math.isclose(float(phi), float(c.norm()), rel_tol=1e-6)


def test_compensation_limiter_cuts_growth():
    m, n = 10, 16
    u = orthonormal(m, 4, 13)
    p, phi = torch.zeros(n), torch.zeros(())
    norms = []
    for t in range(1, 6):
        g = rand((m, n), 40 + t) * (30.0 if t == 4 else 1.0)
        prev = float(phi)
        c = alice_compensation_(g, u, u.t() @ g, p, phi, beta=0.9)
        norms.append(float(c.norm()))
        if t > 1:
            assert norms[-1] <= 1.01 * (prev + 1e-8) * (1 + 1e-6)  # ‖ηC‖ <= γ φ_{t−1}
        if t == 4:
            assert math.isclose(norms[-1], 1.01 * prev, rel_tol=1e-5)  # the 30× spike is cut to γ×


def test_full_rank_basis_has_no_compensation():
    m, n = 8, 12
    g, u = rand((m, n), 14), orthonormal(m, m, 15)
    c = alice_compensation_(g, u, u.t() @ g, torch.zeros(n), torch.zeros(()), beta=0.9)
    assert int(torch.count_nonzero(c)) == 0  # r = m ⇒ C ≡ 0
    method = AliceMethod(rank=8, leading=8, update_interval=2)  # r = m needs l = r
    state = method.init_state((m, n), CPU, 1)
    for t in range(1, 4):
        method.direction(rand((m, n), 50 + t), state)
    assert float(state["limiter_norm"]) == 0.0


@pytest.mark.parametrize("shape", [(10, 18), (18, 10)])
def test_alice0_with_l_equal_r_and_no_compensation_is_galore_in_that_basis(shape):
    alpha, (b1, b2), eps = 0.3, (0.9, 0.9), 1e-8
    method = alice0(rank=4, leading=4, alpha=alpha, alpha_c=0.0, update_interval=3, betas=(b1, b2), eps=eps)
    state = method.init_state(shape, CPU, 1)
    assert "cov" not in state  # Alice-0 stores no Q
    m_ref = v_ref = None
    for t in range(1, 9):
        g = rand(shape, 60 + t)
        d = method.direction(g, state).dense
        u, gh = state["basis"], orient(g)  # the basis this step used
        r = u.t() @ gh  # naive GaLore step in basis U, no bias correction (§11 checks)
        m_ref = (1 - b1) * r if m_ref is None else b1 * m_ref + (1 - b1) * r
        v_ref = (1 - b2) * r * r if v_ref is None else b2 * v_ref + (1 - b2) * r * r
        expected = alpha * u @ (m_ref / (v_ref.sqrt() + eps))
        torch.testing.assert_close(orient(d), expected, rtol=1e-5, atol=1e-6, msg=f"step {t}")
        if t == 1:  # GaLore's subspace at t = 1
            p = torch.linalg.svd(gh, full_matrices=False).U[:, :4]
            torch.testing.assert_close(u @ u.t(), p @ p.t(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rebase_q", [False, True])
def test_q_tracking_literal_and_rebased(rebase_q):
    shape, k, beta3 = (12, 20), 2, 0.9
    method = AliceMethod(rank=4, leading=2, update_interval=k, beta3=beta3, rebase_q=rebase_q)
    state = method.init_state(shape, CPU, 1)
    method.direction(rand(shape, 70), state)  # t = 1
    g = rand(shape, 71)
    u_old, q_old = state["basis"].clone(), state["cov"].clone()
    method.direction(g, state)  # t = 2 = K: switch
    u, q = state["basis"], state["cov"]
    sigma = u.t() @ g
    if rebase_q:  # Q ← Uᵀ Q̃ U
        expected = u.t() @ explicit_q_tilde(g, u_old, q_old, beta3) @ u
    else:  # literal Alg. 4: Q accumulates in the old basis
        expected = beta3 * q_old + (1 - beta3) * sigma @ sigma.t()
    torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"rank": 6, "leading": 1}, "leading"), ({"leading": 5}, "leading"), ({"beta3": 1.0}, "beta3"),
     ({"update_interval": 0}, "update_interval"), ({"alpha_c": -0.1}, "alpha_c"), ({"rank": 11}, "rank")],
)
def test_validate_names_the_hyperparameter(kwargs, key):
    with pytest.raises(ValueError, match=key):
        AliceMethod(**{"rank": 4, "leading": 2, **kwargs}).validate((10, 20))  # a = 10: needs 10 − r >= r − l


def test_alice0_factory_rejects_tracking():
    with pytest.raises(ValueError, match="beta3"):
        alice0(beta3=0.9)
