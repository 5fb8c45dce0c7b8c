"""RACS, row and column scaled SGD (docs/algorithms.md §10; [004] Alg. 1, Prop. 3, Eq. 16).

The Fisher is approximated as S ⊗ Q with positive diagonals; the best such fit makes q̂ŝᵀ the rank-1
(Perron) approximation of G⊙G, found by 5 alternating fixed-point steps. The step is the square-root
natural gradient Q^{-1/2} G S^{-1/2} through the norm-growth limiter. No orientation, no projection.
State: s (n), q (m), φ: m + n + 1 floats. No official code exists; [004]'s pseudocode is the authority.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qtrain.core.step_state import StepState
from qtrain.errors import HyperparameterError
from qtrain.optim.base import Method, Update
from qtrain.optim.hyperparams import check_choice, check_range
from qtrain.optim.limiter import norm_growth_factor
from qtrain.optim.method_optimizer import MethodOptimizer

LIMITER_STORES = ("limited", "pre_limit")


def racs_fixed_point(h: Tensor, iters: int = 5) -> tuple[Tensor, Tensor]:
    """Rank-1 fit q̂ŝᵀ ≈ H of a non-negative H (m×n, fp32) by alternating least squares (§10 step 2).

    q̂ starts at 1_m on every call (a carried-over q̂ would let the s/q scale split drift between steps).
    Returns (ŝ (n,), q̂ (m,)) fp32, strictly positive when H has no zero rows/columns.
    """
    # Entries of G⊙G can be ~1e-16: iterate on H / max(H) and put max(H) back on ŝ (fp32 range, §10).
    h_max = h.amax().clamp_min(torch.finfo(torch.float32).tiny)
    h = h / h_max  # (m, n), entries in [0, 1]
    q_hat = torch.ones(h.shape[0], device=h.device, dtype=torch.float32)  # (m,)
    for _ in range(iters):  # s first, then q; the 1e-30 floors only act on an all-zero H
        s_hat = (h.t() @ q_hat) / q_hat.square().sum().clamp_min(1e-30)  # ŝ ← Hᵀq̂ / ‖q̂‖²   (n,)
        q_hat = (h @ s_hat) / s_hat.square().sum().clamp_min(1e-30)  # q̂ ← Hŝ / ‖ŝ‖²      (m,)
    return s_hat * h_max, q_hat


def racs_update(
    grad: Tensor, s: Tensor, q: Tensor, phi: Tensor, step: int, *, beta: float, alpha: float, gamma: float = 1.01,
    iters: int = 5, limiter_stores: str = "limited",
) -> Tensor:
    """One RACS direction D = η·α·G̃ (m×n, fp32); W <- W − λ_t D (§10 steps 1-6).

    grad: G (m×n) fp32; s (n,), q (m,), phi (0-dim) fp32 updated in place.
    """
    s_hat, q_hat = racs_fixed_point(grad.square(), iters)  # H = G⊙G, single-sample E[G⊙G]   steps 1-2
    s.mul_(beta).add_(s_hat, alpha=1 - beta)  # zero init, no bias correction                  step 3
    q.mul_(beta).add_(q_hat, alpha=1 - beta)
    g_tilde = grad / torch.outer(q, s).sqrt_().add_(1e-8)  # G_ij / (√(q_i s_j) + 1e-8), (m, n)  step 4
    norm = g_tilde.norm()
    eta, limited = norm_growth_factor(norm, phi, first=step == 1, gamma=gamma)  # η = 1 at t = 1    step 5
    # A11: store the limited norm ηG̃ (as Fira/APOLLO/Alice); "pre_limit" is the literal reading of Alg. 1
    phi.copy_(limited if limiter_stores == "limited" else norm)
    return g_tilde.mul_(eta * alpha)  #                                                        step 6


@dataclass
class RacsMethod(Method):
    """RACS hyperparameters. [004] Table 9 is partly illegible (ambiguity A1): lr 0.02, β 0.9 and
    α 0.02 (the legible 1.3B value; 350M prints "003") are the starting point to sweep from."""

    beta: float = 0.9
    alpha: float = 0.02
    gamma: float = 1.01
    fixed_point_iters: int = 5
    limiter_stores: str = "limited"
    seed: int = 0

    def validate(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise HyperparameterError(f"RACS needs 2-D weights, got shape {shape}; train other tensors with Adam")
        check_range("RACS", "beta", self.beta, 0.0, 1.0, hi_open=True)
        check_range("RACS", "alpha", self.alpha, 0.0, lo_open=True)
        check_range("RACS", "gamma", self.gamma, 1.0)
        check_range("RACS", "fixed_point_iters", self.fixed_point_iters, 1)
        check_choice("RACS", "limiter_stores", self.limiter_stores, LIMITER_STORES)

    def init_state(self, shape, device, uid) -> dict[str, Any]:
        m, n = shape
        return {
            "step": 0,
            "uid": uid,
            "col_scale": torch.zeros((n,), device=device, dtype=torch.float32),  # s
            "row_scale": torch.zeros((m,), device=device, dtype=torch.float32),  # q
            "limiter_norm": torch.zeros((), device=device, dtype=torch.float32),  # φ
        }

    def direction(self, grad: Tensor, state: dict[str, Any], clock: StepState | None = None) -> Update:
        state["step"] = t = state["step"] + 1
        d = racs_update(
            grad.float(), state["col_scale"], state["row_scale"], state["limiter_norm"], t, beta=self.beta,
            alpha=self.alpha, gamma=self.gamma, iters=self.fixed_point_iters, limiter_stores=self.limiter_stores,
        )
        return Update(dense=d)


class RACS(MethodOptimizer):
    """RACS as a torch optimizer: 2-D params of groups with racs=True get RACS, the rest Adam(adam_betas).

    Example: RACS(params, lr=0.02, beta=0.9, alpha=0.02)
    """

    method_cls = RacsMethod
    marker = "racs"

    def __init__(
        self, params, lr: float = 0.02, beta: float = 0.9, alpha: float = 0.02, gamma: float = 1.01,
        fixed_point_iters: int = 5, limiter_stores: str = "limited", weight_decay: float = 0.0,
        racs: bool = True, adam_betas=(0.9, 0.999), adam_eps: float = 1e-6, seed: int = 0,
    ):
        defaults = dict(lr=lr, beta=beta, alpha=alpha, gamma=gamma, fixed_point_iters=fixed_point_iters,
                        limiter_stores=limiter_stores, weight_decay=weight_decay, racs=racs, adam_betas=adam_betas,
                        adam_eps=adam_eps, seed=seed)
        super().__init__(params, defaults)
