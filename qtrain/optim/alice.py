"""Alice and Alice-0: low-rank Eigen-Adam with tracking, switching and compensation (docs/algorithms.md §11; [004] Alg. 2-4, 10).

Written on Ĝ (m := a rows, n := b columns). Adam runs in the basis U (m×r) of the tracked
covariance Q̃ = β3·U Q Uᵀ + (1−β3)·G Gᵀ; every K steps U is refreshed by one subspace iteration and
*switched*: the l leading Ritz vectors are kept and r − l directions are drawn from the orthogonal
complement. The residual outside span U is added back with an optimal column scaling (compensation).
Alice-0 is β3 = 0: Q̃ = G Gᵀ and no Q is stored.
State: U (m×r), Q (r×r, Alice only), M, V (r×n), p (n), φ: mr + r² + 2rn + n + 1 floats (Alice-0: no r²).
No official code exists; [004]'s pseudocode is the authority.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qtrain.core.seeding import mix_seed, seeded_generator
from qtrain.core.step_state import StepState
from qtrain.errors import HyperparameterError
from qtrain.optim.base import F32, DirectionBytes, Method, Update
from qtrain.optim.hyperparams import check_betas, check_matrix_rank, check_range
from qtrain.optim.limiter import norm_growth_factor
from qtrain.optim.method_optimizer import MethodOptimizer
from qtrain.optim.projection import orient
from qtrain.optim.svd_projection import orient_back


def tracked_cov_matmul(x: Tensor, g: Tensor, u: Tensor, q: Tensor | None, beta3: float) -> Tensor:
    """Q̃ X = β3·U(Q(UᵀX)) + (1−β3)·G(GᵀX) without forming the m×m Q̃ (§11).

    x: (m, k); g: (m, n); u: (m, r); q: (r, r) or None (Alice-0). Returns (m, k) fp32.
    """
    out = (g @ (g.t() @ x)).mul_(1 - beta3)  # (m, n) @ (n, k)
    if q is not None and beta3 > 0:
        out.add_(u @ (q @ (u.t() @ x)), alpha=beta3)  # (m, r) @ (r, r) @ (r, k)
    return out


def subspace_iteration(g: Tensor, u: Tensor, q: Tensor | None, beta3: float, iters: int = 1) -> tuple[Tensor, Tensor]:
    """Ritz pairs of A = Q̃ from the start basis U ([004] Alg. 10; §11).

    repeat k: U₀ ← orthonormal factor of QR(A U₀); B = U₀ᵀ A U₀ (r×r); (μ, E) = eigh(B), descending.
    Returns (Ritz vectors U₀E (m×r), Ritz values μ (r,)), both fp32, sorted by descending μ.
    """
    basis = u
    for _ in range(iters):
        basis = torch.linalg.qr(tracked_cov_matmul(basis, g, u, q, beta3)).Q  # (m, r), reduced QR
    b = basis.t() @ tracked_cov_matmul(basis, g, u, q, beta3)  # (r, r)
    mu, e = torch.linalg.eigh(0.5 * (b + b.t()))  # symmetrise the rounding; eigh sorts ascending
    return basis @ e.flip(-1), mu.flip(-1)  # descending Ritz order


def top_eigvecs_first_step(g: Tensor, rank: int) -> Tensor:
    """Ambiguity A3: U₀ = 0 makes subspace iteration degenerate at t = 1, so take the exact top-r
    eigenvectors of Q̃₁ ∝ G Gᵀ, i.e. the left singular vectors of Ĝ (m×r fp32, descending σ)."""
    return torch.linalg.svd(g, full_matrices=False).U[:, :rank]


def switch_basis(ritz: Tensor, leading: int, generator: torch.Generator) -> Tensor:
    """[U₁, U_c[:, J]]: the l leading Ritz vectors plus r − l random complement directions ([004] Alg. 2).

    ritz: U' (m×r) orthonormal, descending Ritz order. U_c = columns r+1..m of the complete QR of U'
    (span(U')^⊥, w.r.t. all r columns); J = r − l distinct indices uniform in {1..m−r}, drawn from
    `generator`. The m×m Q of the complete QR is never formed: its Householder form (geqrf) is applied
    to the r − l selected unit vectors (ormqr). Returns U (m×r) fp32 with UᵀU = I_r.
    """
    m, r = ritz.shape
    k = r - leading
    if k == 0:
        return ritz.clone()
    reflectors, tau = torch.geqrf(ritz)  # Q_full = H_1⋯H_r (m×m), kept as r Householder vectors
    j = torch.randperm(m - r, generator=generator, device=ritz.device)[:k]  # (k,) distinct, uniform
    select = torch.zeros((m, k), device=ritz.device, dtype=ritz.dtype)
    select[r + j, torch.arange(k, device=ritz.device)] = 1.0  # e_{r+J}: unit vectors of complement columns
    complement = torch.ormqr(reflectors, tau, select)  # Q_full[:, r + J]   (m, k)
    return torch.cat([ritz[:, :leading], complement], dim=1)  # (m, r)


def alice_compensation_(
    g: Tensor, u: Tensor, sigma: Tensor, p: Tensor, phi: Tensor, *, beta: float, gamma: float = 1.01
) -> Tensor:
    """Compensation C for the residual outside span U ([004] Alg. 3, Thm 5.1; §11).

    g: Ĝ (m×n); u: U (m×r); sigma = UᵀĜ (r×n); p (n,) and phi (0-dim) updated in place. Returns C (m×n)
    fp32 after the limiter; UᵀC = 0.
    """
    m, r = u.shape
    e = g - u @ sigma  # E = G − Uσ (m, n): residual outside span U
    p.mul_(beta).add_(e.square().sum(dim=0), alpha=1 - beta)  # colsq(E) directly: 1ᵀ(G⊙G) − 1ᵀ(σ⊙σ) can go < 0
    c = e.mul_(math.sqrt(m - r) * p.clamp_min(1e-30).rsqrt())  # C = √(m−r)·E·Diag(p)^{-1/2}; 0 when m = r
    norm = c.norm()
    eta, _ = norm_growth_factor(norm, phi, first=False, gamma=gamma)  # η = γ / max(‖C‖/φ, γ) ...
    eta = torch.where(phi > 0, eta, torch.ones_like(eta))  # ... if φ > 0 else 1 (Alg. 3), no host sync
    phi.copy_(norm * eta)  # φ ← ‖ηC‖
    return c.mul_(eta)


def alice_update(
    g: Tensor, u: Tensor, q: Tensor | None, m: Tensor, v: Tensor, p: Tensor, phi: Tensor, *, new_basis: Tensor | None,
    betas: tuple[float, float], beta3: float, eps: float, alpha: float, alpha_c: float, gamma: float = 1.01,
    rebase_q: bool = False,
) -> Tensor:
    """One Alice / Alice-0 direction D̂ = α(Δ + α_c C) (m×n fp32); W <- W − λ_t D ([004] Alg. 4 steps 3-8).

    g: Ĝ (m×n) fp32. State tensors updated in place: u (m×r), q (r×r, None for Alice-0), m, v (r×n),
    p (n,), phi (0-dim). new_basis: the switched U (m×r) at a refresh step, else None.
    """
    if new_basis is not None:
        if rebase_q and q is not None:  # A4 option: Q ← Uᵀ(U_old Q U_oldᵀ)U; then step 4 gives Uᵀ Q̃ U
            x = u.t() @ new_basis  # (r, r) = U_oldᵀ U_new
            q.copy_(x.t() @ q @ x)
        u.copy_(new_basis)
    sigma = u.t() @ g  # σ = UᵀG (r, n)                                                    step 3
    if q is not None:  # literal A4: Q is not re-based after a switch (unless rebase_q)     step 4
        q.mul_(beta3).addmm_(sigma, sigma.t(), alpha=1 - beta3)
    b1, b2 = betas
    m.mul_(b1).add_(sigma, alpha=1 - b1)  # no bias correction, no reset at switches       step 5
    v.mul_(b2).addcmul_(sigma, sigma, value=1 - b2)
    delta = u @ (m / (v.sqrt() + eps))  # Δ (m, n); ε absent in [004], 1e-8 here (A4)      step 6
    c = alice_compensation_(g, u, sigma, p, phi, beta=b1, gamma=gamma)  # decay β = β1      step 7
    return delta.add_(c, alpha=alpha_c).mul_(alpha)  #                                     step 8


@dataclass
class AliceMethod(Method):
    """Alice hyperparameters ([004] Table 11, §F.3): lr 0.02, α 0.3, α_c 0.4, β (0.9, 0.9), β3 0.999,
    K 200, r 256 (130M/350M; 128 at 60M, 512 at 1.3B), l 40 (160 at 1.3B), γ 1.01. β3 = 0 is Alice-0.

    Switches happen at t = 1 and t mod K == 0 ([004] Alg. 4; not GaLore's (t−1) mod T). rebase_q
    re-bases Q into the new basis at switches (ambiguity A4; default off = literal Alg. 4).
    """

    rank: int = 256
    leading: int = 40
    alpha: float = 0.3
    alpha_c: float = 0.4
    betas: tuple[float, float] = (0.9, 0.9)
    beta3: float = 0.999
    update_interval: int = 200
    eps: float = 1e-8
    gamma: float = 1.01
    subspace_iters: int = 1
    rebase_q: bool = False
    seed: int = 0

    def validate(self, shape: tuple[int, ...]) -> None:
        name = "Alice" if self.beta3 > 0 else "Alice-0"
        check_matrix_rank(name, self.rank, shape)
        a = min(shape)
        lo = max(0, 2 * self.rank - a)  # the switch draws r − l directions from the (a − r)-dim complement
        if not lo <= self.leading <= self.rank:
            raise HyperparameterError(f"{name} leading = {self.leading} must be in [{lo}, {self.rank}] for rank = {self.rank}"
                             f" and shape {shape}: r − l directions are drawn from the a − r = {a - self.rank}"
                             " dimensional complement")
        check_betas(name, "betas", self.betas, 2)
        check_range(name, "beta3", self.beta3, 0.0, 1.0, hi_open=True)
        check_range(name, "alpha", self.alpha, 0.0, lo_open=True)
        check_range(name, "alpha_c", self.alpha_c, 0.0)
        check_range(name, "update_interval", self.update_interval, 1)
        check_range(name, "eps", self.eps, 0.0)
        check_range(name, "gamma", self.gamma, 1.0)
        check_range(name, "subspace_iters", self.subspace_iters, 1)

    def init_state(self, shape, device, uid) -> dict[str, Any]:
        m, n = min(shape), max(shape)  # on Ĝ
        r = self.rank
        zeros = torch.zeros((r, n), device=device, dtype=torch.float32)  # (r, n)
        state = {
            "step": 0,
            "uid": uid,
            "basis": torch.zeros((m, r), device=device, dtype=torch.float32),  # U; U₀ = 0, set at t = 1
            "exp_avg": zeros,
            "exp_avg_sq": zeros.clone(),
            "residual_sq": torch.zeros((n,), device=device, dtype=torch.float32),  # p
            "limiter_norm": torch.zeros((), device=device, dtype=torch.float32),  # φ
        }
        if self.beta3 > 0:  # Alice-0 never reads Q
            state["cov"] = torch.zeros((r, r), device=device, dtype=torch.float32)  # Q
        return state

    def switched_basis(self, g: Tensor, state: dict[str, Any], t: int) -> Tensor:
        """U after the switch at step t ([004] Alg. 2): Ritz vectors of Q̃, then [U₁, U_c[:, J]]."""
        if t == 1:
            ritz = top_eigvecs_first_step(g, self.rank)  # A3
        else:
            ritz, _ = subspace_iteration(g, state["basis"], state.get("cov"), self.beta3, self.subspace_iters)
        gen = seeded_generator(g.device, mix_seed(self.seed, state["uid"], t))  # stateless: resume-safe
        return switch_basis(ritz, self.leading, gen)

    def direction(self, grad: Tensor, state: dict[str, Any], clock: StepState | None = None) -> Update:
        state["step"] = t = state["step"] + 1
        g = orient(grad.float())  # Ĝ (m, n)                                           step 1
        refresh = t == 1 or t % self.update_interval == 0  # [004] Alg. 4                step 2
        d_hat = alice_update(
            g, state["basis"], state.get("cov"), state["exp_avg"], state["exp_avg_sq"], state["residual_sq"],
            state["limiter_norm"], new_basis=self.switched_basis(g, state, t) if refresh else None,
            betas=self.betas, beta3=self.beta3, eps=self.eps, alpha=self.alpha, alpha_c=self.alpha_c,
            gamma=self.gamma, rebase_q=self.rebase_q,
        )
        return Update(dense=orient_back(d_hat, tuple(grad.shape)))

    def direction_bytes(self, shape: tuple[int, int], grad_dtype: torch.dtype) -> DirectionBytes:
        """Approximate: Ĝ in fp32, the dense Δ and its compensation term (m x n each)."""
        full = F32 * shape[0] * shape[1]
        return DirectionBytes(3 * full, full, False)


def alice0(**kwargs) -> AliceMethod:
    """Alice-0: Alice with β3 = 0 (no tracking, no Q state; §11)."""
    if kwargs.get("beta3", 0.0) != 0.0:
        raise HyperparameterError(f"Alice-0 fixes beta3 = 0, got beta3 = {kwargs['beta3']}; use method 'alice' for beta3 > 0")
    return AliceMethod(**{**kwargs, "beta3": 0.0})


class Alice(MethodOptimizer):
    """Alice as a torch optimizer; 2-D params of groups with rank != None get Alice, others Adam(adam_betas).

    Example: Alice(params, lr=0.02, rank=256, leading=40, alpha=0.3, alpha_c=0.4, update_interval=200)
    """

    method_cls = AliceMethod

    def __init__(
        self, params, lr: float = 0.02, rank: int | None = 256, leading: int = 40, alpha: float = 0.3,
        alpha_c: float = 0.4, betas=(0.9, 0.9), beta3: float = 0.999, update_interval: int = 200,
        eps: float = 1e-8, gamma: float = 1.01, subspace_iters: int = 1, rebase_q: bool = False,
        weight_decay: float = 0.0, adam_betas=(0.9, 0.999), adam_eps: float = 1e-6, seed: int = 0,
    ):
        defaults = dict(lr=lr, rank=rank, leading=leading, alpha=alpha, alpha_c=alpha_c, betas=betas, beta3=beta3,
                        update_interval=update_interval, eps=eps, gamma=gamma, subspace_iters=subspace_iters,
                        rebase_q=rebase_q, weight_decay=weight_decay, adam_betas=adam_betas, adam_eps=adam_eps,
                        seed=seed)
        super().__init__(params, defaults)


class Alice0(Alice):
    """Alice-0 (β3 = 0) as a torch optimizer. Example: Alice0(params, lr=0.02, rank=256, leading=40)"""

    def __init__(
        self, params, lr: float = 0.02, rank: int | None = 256, leading: int = 40, alpha: float = 0.3,
        alpha_c: float = 0.4, betas=(0.9, 0.9), update_interval: int = 200, eps: float = 1e-8, gamma: float = 1.01,
        subspace_iters: int = 1, weight_decay: float = 0.0, adam_betas=(0.9, 0.999), adam_eps: float = 1e-6,
        seed: int = 0,
    ):
        super().__init__(params, lr=lr, rank=rank, leading=leading, alpha=alpha, alpha_c=alpha_c, betas=betas,
                         beta3=0.0, update_interval=update_interval, eps=eps, gamma=gamma,
                         subspace_iters=subspace_iters, weight_decay=weight_decay, adam_betas=adam_betas,
                         adam_eps=adam_eps, seed=seed)
